"""
Benchmarks of the data path, on whatever machine runs them (prints the numbers, asserts nothing):

    python bench_data.py tokenize     # `python prepare.py pile` tokens/s on Pile-format shards of real text
    python bench_data.py readers      # the same text as pile, parquet, a save_to_disk dataset, and an indexed
                                      # dataset (prepare.py megatron: the vocabulary check alone), tokens/s
    python bench_data.py loader       # BatchLoader.next_batch against a training step of the demo SLM
    python bench_data.py score        # SALT_DS scoring tokens/s against training tokens/s of the demo SLM
    python bench_data.py pythia --folder /big/disk/sim  # every step from prepare to the first batch on a
                                      # simulation of Pythia's Pile at its real size: time and peak memory

The shards are made from this Python's standard library source (real text on every machine), one document a
file, with the top-level package as pile_set_name.

`pythia` writes an .idx of the preshuffled Pile's shape (146,432,000 sequences of 2,049 tokens, the layout
megatron-core writes: 2.9 GB) beside a sparse .bin of the matching size (600 GB that take no disk and read as
token 0), whole and in 20 pieces, and the parts of `salt.py score` for it (8 ranks, 1.7 GB). Each step then runs
in a process of its own, which reports its time and its peak resident memory (getrusage: its own, and that of
the worker processes it waited for). --sequences makes a smaller one.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import torch
import zstandard

import checkpoint_manager
import data
import evaluation
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


# -----------------------------------------------------------------------------
# Pythia's preshuffled Pile at its real size (simulated): prepare.py megatron, train.py's start, salt.py's merge
# of the score parts and its report

PYTHIA_SEQUENCES, PYTHIA_TOKENS, PYTHIA_PIECES = 146_432_000, 2049, 20
KD_SEQUENCES = 36_000 * 512  # config/pile_student.py: kd_steps x the global batch, what SALT_DS's stage 1 reads
CHUNK = 1 << 22  # sequences written (and score records made) at a time
SCORE_BATCH, SCORE_RANKS = 16, 8  # salt.py score's default batch size, on 8 GPUs


def write_pythia(folder, n_sequences):
    """folder/whole/document.{idx,bin} and folder/pieces/document.idx with document-0000k-of-00020.bin: n_sequences
    documents of 2049 tokens, each one sequence, in megatron-core's layout (header, int32 sizes, int64 byte
    pointers, int64 document indices); the .bin files are sparse."""
    os.makedirs(os.path.join(folder, 'whole'))
    os.makedirs(os.path.join(folder, 'pieces'))
    idx = os.path.join(folder, 'whole', 'document.idx')
    with open(idx, 'wb') as f:
        f.write(prepare.INDEX_HEADER.pack(prepare.INDEX_MAGIC, 1, 8, n_sequences, n_sequences + 1))
        for at in range(0, n_sequences, CHUNK):
            f.write(np.full(min(CHUNK, n_sequences - at), PYTHIA_TOKENS, dtype='<i4').tobytes())
        for at in range(0, n_sequences, CHUNK):
            f.write((np.arange(at, min(n_sequences, at + CHUNK), dtype='<i8') * 2 * PYTHIA_TOKENS).tobytes())
        for at in range(0, n_sequences + 1, CHUNK):
            f.write(np.arange(at, min(n_sequences + 1, at + CHUNK), dtype='<i8').tobytes())
    os.link(idx, os.path.join(folder, 'pieces', 'document.idx'))
    tokens = n_sequences * PYTHIA_TOKENS
    with open(os.path.join(folder, 'whole', 'document.bin'), 'wb') as f:
        f.truncate(2 * tokens)
    bounds = np.linspace(0, tokens, PYTHIA_PIECES + 1).astype(np.int64)  # byte ranges at token boundaries
    for k in range(PYTHIA_PIECES):
        with open(os.path.join(folder, 'pieces', f'document-{k:05d}-of-{PYTHIA_PIECES:05d}.bin'), 'wb') as f:
            f.truncate(2 * int(bounds[k + 1] - bounds[k]))


def write_score_parts(parts, meta, n_sequences):
    """The parts folder that `salt.py score` on SCORE_RANKS ranks leaves before its merge: each rank's records of
    the batches dealt to it, in order. Median scores: a fifth exactly 0 (no learnable token), the rest in
    [0, 8) to 3 decimals (many ties)."""
    os.makedirs(parts)
    prepare.write_json(os.path.join(parts, 'meta.json'), dict(meta, batch_size=SCORE_BATCH))
    dtype, rng = salt.record_dtype(SCORE_BATCH), np.random.default_rng(0)
    files = [open(os.path.join(parts, f'rank{rank:05d}.bin'), 'wb') for rank in range(SCORE_RANKS)]
    n_batches = -(-n_sequences // SCORE_BATCH)
    for first in range(0, n_batches, CHUNK // SCORE_BATCH):
        batches = np.arange(first, min(n_batches, first + CHUNK // SCORE_BATCH))
        rows = rng.random((len(batches), SCORE_BATCH, 3), dtype=np.float32)
        rows[..., 0] = np.where(rows[..., 0] < 0.2, 0, np.round(rows[..., 1] * 8, 3))
        rows[..., 1] *= 8
        last = batches[-1] == n_batches - 1 and n_sequences % SCORE_BATCH
        if last:
            rows[-1, n_sequences % SCORE_BATCH:] = np.nan
        records = np.zeros(len(batches), dtype)
        records['batch'], records['rows'] = batches, rows
        raw = records.view(np.uint8).reshape(len(records), dtype.itemsize)
        records['crc'] = [zlib.crc32(record[:-4]) for record in raw]
        for rank in range(SCORE_RANKS):
            files[rank].write(records[(batches % SCORE_RANKS) == rank].tobytes())
    for f in files:
        f.close()


def clock():
    """(wall seconds, CPU seconds of this process and of the children it waited for): on a shared machine the
    CPU time is the step's own, the wall time depends on the others' load."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def report(what, start, **more):
    """One line of JSON: a step's time since `start` (a clock()), and the peak resident memory of this process and
    of its children so far."""
    wall, cpu = clock()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(dict(step=what, seconds=round(wall - start[0], 2), cpu_seconds=round(cpu - start[1], 2),
                          peak_mb=round(peak), children_peak_mb=round(children), **more)), flush=True)


def run_step(name, folder, *args):
    """One measured step of `pythia` (in a process of its own, so that its peak memory is its own)."""
    sim = lambda *path: os.path.join(folder, *path)
    report('imports', clock())  # what every step holds before it starts
    start = clock()
    if name == 'prepare':
        prepare.main(['megatron', sim(args[0], 'document'), '--tokenizer', tokenizer.GPT2, '--out_dir',
                      sim(f'data_{args[0]}'), *args[1:]])
        return report(f'prepare.py megatron ({args[0]})', start)
    if name == 'check':  # the vocabulary check's rate, on a real (not sparse) file in the page cache
        return bench_check(folder, start)
    if name == 'merge':  # the parts score the train split
        merge_scores(sim('scores.npy'), len(data.TokenSequences(sim('data_pieces'), 'train', PYTHIA_TOKENS - 1)))
        return report('salt.py score: merge of the parts', start)
    if name == 'report':
        return salt_report(sim, start)
    return train_start(sim, start)


def merge_scores(out, n_sequences):
    parts = out + '.parts'
    with open(os.path.join(parts, 'meta.json')) as f:
        meta = json.load(f)
    meta.pop('batch_size')
    salt.finish_score_file(out, meta, SCORE_BATCH, n_sequences)


def train_start(sim, start):
    """What train.py does before its first batch of a SALT_DS run (block_size 2048, batch_size 8), call by call,
    and the next 100 batches; then stage 2's loader (every sequence)."""
    data_dir = sim('data_pieces')
    train_data = data.TokenSequences(data_dir, 'train', PYTHIA_TOKENS - 1)
    val_data = data.TokenSequences(data_dir, 'val', PYTHIA_TOKENS - 1)
    report('TokenSequences train and val', start, sequences=len(train_data))
    start = clock()
    fingerprint = train_data.fingerprint()
    report('fingerprint', start)
    start = clock()
    scores = salt.load_scores(sim('scores.npy'), dict(block_size=PYTHIA_TOKENS - 1, n_sequences=len(train_data),
                                                     data_fingerprint=fingerprint))
    report('load_scores', start)
    start = clock()
    selected = salt.select_top(scores, salt.selection_size(len(scores), 0, KD_SEQUENCES))
    report('select_top (what stage 1 reads)', start, selected=len(selected))
    start = clock()
    salt.selection_summary(scores, selected)
    report('selection_summary', start)
    start = clock()
    evaluation.val_set(val_data, 20 * 8)
    checkpoint_manager.fingerprints(f'{fingerprint}/{val_data.fingerprint()}', selected, 'bench')
    report('val_set and fingerprints', start)
    start = clock()
    loader = data.BatchLoader(train_data, 8, ids=selected, accumulation=64, stream='student/selection')
    loader.next_batch()
    report('BatchLoader (selection) and its first batch', start)
    start = clock()
    for _ in range(100):
        loader.next_batch()
    seconds = clock()[1] - start[1]
    report('the next 100 batches', start, tokens_per_cpu_s=round(100 * 8 * (PYTHIA_TOKENS - 1) / seconds))
    start = clock()
    read = loader.read_ids(KD_SEQUENCES // 512)
    del loader, selected, scores
    data.BatchLoader(train_data, 8, accumulation=64, skip=read).next_batch()
    report("stage 2: BatchLoader (every sequence, stage 1's left out of its epoch) and its first batch", start)


def salt_report(sim, start):
    data_dir = sim('data_pieces')
    sequences = data.TokenSequences(data_dir, 'train', PYTHIA_TOKENS - 1)
    sequences.domains()
    report('IndexedSequences.domains()', start)
    start = clock()
    salt.report_main(argparse.Namespace(scores=sim('scores.npy'), data_dir=data_dir, block_size=PYTHIA_TOKENS - 1,
                                        max_sequences=0, select_fraction=0, kd_sequences=KD_SEQUENCES, examples=3,
                                        out_dir=sim('selection')))
    report('salt.py report', start)


def bench_check(folder, start, tokens=1 << 30):
    """The vocabulary check of prepare.py megatron on a real 2 GB .bin (in the page cache once written)."""
    prefix = os.path.join(folder, 'check', 'document')
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    np.random.default_rng(0).integers(0, 50257, tokens, dtype=np.uint16).tofile(prefix + '.bin')
    n = tokens // PYTHIA_TOKENS
    with open(prefix + '.idx', 'wb') as f:
        f.write(prepare.INDEX_HEADER.pack(prepare.INDEX_MAGIC, 1, 8, n, n + 1))
        f.write(np.full(n, PYTHIA_TOKENS, dtype='<i4').tobytes())
        f.write((np.arange(n, dtype='<i8') * 2 * PYTHIA_TOKENS).tobytes())
        f.write(np.arange(n + 1, dtype='<i8').tobytes())
    with open(prefix + '.bin', 'r+b') as f:
        f.truncate(2 * n * PYTHIA_TOKENS)
    start = clock()
    prepare.main(['megatron', prefix, '--tokenizer', tokenizer.GPT2, '--out_dir', os.path.join(folder, 'check_out'),
                  '--check_fraction', '1'])
    seconds = clock()[1] - start[1]
    report('the vocabulary check (1G tokens, page cache)', start, tokens_per_cpu_s=round(n * PYTHIA_TOKENS / seconds))


def bench_pythia(folder, n_sequences):
    """Every step at the real size, each in a fresh process: the time and peak memory of each."""
    keep = bool(folder)
    folder = folder or tempfile.mkdtemp(prefix='pythia_')
    try:
        if not os.path.exists(os.path.join(folder, 'whole')):
            start = time.perf_counter()
            write_pythia(folder, n_sequences)
            print(f"wrote the simulation of {n_sequences:,} sequences in {time.perf_counter() - start:.0f} s")
        steps = [('prepare', 'whole'), ('prepare', 'pieces'), ('merge',), ('start',), ('report',), ('check',)]
        for step in steps:
            if step[0] == 'merge' and not os.path.exists(os.path.join(folder, 'scores.npy.parts')):
                sequences = data.TokenSequences(os.path.join(folder, 'data_pieces'), 'train', PYTHIA_TOKENS - 1)
                write_score_parts(os.path.join(folder, 'scores.npy.parts'),
                                  salt.score_meta('bench', sequences, 10), len(sequences))
            result = subprocess.run([sys.executable, os.path.abspath(__file__), 'step', step[0], folder, *step[1:]],
                                    capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith('{')]
            for line in lines:
                print(line)
            if result.returncode:
                print(f"{step}: failed\n{result.stderr[-3000:]}")
    finally:
        if not keep:
            shutil.rmtree(folder)


if __name__ == '__main__':
    if sys.argv[1:2] == ['step']:  # one step of `pythia`, in its own process: python bench_data.py step NAME ARGS
        sys.exit(run_step(sys.argv[2], *sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', choices=['tokenize', 'readers', 'loader', 'score', 'pythia'], nargs='+')
    parser.add_argument('--folder', default='', help='pythia: where the simulation is made and kept (a temporary '
                                                     'folder by default, removed at the end)')
    parser.add_argument('--sequences', type=int, default=PYTHIA_SEQUENCES, help='pythia: its sequences')
    args = parser.parse_args()
    for what in args.what:
        if what == 'pythia':
            bench_pythia(args.folder, args.sequences)
            continue
        with tempfile.TemporaryDirectory() as folder:
            {'tokenize': bench_tokenize, 'readers': bench_readers, 'loader': bench_loader,
             'score': bench_score}[what](folder)
