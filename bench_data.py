"""
Benchmarks of the data path, on whatever machine runs them (prints the numbers, asserts nothing):

    python bench_data.py tokenize     # `python prepare.py pile` tokens/s on Pile-format shards of real text
    python bench_data.py readers      # the same text as pile, parquet, a save_to_disk dataset, and an indexed
                                      # dataset (prepare.py megatron: the vocabulary check alone), tokens/s
    python bench_data.py loader       # BatchLoader.next_batch against a training step of the demo SLM
    python bench_data.py score        # SALT_DS scoring tokens/s against training tokens/s of the demo SLM

The shards are made from this Python's standard library source (real text on every machine), one document a
file, with the top-level package as pile_set_name.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import zstandard

import data
import prepare
import salt
import tokenizer
from losses import salt_loss
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def write_pile_shards(folder, n_shards):
    """The stdlib's files dealt round-robin into n_shards .jsonl.zst files; returns their paths and MB."""
    root, files = prepare.sysconfig.get_paths()['stdlib'], prepare.stdlib_files()
    paths, megabytes = [], 0.0
    for shard in range(n_shards):
        lines = [json.dumps({'text': prepare._read_text(os.path.join(root, f)),
                             'meta': {'pile_set_name': f.split('/')[0]}}) for f in files[shard::n_shards]]
        raw = ('\n'.join(lines) + '\n').encode('utf-8')
        megabytes += len(raw) / 1e6
        paths.append(os.path.join(folder, f'{shard:02d}.jsonl.zst'))
        with open(paths[-1], 'wb') as f:
            f.write(zstandard.ZstdCompressor().compress(raw))
    return paths, megabytes


def bench_tokenize(folder, n_shards=8):
    paths, megabytes = write_pile_shards(folder, n_shards)
    print(f"{n_shards} Pile-format shards, {megabytes:.1f} MB of jsonl, {os.cpu_count()} CPU cores")
    result = subprocess.run([sys.executable, os.path.join(HERE, 'prepare.py'), 'pile', *paths,
                             '--out_dir', os.path.join(folder, 'out')], capture_output=True, text=True, check=True)
    print(result.stdout.strip().splitlines()[-1])


def prepare_rate(folder, *args):
    """tokens/s of one prepare.py command, from the last line it prints, and the worker processes it had."""
    result = subprocess.run([sys.executable, os.path.join(HERE, 'prepare.py'), *args, '--out_dir',
                             os.path.join(folder, args[0])], capture_output=True, text=True, check=True)
    line = result.stdout.strip().splitlines()[-1]
    inputs = int(line.split(' of ')[1].split()[0])
    return float(line.split(' tokens/s')[0].rsplit('(', 1)[1].replace(',', '')), min(inputs, prepare._cpus())


def write_indexed(prefix):
    """The stdlib's files in GPT-2's tokens, one document each ending with its EOT, as an indexed dataset (the
    layout of prepare.read_index: header, int32 sizes, int64 byte pointers, int64 document indices)."""
    root, tok = prepare.sysconfig.get_paths()['stdlib'], tokenizer.GPT2Tokenizer()
    texts = [prepare._read_text(os.path.join(root, f)) for f in prepare.stdlib_files()]
    documents = [ids + [tok.eot] for ids in tok.encode_batch(texts, threads=os.cpu_count())]
    sizes = np.array([len(d) for d in documents], dtype='<i4')
    pointers = 2 * np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)])
    header = prepare.INDEX_HEADER.pack(prepare.INDEX_MAGIC, 1, 8, len(sizes), len(sizes) + 1)
    with open(prefix + '.idx', 'wb') as f:
        f.write(header + sizes.tobytes() + pointers.tobytes() + np.arange(len(sizes) + 1, dtype='<i8').tobytes())
    np.concatenate(documents).astype('<u2').tofile(prefix + '.bin')


def bench_readers(folder, n_shards=8):
    """prepare.py's tokens/s per worker process on the same text (the stdlib's files) from each format."""
    import datasets
    import pyarrow
    import pyarrow.parquet
    paths, megabytes = write_pile_shards(folder, n_shards)
    parquets = []
    for path in paths:
        with open(path, 'rb') as f:
            rows = [json.loads(line) for line in zstandard.ZstdDecompressor().stream_reader(f).read().splitlines()]
        parquets.append(path.replace('.jsonl.zst', '.parquet'))
        pyarrow.parquet.write_table(pyarrow.table({'text': [r['text'] for r in rows],
                                                   'source': [r['meta']['pile_set_name'] for r in rows]}), parquets[-1])
    datasets.Dataset.from_parquet(parquets, cache_dir=os.path.join(folder, 'cache')).save_to_disk(
        os.path.join(folder, 'saved'))
    write_indexed(os.path.join(folder, 'stdlib'))
    print(f"{megabytes:.1f} MB of text in {n_shards} files, {prepare._cpus()} CPUs")
    runs = {'pile': ['pile', *paths], 'parquet': ['parquet', *parquets, '--subset_column', 'source'],
            'hf (save_to_disk)': ['hf', os.path.join(folder, 'saved'), '--subset_column', 'source'],
            'megatron (vocabulary check)': ['megatron', os.path.join(folder, 'stdlib'), '--tokenizer', tokenizer.GPT2,
                                            '--check_tokens', '2000000']}
    for name, args in runs.items():
        rate, processes = prepare_rate(folder, *args)
        print(f"{name:28s} {rate:>14,.0f} tokens/s, {processes} processes: {rate / processes:>14,.0f} per process")


def bench_loader(folder, steps=20, batches=2000):
    """next_batch over a SALT_DS-like random half of the ids vs a forward + backward of demo-slm (block 64,
    batch 8) through losses.salt_loss."""
    paths, _ = write_pile_shards(folder, 2)
    subprocess.run([sys.executable, os.path.join(HERE, 'prepare.py'), 'pile', *paths, '--out_dir', folder],
                   capture_output=True, check=True)
    sequences = data.TokenSequences(folder, 'train', 64)
    selected = np.random.default_rng(0).permutation(len(sequences))[:len(sequences) // 2]
    loader = data.BatchLoader(sequences, 8, ids=selected)
    start = time.perf_counter()
    for _ in range(batches):
        x, y = loader.next_batch()
    batch_seconds = (time.perf_counter() - start) / batches

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset('demo-slm', block_size=64))
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            start = time.perf_counter()
        loss = salt_loss(model(x, return_hidden=True), model.lm_head.weight, y, vocab_size=model.config.vocab_size)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)
    step_seconds = (time.perf_counter() - start) / steps
    print(f"next_batch {batch_seconds * 1e6:.0f} us, training step {step_seconds * 1e3:.1f} ms "
          f"({torch.get_num_threads()} threads): loader / step = {batch_seconds / step_seconds:.3%}")


def bench_score(folder, steps=20):
    """Tokens/s of the demo SLM: a training step (forward, backward, AdamW; batch 8 x 64, as
    config/demo_slm.py) against scoring (forward and the SALT_DS score; batches of 16 x 64, as salt.py score)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset('demo-slm', block_size=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seqs = torch.randint(0, model.config.vocab_size, (16, 65))
    x, y = seqs[:8, :-1], seqs[:8, 1:]

    def train_step():
        loss = salt_loss(model(x, return_hidden=True), model.lm_head.weight, y, vocab_size=model.config.vocab_size)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def score_batch():
        with torch.no_grad():
            salt.sequence_scores(model, seqs)

    rates = {}
    for name, step, tokens in (('training', train_step, x.numel()), ('scoring', score_batch, seqs[:, 1:].numel())):
        for _ in range(3):  # warm-up
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates[name] = steps * tokens / (time.perf_counter() - start)
    print(f"demo SLM on {torch.get_num_threads()} threads: training {rates['training']:,.0f} tokens/s, scoring "
          f"{rates['scoring']:,.0f} tokens/s: scoring is {rates['scoring'] / rates['training']:.2f}x faster per token")


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', choices=['tokenize', 'readers', 'loader', 'score'], nargs='+')
    args = parser.parse_args()
    for what in args.what:
        with tempfile.TemporaryDirectory() as folder:
            {'tokenize': bench_tokenize, 'readers': bench_readers, 'loader': bench_loader,
             'score': bench_score}[what](folder)
