"""
The evidence: `pytest test_salt.py` (offline, CPU, a few minutes on 2 cores).

Sections follow the files: model, data, kernels, salt (schedule, scores, selection), train (config, two
stages, DDP, resume) and the end-to-end experiment. Scripts are run as a user runs them, in a subprocess.
"""
import glob
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(REPO, '..', 'shared')
if os.path.isdir(os.path.join(SHARED, 'tiktoken')):  # offline CI: the GPT-2 BPE file is there
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.join(SHARED, 'tiktoken'))
# The Triton interpreter is chosen when triton's @jit decorators run, at `import triton` (kernels imports
# it): this must come before any import that pulls in triton. On a GPU the kernel is compiled instead.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tiktoken  # noqa: E402
import zstandard  # noqa: E402

import data  # noqa: E402
import kernels  # noqa: E402
import salt  # noqa: E402
from kernels import salt_loss  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# Real text: Tiny Shakespeare where it is at hand, else the standard library's own documentation text
# (pydoc_data/topics.py, in every CPython), so the tests need nothing beyond a Python install.
SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare.txt')
REAL_TEXT = SHAKESPEARE if os.path.isfile(SHAKESPEARE) else os.path.join(
    data.sysconfig.get_paths()['stdlib'], 'pydoc_data', 'topics.py')
ENC = tiktoken.get_encoding(data.ENCODING)


def run_script(*args, nproc=1, check=True, cwd=REPO):
    """Run one of the project's scripts as a user would, in a fresh interpreter (or under torchrun)."""
    start = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                 f'--nproc_per_node={nproc}']
    env = dict(os.environ, OMP_NUM_THREADS='1') if nproc > 1 else os.environ  # don't oversubscribe the cores
    result = subprocess.run(start + list(args), cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


# ----------------------------------------------------------------------------------------------------------
# model


def test_logits_match_transformers_gpt2():
    import transformers  # installed for the tests only: the project itself needs it only for init_from=gpt2*
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random everything, biases and LayerNorm gains included, so the mapping is tested
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = GPT.from_hf_state_dict(hf.state_dict(), GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=4,
                                                            n_embd=48)).eval()
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        expected, got = hf(idx).logits, ours(idx)
    assert got.shape == (3, 32, 101)  # padded vocabulary columns are not returned
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_hidden_path_and_padded_vocab():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=32))
    assert model.lm_head.weight.shape[0] == 128 and model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 100, (2, 16))
    hidden = model(idx, return_hidden=True)
    assert hidden.shape == (2, 16, 32)
    torch.testing.assert_close(model.logits(hidden), model(idx))
    out = model.generate(idx[:, :4], max_new_tokens=20, top_k=5)
    assert out.shape == (2, 24) and int(out.max()) < 100  # never samples a padded column


# ----------------------------------------------------------------------------------------------------------
# data


def split_documents(data_dir, split):
    """Decoded documents of a split: concatenated shards cut at EOT (every document starts with EOT)."""
    shards = sorted(f for f in os.listdir(data_dir) if f.startswith(split + "_") and f.endswith(".bin"))
    tokens = np.concatenate([data.read_bin(os.path.join(data_dir, f)) for f in shards]).astype(np.int64)
    assert tokens[0] == data.EOT
    starts = np.flatnonzero(tokens == data.EOT)
    ends = np.append(starts[1:], len(tokens))
    return [ENC.decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)]


# shard format


def test_bin_round_trip_with_header(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = str(tmp_path / "a.bin")
    data.write_bin(path, tokens)
    assert os.path.getsize(path) == data.HEADER_INTS * 4 + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [data.MAGIC, data.VERSION, len(tokens)]
    back = data.read_bin(path)
    assert back.dtype == np.uint16 and back.tolist() == tokens.tolist()
    with pytest.raises(ValueError):
        back[0] = 3  # read-only
    assert os.listdir(tmp_path) == ["a.bin"]  # no temporary file left behind


def test_bin_round_trip_headerless_and_empty(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "nanogpt.bin"
    tokens.tofile(path)
    assert data.read_bin(str(path)).tolist() == tokens.tolist()
    data.write_bin(str(tmp_path / "zero.bin"), [])
    assert data.read_bin(str(tmp_path / "zero.bin")).size == 0


def test_write_bin_refuses_large_tokens_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        data.write_bin(str(tmp_path / "x.bin"), [1, 65536])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"), ("version", "version"), ("odd", "odd"), ("empty", "empty")])
def test_bad_bin_files_name_the_file(tmp_path, damage, message):
    path = str(tmp_path / f"{damage}.bin")
    data.write_bin(path, np.arange(100))
    raw = open(path, "rb").read()
    if damage == "truncate":
        raw = raw[:-10]
    elif damage == "version":
        raw = np.array([data.MAGIC, 2], "<i4").tobytes() + raw[8:]
    elif damage == "odd":
        raw = np.arange(10, dtype="<u2").tobytes() + b"x"
    else:
        raw = b""
    open(path, "wb").write(raw)
    with pytest.raises(ValueError, match=message) as e:
        data.read_bin(path)
    assert path in str(e.value)


def test_wrong_magic_is_caught_as_out_of_vocab_tokens(tmp_path):
    # a header with a wrong magic reads as headerless tokens; its int32s give uint16s >= VOCAB_SIZE
    path = str(tmp_path / "train_000000.bin")
    data.write_bin(path, np.arange(5000))
    raw = bytearray(open(path, "rb").read())
    raw[:4] = np.array([data.MAGIC + 1], "<i4").tobytes()
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="vocab") as e:
        data.TokenSequences(str(tmp_path), "train", 16)
    assert path in str(e.value)


# tokenization round trips


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stdlib"))
    data.main(["stdlib", "--out_dir", out])
    return out


def test_stdlib_tokenizes_and_decodes_back(stdlib_dir):
    meta = json.load(open(os.path.join(stdlib_dir, "meta.json")))
    assert meta["encoding"] == "r50k_base" and meta["eot"] == 50256 and meta["source"]["kind"] == "stdlib"
    expected = {"train": [], "val": []}
    for split, text in data.stdlib_documents(0.05):
        expected[split].append(text)
    for split in ("train", "val"):
        documents = split_documents(stdlib_dir, split)
        assert documents == expected[split]  # every document, exactly
        assert meta["splits"][split]["documents"] == len(documents)
        assert meta["splits"][split]["shards"] == [f"{split}_000000.bin"]
    assert 0.02 < len(expected["val"]) / (len(expected["train"]) + len(expected["val"])) < 0.1


def test_stdlib_split_is_by_file_and_stable():
    files = data.stdlib_files()
    assert files == data.stdlib_files() and len(files) == len(set(files)) > 500  # deterministic, no repeats
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    val = {f for f in files if data._is_val(f, 0.05)}
    assert val and val != set(files)
    # adding files cannot move existing ones: membership depends on the path alone
    assert {f for f in files + ["zz/new_module.py"] if data._is_val(f, 0.05)} - {"zz/new_module.py"} == val


def pile_lines():
    paragraphs = [p for p in open(REAL_TEXT, encoding="utf-8").read().split("\n\n") if p.strip()][:300]
    docs = [{"text": p, "meta": {"pile_set_name": "Gutenberg (PG-19)"}} for p in paragraphs]
    code = [os.path.join(data.sysconfig.get_paths()["stdlib"], f) for f in data.stdlib_files()[:20]]
    docs += [{"text": data._read_text(f), "meta": {"pile_set_name": "Github"}} for f in code]
    docs.append({"text": "literal <|endoftext|> is ordinary text — ünïcödé \u2028 line sep", "meta": {}})
    return [json.dumps(d) for d in docs], docs


def test_pile_zst_through_cli_decodes_back(tmp_path):
    lines, docs = pile_lines()
    shard = tmp_path / "00.jsonl.zst"
    shard.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode("utf-8")))
    out = tmp_path / "out"
    env = dict(os.environ)
    subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "pile", str(shard), "--out_dir", str(out),
                    "--val_fraction", "0.1", "--shard_tokens", "20000"], check=True, env=env,
                   capture_output=True)
    meta = json.load(open(out / "meta.json"))
    expected = {"train": [], "val": []}
    for number, doc in enumerate(docs, 1):
        expected["val" if data._is_val(f"00.jsonl.zst:{number}", 0.1) else "train"].append(doc["text"])
    for split in ("train", "val"):
        assert split_documents(str(out), split) == expected[split]
        assert meta["splits"][split]["documents"] == len(expected[split])
    assert len(meta["splits"]["train"]["shards"]) > 1  # shard_tokens respected
    assert expected["val"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
@pytest.mark.parametrize("bad", ['{"text": "unterminated', '["not an object"]', '{"meta": {}}'])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, suffix, bad):
    raw = ('{"text": "one"}\n{"text": "two"}\n' + bad + '\n{"text": "four"}\n').encode()
    path = tmp_path / ("bad" + suffix)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if suffix.endswith("zst") else raw)
    with pytest.raises(ValueError, match="line 3") as e:
        list(data.pile_documents([str(path)]))
    assert str(path) in str(e.value)


def test_single_text_file_split_and_stale_shards(tmp_path):
    out = str(tmp_path / "shakespeare")
    data.main(["text", REAL_TEXT, "--out_dir", out, "--shard_tokens", "50000"])
    text = open(REAL_TEXT, encoding="utf-8").read()
    train, val = split_documents(out, "train"), split_documents(out, "val")
    assert len(train) == len(val) == 1 and train[0] + val[0] == text
    assert 0.04 < len(val[0]) / len(text) < 0.06 and train[0].endswith("\n")
    assert len([f for f in os.listdir(out) if f.startswith("train_")]) > 1
    data.main(["text", REAL_TEXT, "--out_dir", out])  # one shard now: the old extra shards must go
    assert sorted(f for f in os.listdir(out) if f.endswith(".bin")) == ["train_000000.bin", "val_000000.bin"]
    assert split_documents(out, "train") == train


# sequences and batches


@pytest.fixture
def small_dir(tmp_path):
    # distinct token values everywhere, so a window's first token tells which window it is
    data.write_bin(str(tmp_path / "train_000000.bin"), np.arange(0, 1000))
    data.write_bin(str(tmp_path / "train_000001.bin"), np.arange(1000, 2601))
    data.write_bin(str(tmp_path / "val_000000.bin"), np.arange(5000, 5100))
    return str(tmp_path)


def test_token_sequences_windows_and_ids(small_dir):
    T = 16
    seqs = data.TokenSequences(small_dir, "train", T)
    raw = [np.arange(0, 1000), np.arange(1000, 2601)]
    windows = [r[i * T: i * T + T + 1] for r in raw for i in range((len(r) - 1) // T)]  # never across shards
    assert len(seqs) == len(windows) == 62 + 100
    ids = [0, 61, 62, 161, 5, 5]
    got = seqs.get(ids)
    assert got.dtype == torch.int64 and got.shape == (len(ids), T + 1)
    assert got.tolist() == [windows[i].tolist() for i in ids]
    assert seqs.get(np.arange(len(seqs))).tolist() == [w.tolist() for w in windows]
    assert [os.path.basename(s) for s in seqs.shards] == ["train_000000.bin", "train_000001.bin"]
    with pytest.raises(IndexError):
        seqs.get([len(seqs)])
    first = data.TokenSequences(small_dir, "train", T, max_sequences=70)  # a pool of the first 70 ids
    assert len(first) == 70 and first.get([69]).tolist() == [windows[69].tolist()]
    assert first.fingerprint() != seqs.fingerprint()
    with pytest.raises(IndexError):
        first.get([70])
    assert len(data.TokenSequences(small_dir, "train", T, max_sequences=10**6)) == len(seqs)


def test_fingerprint(small_dir):
    a = data.TokenSequences(small_dir, "train", 16).fingerprint()
    assert a == data.TokenSequences(small_dir, "train", 16).fingerprint()
    assert a != data.TokenSequences(small_dir, "train", 32).fingerprint()
    assert a != data.TokenSequences(small_dir, "val", 16).fingerprint()
    data.write_bin(os.path.join(small_dir, "train_000001.bin"), np.arange(1001, 2602))
    assert a != data.TokenSequences(small_dir, "train", 16).fingerprint()


def test_missing_split_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.TokenSequences(str(tmp_path), "val", 16)
    assert str(tmp_path) in str(e.value) and "val" in str(e.value) and "python data.py" in str(e.value)


def batch_ids(x, seqs):
    """Sequence ids of a batch, from the first token (distinct everywhere in small_dir)."""
    first = {int(seqs.get([i])[0, 0]): i for i in range(len(seqs))}
    return [first[int(t)] for t in x[:, 0]]


def test_batch_loader_ranks_partition_the_global_batches(small_dir):
    seqs = data.TokenSequences(small_dir, "train", 16)  # 162 sequences
    B = 8
    single = data.BatchLoader(seqs, B, seed=3)
    ranks = [data.BatchLoader(seqs, B, rank=r, world_size=2, seed=3) for r in range(2)]
    assert single.batches_per_epoch == 20 and ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 10
    blocks = [single.next_batch() for _ in range(20)]
    seen = [[], []]
    for step in range(10):
        for r in range(2):
            x, y = ranks[r].next_batch()
            assert torch.equal(x, blocks[2 * step + r][0]) and torch.equal(y, blocks[2 * step + r][1])
            assert x.shape == y.shape == (B, 16) and torch.equal(x[:, 1:], y[:, :-1])
            seen[r] += batch_ids(x, seqs)
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(seen[0]) == 80


def test_batch_loader_subset_epochs_and_determinism(small_dir):
    seqs = data.TokenSequences(small_dir, "train", 16)
    subset = list(range(0, 162, 3))  # 54 ids, e.g. a SALT_DS selection
    loader = data.BatchLoader(seqs, 6, seed=1, ids=subset[::-1])
    epoch0 = [batch_ids(loader.next_batch()[0], seqs) for _ in range(9)]
    epoch1 = [batch_ids(loader.next_batch()[0], seqs) for _ in range(9)]
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) == subset  # each epoch covers the subset once
    assert epoch0 != epoch1
    np.random.seed(123), torch.manual_seed(123)  # global RNG state must not matter
    state = np.random.get_state()[1].copy()
    again = data.BatchLoader(seqs, 6, seed=1, ids=subset)
    assert [batch_ids(again.next_batch()[0], seqs) for _ in range(9)] == epoch0
    assert np.array_equal(np.random.get_state()[1], state)
    other = data.BatchLoader(seqs, 6, seed=2, ids=subset)
    assert [batch_ids(other.next_batch()[0], seqs) for _ in range(9)] != epoch0


def test_batch_loader_resumes_exactly(small_dir):
    seqs = data.TokenSequences(small_dir, "train", 16)
    loader = data.BatchLoader(seqs, 8, rank=1, world_size=3, seed=5)  # 6 batches an epoch
    for _ in range(4):
        loader.next_batch()
    state = loader.state_dict()
    assert state == {"epoch": 0, "position": 4} and all(type(v) is int for v in state.values())
    json.dumps(state)
    after = [loader.next_batch() for _ in range(10)]  # crosses an epoch boundary
    resumed = data.BatchLoader(seqs, 8, rank=1, world_size=3, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(after, [resumed.next_batch() for _ in range(10)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == loader.state_dict() == {"epoch": 2, "position": 2}


def test_batch_loader_too_small(small_dir):
    seqs = data.TokenSequences(small_dir, "val", 16)  # 100 tokens: 6 sequences
    with pytest.raises(ValueError, match="too few"):
        data.BatchLoader(seqs, 4, world_size=2)
    with pytest.raises(ValueError, match="too few"):
        data.BatchLoader(data.TokenSequences(small_dir, "train", 16), 4, ids=[1, 2, 3])


def test_undecodable_and_corrupt_pile_files_name_the_file(tmp_path):
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="line 2") as e:
        list(data.pile_documents([str(bad_utf8)]))
    assert str(bad_utf8) in str(e.value)
    corrupt = tmp_path / "corrupt.jsonl.zst"
    corrupt.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n' * 1000)[:-20] + b"\x00" * 20)
    with pytest.raises(ValueError) as e:
        list(data.pile_documents([str(corrupt)]))
    assert str(corrupt) in str(e.value)


def test_nanogpt_headerless_dir_and_resume_mismatch(tmp_path):
    np.arange(3000, dtype=np.uint16).tofile(tmp_path / "train.bin")  # what nanoGPT's prepare.py writes
    seqs = data.TokenSequences(str(tmp_path), "train", 100)
    assert len(seqs) == 29 and seqs.get([28]).tolist() == [list(range(2800, 2901))]
    loader = data.BatchLoader(seqs, 4)  # 7 batches an epoch
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({"epoch": 0, "position": 8})


def test_text_sources(tmp_path):
    one_line = tmp_path / "one_line.txt"
    one_line.write_text("no newline here at all " * 10)
    train, val = [list(data.text_documents([str(one_line)], 0.1))[i][1] for i in (0, 1)]
    assert train + val == one_line.read_text() and 0 < len(val) < len(train)
    files = []
    for i in range(40):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(f"document {i}\n")
    docs = list(data.text_documents([str(f) for f in files], 0.2))
    assert [t for _, t in docs] == [f"document {i}\n" for i in range(40)]
    assert {s for s, _ in docs} == {"train", "val"}
    with pytest.raises(SystemExit):
        data.main(["text", str(one_line), "--out_dir", str(tmp_path / "x"), "--val_fraction", "1"])


STDLIB = data.sysconfig.get_paths()['stdlib']
VAL_FRACTION = 0.1


# Pile-scale tokenization: parallel, resumable, with the Pile subset of every sequence


def real_documents():
    """Endless (text, meta) documents: Shakespeare paragraphs as two subsets, stdlib files as a third, and now
    and then a line without meta (subset "unknown") or with a literal <|endoftext|>."""
    paragraphs = [p for p in open(REAL_TEXT, encoding='utf-8').read().split('\n\n') if p.strip()]
    files = data.stdlib_files()
    for i in itertools.count():
        yield paragraphs[i % len(paragraphs)], {'pile_set_name': 'Gutenberg (PG-19)' if i % 3 else 'Pile-CC'}
        if i % 4 == 0:
            yield data._read_text(os.path.join(STDLIB, files[(i // 4) % len(files)])), {'pile_set_name': 'Github'}
        if i % 50 == 7:
            yield f'no meta here <|endoftext|> {i}', None


def write_pile_inputs(folder, sizes):
    """One .jsonl.zst file per size (documents in it); returns the paths and, per file, its line numbers with
    their (text, subset), blank lines left out (one is written, as the Pile's readers must tolerate them)."""
    source, paths, contents = real_documents(), [], []
    for i, size in enumerate(sizes):
        lines, expected = [], {}
        for text, meta in itertools.islice(source, size):
            lines.append(json.dumps({'text': text} if meta is None else {'text': text, 'meta': meta}))
            expected[len(lines)] = text, (meta or {}).get('pile_set_name', 'unknown')
            if len(lines) == 3:
                lines.append('')
        paths.append(os.path.join(folder, f'{i:02d}.jsonl.zst'))
        with open(paths[-1], 'wb') as f:
            f.write(zstandard.ZstdCompressor().compress(('\n'.join(lines) + '\n').encode('utf-8')))
        contents.append(expected)
    return paths, contents


def tokenize_cli(paths, out, shard_tokens, **popen):
    return subprocess.Popen([sys.executable, os.path.join(REPO, 'data.py'), 'pile', *paths, '--out_dir', str(out),
                             '--val_fraction', str(VAL_FRACTION), '--shard_tokens', str(shard_tokens)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


# Input 0 is small: done long before the others. Input 1 is over one encoding batch (data.BATCH_CHARS), so that it
# is still at work for a while after writing its first shards, where the test kills it.
SIZES = (20, 1600, 300, 350)
SHARD_TOKENS = 20_000  # small, so inputs have many shards and documents cross shard boundaries


@pytest.fixture(scope='module')
def pile(tmp_path_factory):
    """The inputs, and their uninterrupted tokenization."""
    folder = tmp_path_factory.mktemp('pile')
    paths, contents = write_pile_inputs(str(folder), SIZES)
    assert sum(len(text) for text, _ in contents[1].values()) > 1.2 * data.BATCH_CHARS
    run = tokenize_cli(paths, folder / 'whole', SHARD_TOKENS)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    return paths, contents, str(folder / 'whole')


def files_of(folder):
    """name -> bytes of every file in folder, hidden ones included."""
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}


def test_killed_tokenization_resumes_to_identical_files(pile, tmp_path):
    paths, _, whole = pile
    out = tmp_path / 'resumed'
    run = tokenize_cli(paths, out, SHARD_TOKENS, start_new_session=True)  # its own group: kill workers too
    deadline = time.time() + 120
    # stop once the first input is done and the second has written shards of its first batch
    while not ((out / 'input_000.json').exists() and (out / 'train_001000.bin').exists()):
        assert run.poll() is None and time.time() < deadline, run.communicate()[0]
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)  # as a lost node would: no cleanup runs
    run.communicate(timeout=60)
    done = sorted(glob.glob(str(out / 'input_*.json')))  # input 0, perhaps input 2 (smaller than input 1)
    assert not (out / 'input_001.json').exists() and not (out / 'meta.json').exists(), 'nothing was left to resume'
    kept = {name: os.stat(out / name).st_mtime_ns for manifest in done
            for split in json.load(open(manifest))['splits'].values() for name in split['shards']}

    run = tokenize_cli(paths, out, SHARD_TOKENS)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    assert f'{len(done)} of 4 inputs already done' in output and f'{4 - len(done)} of 4 inputs tokenized now' in output
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept  # the inputs done were not redone
    expected, got = files_of(whole), files_of(out)
    assert sorted(got) == sorted(expected)  # no temporary file of the killed run is left behind either
    for name in expected:
        assert got[name] == expected[name], name


def expected_documents(paths, contents, split):
    """(text, subset) of the split's documents in input order, by the documented val rule."""
    return [doc for path, lines in zip(paths, contents) for number, doc in lines.items()
            if ('val' if data._is_val(f'{os.path.basename(path)}:{number}', VAL_FRACTION) else 'train') == split]


def brute_force_domains(data_dir, split, block_size, subsets_of_documents):
    """Each window's subset from the decoded split: the document of a token is the number of EOTs up to it."""
    shards = [data.read_bin(p) for p in sorted(glob.glob(os.path.join(data_dir, f'{split}_*.bin')))]
    tokens = np.concatenate(shards).astype(np.int64)
    starts = np.flatnonzero(tokens == data.EOT)
    documents = [ENC.decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, np.append(starts[1:], len(tokens)))]
    document_of_token = np.cumsum(tokens == data.EOT) - 1
    first_tokens = [offset + i * block_size for offset, shard in zip(np.cumsum([0] + [len(s) for s in shards]), shards)
                    for i in range((len(shard) - 1) // block_size)]
    return documents, [subsets_of_documents[document_of_token[t]] for t in first_tokens]


@pytest.mark.parametrize('split, block_size', [('train', 64), ('train', 1000), ('val', 100)])
def test_domains_are_the_subsets_of_the_documents(pile, split, block_size):
    paths, contents, whole = pile
    expected = expected_documents(paths, contents, split)
    meta = json.load(open(os.path.join(whole, 'meta.json')))
    assert meta['subsets'] == ['Github', 'Gutenberg (PG-19)', 'Pile-CC', 'unknown']
    assert meta['splits'][split]['documents'] == len(expected)
    documents, brute = brute_force_domains(whole, split, block_size, [subset for _, subset in expected])
    assert documents == [text for text, _ in expected]  # so document k of the shards is document k of the inputs
    sequences = data.TokenSequences(whole, split, block_size)
    domains, names = sequences.domains()
    assert names == meta['subsets'] and domains.dtype == np.int64 and domains.shape == (len(sequences),)
    assert [names[d] for d in domains] == brute
    pool = data.TokenSequences(whole, split, block_size, max_sequences=len(sequences) // 3)
    assert pool.domains()[0].tolist() == domains[:len(pool)].tolist()


def test_output_shards_follow_the_inputs(pile):
    """Names are {split}_{input:03d}{part:03d}; some shards begin inside a document continued from the previous
    one (the case domains() carries a subset over), and each side file points at the EOTs of its shard."""
    _, _, whole = pile
    meta = json.load(open(os.path.join(whole, 'meta.json')))
    shards = meta['splits']['train']['shards']
    assert shards == sorted(os.path.basename(p) for p in glob.glob(os.path.join(whole, 'train_*.bin')))
    assert [m['splits']['train']['shards'][0] for m in meta['inputs']] == [f'train_{i:03d}000.bin' for i in range(4)]
    continued = 0
    for name in shards:
        tokens = data.read_bin(os.path.join(whole, name))
        docs = np.load(os.path.join(whole, name[:-4] + '.docs.npy'))
        assert docs.dtype == np.int64 and docs.shape[1] == 2
        assert docs[:, 0].tolist() == np.flatnonzero(tokens == data.EOT).tolist()
        continued += tokens[0] != data.EOT
    assert continued > 0 and len(shards) > 8


def test_in_process_sources_have_subsets(tmp_path):
    """stdlib and text go through tokenize() as one input: the subset is the top-level package, or "text"."""
    docs = list(itertools.islice(data.stdlib_documents(0.2, subsets=True), 60))
    assert len({subset for _, _, subset in docs}) > 3  # packages, perhaps "stdlib"
    data.tokenize(docs, str(tmp_path / 'stdlib'), {'kind': 'stdlib'}, shard_tokens=30_000)
    expected = [subset for split, _, subset in docs if split == 'train']
    documents, brute = brute_force_domains(str(tmp_path / 'stdlib'), 'train', 50, expected)
    assert documents == [text for split, text, _ in docs if split == 'train']
    domains, names = data.TokenSequences(str(tmp_path / 'stdlib'), 'train', 50).domains()
    assert [names[d] for d in domains] == brute
    data.main(['text', REAL_TEXT, '--out_dir', str(tmp_path / 'text'), '--shard_tokens', '100000'])
    domains, names = data.TokenSequences(str(tmp_path / 'text'), 'train', 64).domains()
    assert names == ['text'] and not domains.any()


def test_domains_without_side_files_says_to_retokenize(tmp_path, pile):
    data.write_bin(str(tmp_path / 'train_000000.bin'), np.arange(1000))  # an older data.py's directory
    with pytest.raises(ValueError, match='re-tokenize') as e:
        data.TokenSequences(str(tmp_path), 'train', 16).domains()
    assert str(tmp_path) in str(e.value)
    nanogpt = tmp_path / 'nanogpt'
    nanogpt.mkdir()
    np.arange(3000, dtype=np.uint16).tofile(nanogpt / 'train.bin')
    with pytest.raises(ValueError, match='re-tokenize'):
        data.TokenSequences(str(nanogpt), 'train', 16).domains()
    damaged = shutil.copytree(pile[2], tmp_path / 'damaged')
    os.remove(damaged / 'train_001002.docs.npy')
    with pytest.raises(ValueError, match='re-tokenize') as e:
        data.TokenSequences(str(damaged), 'train', 16).domains()
    assert 'train_001002.docs.npy' in str(e.value)


def test_out_of_vocab_tokens_are_caught_without_reading_every_token(tmp_path):
    n = 10 * data.EDGE_TOKENS
    tokens = np.arange(n) % data.VOCAB_SIZE
    tokens[n // 2] = 60_000  # far from both ends: opening does not see it
    path = str(tmp_path / 'train_000000.bin')
    data.write_bin(path, tokens)
    sequences = data.TokenSequences(str(tmp_path), 'train', 100)
    bad = (n // 2) // 100
    assert sequences.get([0, bad - 1, bad + 1]).shape == (3, 101)
    with pytest.raises(ValueError, match='vocab') as e:
        sequences.get([3, bad])
    assert path in str(e.value) and f'sequence {bad}' in str(e.value)


def test_a_bad_input_names_its_file_and_line(tmp_path):
    paths, _ = write_pile_inputs(str(tmp_path), (5, 5))
    with open(paths[1], 'wb') as f:
        f.write(zstandard.ZstdCompressor().compress(b'{"text": "ok", "meta": {"pile_set_name": 3}}\n'))
    run = tokenize_cli(paths, tmp_path / 'out', 1000)
    output = run.communicate(timeout=120)[0]
    assert run.returncode != 0 and paths[1] in output and 'line 1' in output and 'pile_set_name' in output
    assert not (tmp_path / 'out' / 'meta.json').exists()


# ----------------------------------------------------------------------------------------------------------
# kernels: salt_loss against a float64 reference that materializes the full logits

VOCAB, PADDED_VOCAB = 100, 128  # 100 is not a multiple of the Triton block used below
N_ROWS, CHUNK = 37, 16  # 37 rows: the last chunk is partial
HIDDEN, TEACHER_HIDDEN = 16, 12
IGNORED_CHUNK = slice(16, 32)  # the whole second chunk has target == ignore_index


def reference_salt_loss(hidden, weight, targets, teacher_hidden, teacher_weight, kd_weight, temperature,
                        vocab_size, ignore_index=-1):
    """(loss, ce_mean, kl_mean) in float64 from the full logits; differentiable w.r.t. the student."""
    log_p = torch.log_softmax((hidden.double() @ weight.double().T)[:, :vocab_size], dim=1)
    valid = targets != ignore_index
    n_counted = valid.sum().clamp(min=1)
    ce = -log_p.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    kl = torch.zeros_like(ce)
    if teacher_hidden is not None:
        teacher_logits = (teacher_hidden.double() @ teacher_weight.double().T)[:, :vocab_size]
        log_q = torch.log_softmax(teacher_logits / temperature, dim=1)
        kl = (log_q.exp() * (log_q - log_p)).sum(1)
    ce_mean = (ce * valid).sum() / n_counted
    kl_mean = (kl * valid).sum() / n_counted
    return (1 - kd_weight) * ce_mean + kd_weight * kl_mean, ce_mean, kl_mean


def make_inputs(dtype, logit_scale=1.0, teacher=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=generator)
    targets[IGNORED_CHUNK] = -1
    targets[3] = -1
    inputs = dict(
        student_hidden=(randn(N_ROWS, HIDDEN) * logit_scale).requires_grad_(),
        student_weight=randn(PADDED_VOCAB, HIDDEN).requires_grad_(),
        targets=targets,
        teacher_hidden=None,
        teacher_weight=None,
    )
    if teacher:
        # requires_grad only to check that salt_loss detaches them
        inputs["teacher_hidden"] = (randn(N_ROWS, TEACHER_HIDDEN) * logit_scale).requires_grad_()
        inputs["teacher_weight"] = randn(PADDED_VOCAB, TEACHER_HIDDEN).requires_grad_()
    return inputs


def converted(inputs, dtype=None, device=None):
    """The inputs as fresh leaf tensors with another floating dtype and/or device."""
    result = {}
    for name, value in inputs.items():
        if value is not None and value.is_floating_point():
            value = value.detach().to(device=device, dtype=dtype).requires_grad_(value.requires_grad)
        elif value is not None:
            value = value.to(device)
        result[name] = value
    return result


def check_against_reference(x, kd_weight, temperature, impl, rtol, atol):
    loss, ce, kl = salt_loss(**x, kd_weight=kd_weight, temperature=temperature, vocab_size=VOCAB,
                             chunk_size=CHUNK, return_parts=True, impl=impl)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (x["student_hidden"], x["student_weight"]))
    ref_loss, ref_ce, ref_kl = reference_salt_loss(*x.values(), kd_weight, temperature, VOCAB)
    ref_grad_hidden, ref_grad_weight = torch.autograd.grad(ref_loss, (x["student_hidden"], x["student_weight"]))

    assert not ce.requires_grad and not kl.requires_grad
    for got, want in [(loss, ref_loss), (ce, ref_ce), (kl, ref_kl)]:
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * want.abs().item())
    # gradient tolerances relative to the largest entry: entries near 0 only have absolute accuracy
    for got, want in [(grad_hidden, ref_grad_hidden), (grad_weight, ref_grad_weight)]:
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * want.abs().max().item())
    assert torch.all(grad_weight[VOCAB:] == 0), "padded vocabulary rows must get exactly zero gradient"
    assert torch.all(grad_hidden[IGNORED_CHUNK] == 0), "ignored positions must get zero gradient"
    return loss, ce, kl


# PyTorch path, float64

@pytest.mark.parametrize("temperature", [0.25, 1.0, 2.0])
@pytest.mark.parametrize("kd_weight", [0.0, 0.5, 1.0])
def test_torch_matches_reference(kd_weight, temperature):
    check_against_reference(make_inputs(torch.float64), kd_weight, temperature, "torch", rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kd_weight", [0.0, 0.5])
def test_torch_large_logits(kd_weight):
    inputs = make_inputs(torch.float64, logit_scale=2500.0)  # logits of magnitude ~1e4
    loss, _, _ = check_against_reference(inputs, kd_weight, 2.0, "torch", rtol=1e-10, atol=1e-10)
    assert loss.item() > 100


def test_torch_without_teacher():
    loss, ce, kl = check_against_reference(make_inputs(torch.float64, teacher=False), 0.0, 1.0, "torch", rtol=1e-10, atol=1e-10)
    assert kl.item() == 0 and loss.item() == ce.item()


def test_teacher_gets_no_gradient():
    inputs = make_inputs(torch.float64)
    salt_loss(**inputs, kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK).backward()
    assert inputs["student_hidden"].grad is not None and inputs["student_weight"].grad is not None
    assert inputs["teacher_hidden"].grad is None and inputs["teacher_weight"].grad is None


def test_kd_weight_without_teacher_raises():
    inputs = make_inputs(torch.float64, teacher=False)
    with pytest.raises(ValueError, match="kd_weight"):
        salt_loss(**inputs, kd_weight=0.5, vocab_size=VOCAB)


def test_all_targets_ignored_gives_zero_loss_and_grads():
    inputs = make_inputs(torch.float64)
    inputs["targets"] = torch.full((N_ROWS,), -100)
    loss, ce, kl = salt_loss(**inputs, kd_weight=0.5, vocab_size=VOCAB, ignore_index=-100, chunk_size=CHUNK, return_parts=True)
    loss.backward()
    assert loss.item() == 0 and ce.item() == 0 and kl.item() == 0
    assert torch.all(inputs["student_hidden"].grad == 0) and torch.all(inputs["student_weight"].grad == 0)


def test_batched_shapes_default_chunk_and_full_vocab():
    x = make_inputs(torch.float64)
    hidden = x["student_hidden"].detach()[:36].view(4, 9, HIDDEN).requires_grad_()
    targets = x["targets"][:36].view(4, 9)
    teacher_hidden = x["teacher_hidden"].detach()[:36].view(4, 9, TEACHER_HIDDEN)
    weight, teacher_weight = x["student_weight"], x["teacher_weight"]
    # chunk_size=None: default chunking; vocab_size=None: all 128 weight rows are real tokens
    loss = salt_loss(hidden, weight, targets, teacher_hidden, teacher_weight, kd_weight=0.5, temperature=2.0)
    ref_loss, _, _ = reference_salt_loss(hidden.view(36, HIDDEN), weight, targets.view(36),
                                         teacher_hidden.view(36, TEACHER_HIDDEN), teacher_weight, 0.5, 2.0, PADDED_VOCAB)
    grad_hidden, = torch.autograd.grad(loss, hidden)
    ref_grad_hidden, = torch.autograd.grad(ref_loss, hidden)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    assert grad_hidden.shape == (4, 9, HIDDEN)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-10, atol=1e-12)


def test_backward_scales_by_grad_output_and_no_grad_mode_matches():
    x = make_inputs(torch.float64)
    loss = salt_loss(**x, kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK)
    grad_hidden, grad_weight = torch.autograd.grad(3.0 * loss, (x["student_hidden"], x["student_weight"]))
    ref_loss, _, _ = reference_salt_loss(*x.values(), 0.5, 1.0, VOCAB)
    ref_grad_hidden, ref_grad_weight = torch.autograd.grad(3.0 * ref_loss, (x["student_hidden"], x["student_weight"]))
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_weight, ref_grad_weight, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        eval_loss = salt_loss(**x, kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK)
    assert eval_loss.grad_fn is None
    torch.testing.assert_close(eval_loss, loss.detach(), rtol=1e-12, atol=0)


def test_bf16_inputs_keep_dtypes_and_stay_close():
    x = converted(make_inputs(torch.float64), dtype=torch.bfloat16)
    loss = salt_loss(**x, kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK)
    loss.backward()
    assert loss.dtype == torch.float32
    assert x["student_hidden"].grad.dtype == torch.bfloat16 and x["student_weight"].grad.dtype == torch.bfloat16
    assert torch.all(x["student_weight"].grad[VOCAB:] == 0)
    ref_loss, _, _ = reference_salt_loss(*x.values(), 0.5, 1.0, VOCAB)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2, atol=0)  # same bf16 inputs: only GEMM rounding differs


def test_autocast_uses_low_precision_gemms_and_fp32_grads():
    x = converted(make_inputs(torch.float64), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = salt_loss(**x, kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK)
    loss.backward()
    assert loss.dtype == torch.float32 and x["student_weight"].grad.dtype == torch.float32
    exact_loss = salt_loss(**x, kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK)
    assert loss.item() != exact_loss.item()  # the GEMMs really ran in bf16 ...
    torch.testing.assert_close(loss, exact_loss, rtol=5e-2, atol=0)  # ... and stayed close


def test_bf16_activations_with_fp32_weights_use_bf16_gemms():
    x = converted(make_inputs(torch.float64), dtype=torch.float32)
    exact_loss = salt_loss(**x, kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK)
    mixed = {**x, "student_hidden": x["student_hidden"].detach().bfloat16().requires_grad_(),
             "teacher_hidden": x["teacher_hidden"].detach().bfloat16()}
    loss = salt_loss(**mixed, kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK)
    loss.backward()
    assert mixed["student_hidden"].grad.dtype == torch.bfloat16 and mixed["student_weight"].grad.dtype == torch.float32
    all_bf16_loss = salt_loss(**converted(mixed, dtype=torch.bfloat16), kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK)
    assert loss.item() == all_bf16_loss.item()  # i.e. the weights were cast to bf16 for the GEMMs
    torch.testing.assert_close(loss, exact_loss, rtol=5e-2, atol=0)


def test_default_chunk_size_bounds():
    assert kernels.default_chunk_size(4096, 256, 50304, "cpu") == 64  # 64 rows * 50304 * 4 B = 13 MiB
    assert kernels.default_chunk_size(4096, 768, 50304, "cuda") == 256
    assert kernels.default_chunk_size(32768, 2048, 50304, "cuda") == 2048
    assert kernels.default_chunk_size(10, 16, 128, "cpu") == 64


# Triton kernel, fp32, interpreter on CPU

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, else interpreted


@pytest.fixture
def triton_kernel(monkeypatch):
    """Small vocabulary blocks (several per row, the last one partial) and no silent fallback."""
    if kernels.triton is None:
        pytest.skip("triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction
    assert TRITON_DEVICE == "cuda" or isinstance(kernels._salt_rows_kernel, InterpretedFunction), (
        "triton was imported before TRITON_INTERPRET=1 was set: move this file's os.environ line above every import that loads triton")
    monkeypatch.setattr(kernels, "TRITON_BLOCK_V", 32)

    def fail(*args, **kwargs):
        raise AssertionError("the PyTorch row math ran instead of the Triton kernel")
    monkeypatch.setattr(kernels, "_rows_torch", fail)


ignore_masked_lane_warnings = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning")  # numpy sees -inf - -inf in masked lanes, discarded by tl.where


@ignore_masked_lane_warnings
@pytest.mark.parametrize("kd_weight, temperature", [(0.0, 1.0), (0.5, 0.25), (0.5, 2.0), (1.0, 1.0)])
def test_triton_matches_reference(triton_kernel, kd_weight, temperature):
    inputs = converted(make_inputs(torch.float32), device=TRITON_DEVICE)
    check_against_reference(inputs, kd_weight, temperature, "triton", rtol=1e-4, atol=1e-4)


@ignore_masked_lane_warnings
def test_triton_large_logits(triton_kernel):
    inputs = converted(make_inputs(torch.float32, logit_scale=2500.0), device=TRITON_DEVICE)
    loss, _, _ = check_against_reference(inputs, 0.5, 2.0, "triton", rtol=1e-4, atol=1e-4)
    assert loss.item() > 100


@ignore_masked_lane_warnings
def test_triton_without_teacher(triton_kernel):
    inputs = converted(make_inputs(torch.float32, teacher=False), device=TRITON_DEVICE)
    _, _, kl = check_against_reference(inputs, 0.0, 1.0, "triton", rtol=1e-4, atol=1e-4)
    assert kl.item() == 0


@ignore_masked_lane_warnings
def test_triton_all_targets_ignored(triton_kernel):
    inputs = converted(make_inputs(torch.float32), device=TRITON_DEVICE)
    inputs["targets"] = torch.full((N_ROWS,), -1, device=TRITON_DEVICE)
    loss = salt_loss(**inputs, kd_weight=0.5, vocab_size=VOCAB, chunk_size=CHUNK, impl="triton")
    loss.backward()
    assert loss.item() == 0
    assert torch.all(inputs["student_hidden"].grad == 0) and torch.all(inputs["student_weight"].grad == 0)


COMPILE_FOR_SM90 = """
import triton, kernels
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
signature = dict(logits_ptr="*fp32", logits_stride="i64", teacher_ptr="*fp32", teacher_stride="i64", targets_ptr="*i64",
                 ce_ptr="*fp32", kl_ptr="*fp32", grad_scale_ptr="*fp32", vocab_size="i32", padded_width="i32",
                 ignore_index="i32", kd_weight="fp32", inv_temperature="fp32", HAS_TEACHER="constexpr", BLOCK_V="constexpr")
for has_teacher in (True, False):
    source = ASTSource(kernels._salt_rows_kernel, signature, constexprs=dict(HAS_TEACHER=has_teacher, BLOCK_V=4096))
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8)).asm
"""


def test_triton_kernel_compiles_for_gpu():
    """The interpreter accepts things the compiler rejects (e.g. loop-carried type changes):
    compile for an H100 (no GPU needed), in a subprocess because this one interprets."""
    if kernels.triton is None:
        pytest.skip("triton is not installed")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's warning about a changing default
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_training_with_salt_loss_tracks_the_eager_loss():
    """120 steps of a tiny GPT, KD from a teacher for the first 60: the fused loss and the eager one
    (full logits, log_softmax, autograd) give the same loss curve in fp32, up to rounding."""
    def train_losses(loss_fn):
        torch.manual_seed(0)
        config = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
        student, teacher = GPT(config), GPT(GPTConfig(**{**vars(config), 'n_embd': 16})).requires_grad_(False)
        optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
        data_rng = torch.Generator().manual_seed(1)
        losses = []
        for step in range(120):
            seqs = torch.randint(0, 100, (4, 17), generator=data_rng)
            seqs[:, 1::2] = (seqs[:, 0::2][:, :8] * 7 + 3) % 100  # something learnable
            x, y = seqs[:, :-1], seqs[:, 1:]
            w = 0.5 if step < 60 else 0.0
            loss = loss_fn(student(x, return_hidden=True), student.lm_head.weight, y,
                           teacher(x, return_hidden=True), teacher.lm_head.weight, w)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return np.array(losses)

    def eager(hidden, weight, y, teacher_hidden, teacher_weight, w):
        log_p = torch.log_softmax((hidden @ weight.T)[..., :100], dim=-1)
        log_q = torch.log_softmax((teacher_hidden @ teacher_weight.T)[..., :100], dim=-1)
        ce = -log_p.gather(-1, y[..., None]).mean()
        return (1 - w) * ce + w * (log_q.exp() * (log_q - log_p)).sum(-1).mean()

    def fused(hidden, weight, y, teacher_hidden, teacher_weight, w):
        return salt_loss(hidden, weight, y, teacher_hidden, teacher_weight, kd_weight=w, vocab_size=100, chunk_size=16)

    eager_losses, fused_losses = train_losses(eager), train_losses(fused)
    assert fused_losses[-1] < 0.8 * np.log(100)  # it learned something beyond the uniform guess
    np.testing.assert_allclose(fused_losses, eager_losses, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# salt: schedule, scores, selection


def test_kd_weight_switches_at_kd_steps():
    assert [salt.kd_weight_at(s, 3, 0.6) for s in range(5)] == [0.6, 0.6, 0.6, 0.0, 0.0]
    linear = [salt.kd_weight_at(s, 4, 0.8, 'linear') for s in range(6)]
    assert linear == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    with pytest.raises(ValueError, match='kd_schedule'):
        salt.kd_weight_at(0, 4, 0.8, 'cosine')


def test_scores_equal_brute_force():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=90, n_layer=1, n_head=2, n_embd=16)).eval()
    seqs = torch.randint(0, 90, (5, 13))
    for top_k in (1, 10, 40):
        got = salt.sequence_scores(model, seqs, top_k=top_k)
        for row, seq in zip(got, seqs):
            logits = model(seq[None, :-1])[0].double()
            token_scores, losses, learnable = [], [], []
            for t, target in enumerate(seq[1:].tolist()):
                loss = -torch.log_softmax(logits[t], dim=0)[target].item()
                in_top_k = target in torch.topk(logits[t], top_k).indices.tolist()
                token_scores.append(loss if in_top_k else 0.0)
                losses.append(loss)
                learnable.append(in_top_k)
            expected = [statistics.median(token_scores), statistics.mean(losses), statistics.mean(learnable)]
            np.testing.assert_allclose(row.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_selection_keeps_exactly_the_top_fraction():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(1000, 3)).astype(np.float32)
    for fraction in (0.1, 0.25, 0.5, 1.0):
        picked = salt.select_top(scores, fraction)
        assert len(picked) == round(fraction * 1000) and np.all(np.diff(picked) > 0)
        rest = np.setdiff1d(np.arange(1000), picked)
        if len(rest):
            assert scores[picked, 0].min() >= scores[rest, 0].max()
    tied = np.zeros((10, 3), np.float32)
    assert salt.select_top(tied, 0.3).tolist() == [0, 1, 2]  # ties: lowest ids, deterministically
    with pytest.raises(ValueError, match='select_fraction'):
        salt.select_top(scores, 0.0)


# ----------------------------------------------------------------------------------------------------------
# train: config, two stages, DDP, resume (each run is a real `python train.py` on a tiny model)

TINY = ['--block_size=16', '--batch_size=2', '--eval_batches=2', '--log_interval=1', '--warmup_steps=2',
        '--learning_rate=3e-3', '--eval_interval=4']


@pytest.fixture(scope='module')
def text_data(tmp_path_factory):
    out = tmp_path_factory.mktemp('data') / 'text'
    run_script('data.py', 'text', REAL_TEXT, f'--out_dir={out}')
    return str(out)


@pytest.fixture(scope='module')
def slm_and_scores(text_data, tmp_path_factory):
    """A small LM trained for a few steps, and its SALT_DS scores of the first 256 training sequences."""
    out = tmp_path_factory.mktemp('slm')
    run_script('train.py', f'--data_dir={text_data}', f'--out_dir={out}', '--model_size=demo-slm', '--max_steps=6', *TINY)
    score_file = str(out / 'scores.npy')
    run_script('salt.py', 'score', f'--ckpt={out}/ckpt.pt', f'--data_dir={text_data}', '--block_size=16',
               '--max_sequences=256', f'--out={score_file}', '--batch_size=32')
    return str(out / 'ckpt.pt'), score_file


def train(text_data, out_dir, *overrides, nproc=1, check=True):
    return run_script('train.py', f'--data_dir={text_data}', f'--out_dir={out_dir}', '--model_size=demo-student',
                      *TINY, *overrides, nproc=nproc, check=check)


def step_records(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return {r['step']: r for r in map(json.loads, f) if 'step' in r and 'loss' in r}


def test_unknown_or_mistyped_config_is_an_error(tmp_path, text_data):
    result = train(text_data, tmp_path, '--kd_stepz=5', check=False)
    assert result.returncode != 0 and "unknown config key 'kd_stepz'" in result.stderr
    result = train(text_data, tmp_path, '--max_steps=ten', check=False)
    assert result.returncode != 0 and 'max_steps' in result.stderr and 'expected a int' in result.stderr
    config_file = tmp_path / 'bad.py'
    config_file.write_text('learning_rat = 1e-3\n')
    result = run_script('train.py', str(config_file), check=False)
    assert result.returncode != 0 and 'learning_rat' in result.stderr and str(config_file) in result.stderr


def test_resume_reproduces_uninterrupted_salt_ds_run(tmp_path, text_data, slm_and_scores):
    """Stop in stage 1, resume across the KD -> plain switch, stop in stage 2, resume to the end: the
    stitched per-step losses equal an uninterrupted run's exactly (CPU, same seed)."""
    teacher, scores = slm_and_scores
    salt_ds = [f'--teacher_ckpt={teacher}', f'--score_file={scores}', '--train_sequences=256', '--kd_steps=4',
               '--select_fraction=0.5', '--lr_decay_steps=8', '--ckpt_interval=100']
    train(text_data, tmp_path / 'whole', '--max_steps=8', *salt_ds)
    for stop in (2, 5, 8):
        resume = ['--init_from=resume'] if stop > 2 else []
        train(text_data, tmp_path / 'pieces', f'--max_steps={stop}', *salt_ds, *resume)
    whole, pieces = step_records(tmp_path / 'whole'), step_records(tmp_path / 'pieces')
    assert sorted(whole) == sorted(pieces) == list(range(1, 9))
    for step in whole:
        for key in ('loss', 'ce', 'kl', 'kd_weight'):
            assert whole[step][key] == pieces[step][key], (step, key)
    assert whole[4]['val_loss'] == pieces[4]['val_loss'] and whole[8]['val_loss'] == pieces[8]['val_loss']
    # the wall-clock goes on across a resume instead of starting again from zero
    elapsed = [pieces[step]['elapsed_s'] for step in sorted(pieces)]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # the schedule: KD (w > 0, a KL is measured) for steps 1..4, plain CE afterwards
    assert [whole[s]['kd_weight'] for s in range(1, 9)] == [0.667] * 4 + [0.0] * 4
    assert all(whole[s]['kl'] > 0 for s in range(1, 5)) and all(whole[s]['kl'] == 0 for s in range(5, 9))


def test_two_ddp_ranks_equal_one_process_with_two_accumulation_steps(tmp_path, text_data):
    train(text_data, tmp_path / 'one', '--max_steps=3', '--grad_accum_steps=2')
    train(text_data, tmp_path / 'two', '--max_steps=3', '--grad_accum_steps=1', nproc=2)
    one = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)
    two = torch.load(tmp_path / 'two' / 'ckpt.pt', weights_only=True)
    assert one['step'] == two['step'] == 3
    # atol: the key bias gets a gradient that is rounding noise (softmax ignores it), which Adam scales up to
    # ~1e-6 differences; a wrong batch or a missing sync would differ by ~learning_rate = 3e-3
    for name, tensor in one['model'].items():
        torch.testing.assert_close(two['model'][name], tensor, rtol=1e-4, atol=2e-5, msg=name)
    records_one, records_two = step_records(tmp_path / 'one'), step_records(tmp_path / 'two')
    for step in records_one:
        for key in ('loss', 'val_loss'):
            assert records_one[step].get(key) == pytest.approx(records_two[step].get(key), rel=1e-5)


def test_experiment_writes_table_and_plot(tmp_path, text_data):
    """The whole pipeline of experiment.py at toy size: SLM -> scores -> baseline, SALT, SALT_DS and two
    ablations -> report."""
    common = f"data_dir = {text_data!r}\nblock_size = 16\nbatch_size = 2\ntrain_sequences = 128\neval_batches = 2\n"
    (tmp_path / 'slm.py').write_text(common + "model_size = 'demo-slm'\nmax_steps = 6\neval_interval = 3\n")
    (tmp_path / 'student.py').write_text(common + "model_size = 'demo-student'\nmax_steps = 10\nkd_steps = 4\n"
                                         "eval_interval = 1\nlog_interval = 1\nwarmup_steps = 2\nlearning_rate = 3e-3\n")
    command = [os.path.join(REPO, 'experiment.py'), '--name=toy', '--slm_config=slm.py', '--student_config=student.py',
               '--tokenize=', '--seeds', '1337', '--set', 'kd_weight=0.5', '--ablate', 'kd_weight=0.5,0.9', '--ablate',
               'top_k=1']
    run_script(*command, cwd=tmp_path)
    report = (tmp_path / 'results' / 'toy' / 'table.md').read_text()
    table = report.split('## Val loss\n\n')[1].split('\n\n')[0].splitlines()
    assert table[0].startswith('| run | seed | val loss @ 5 (50%) | val loss @ 7 (70%) | val loss @ 10 (100%)')
    assert [row.split('|')[1].strip() for row in table[2:]] == ['baseline', 'salt', 'salt_ds', 'salt 7 steps',
                                                             'salt_ds 7 steps']
    baseline_final = float(table[2].split('|')[5])
    runs = tmp_path / 'out' / 'toy' / 'seed1337'
    assert baseline_final == pytest.approx(step_records(runs / 'baseline')[10]['val_loss'], abs=1e-4)
    kd_weight_table = report.split('### kd_weight (SALT, mean over 1 seed(s))\n\n')[1].split('\n\n')[0].splitlines()
    # --set kd_weight=0.5 makes 0.5 the main runs' value: the ablation trains 0.9 alone, and its own value wins
    assert [row.split('|')[1].strip() for row in kd_weight_table[2:]] == ['0.5 (main run)', '0.9']
    assert step_records(runs / 'salt')[1]['kd_weight'] == 0.5
    assert step_records(runs / 'salt_kd_weight=0.9')[1]['kd_weight'] == 0.9
    # --short (0.7 by default): SALT again on 7 of the 10 steps, with the cosine schedule ending there
    short = step_records(runs / 'salt_7_steps')
    assert max(short) == 7 and short[7]['lr'] < step_records(runs / 'baseline')[7]['lr']
    assert '### top_k (SALT_DS' in report and (tmp_path / 'out' / 'toy' / 'scores_top1.npy').exists()
    # the salt run against its seed's baseline, the paired difference of the final val losses
    salt_final = step_records(runs / 'salt')[10]['val_loss']
    assert float(table[3].split('|')[6]) == pytest.approx(salt_final - baseline_final, abs=2e-4)
    # wall-clock: the baseline reaches its own final val loss at its last step, in its own total time
    wallclock = report.split('## Wall-clock\n\n')[1].split('\n\n')[0].splitlines()
    baseline_row = [cell.strip() for cell in wallclock[2].split('|')[1:-1]]
    assert baseline_row[0] == 'baseline' and baseline_row[3] == '0.0' and baseline_row[-1] == '1.00x'
    assert baseline_row[2] == baseline_row[5] == baseline_row[6]
    assert '## Cost per step' in report
    assert (tmp_path / 'results' / 'toy' / 'val_loss.png').stat().st_size > 10_000
    # a rerun finds every step done and only rewrites the report
    rerun = run_script(*command, cwd=tmp_path)
    assert '[run]' not in rerun.stdout and rerun.stdout.count('[skip]') == 10


def test_score_file_made_for_other_data_or_teacher_is_refused(slm_and_scores, text_data):
    teacher, score_file = slm_and_scores
    sequences = data.TokenSequences(text_data, 'train', 16, max_sequences=256)
    expected = salt.score_meta(salt.teacher_id(teacher), sequences, top_k=10)
    assert salt.load_scores(score_file, expected).shape == (256, 3)
    for key, other in [('block_size', 32), ('n_sequences', 255), ('teacher', 'another@step1'),
                       ('data_fingerprint', 'f' * 64)]:
        with pytest.raises(ValueError, match=key) as error:
            salt.load_scores(score_file, {**expected, key: other})
        assert score_file in str(error.value)
    with pytest.raises(FileNotFoundError, match='salt.py score'):
        salt.load_scores(score_file + '.missing.npy', expected)


# ----------------------------------------------------------------------------------------------------------
# failures: kill -9 anywhere, dead ranks, non-finite losses, bad settings


def train_command(text_data, out_dir, *overrides):
    return [sys.executable, 'train.py', f'--data_dir={text_data}', f'--out_dir={out_dir}', '--model_size=demo-student',
            *TINY, *overrides]


def test_kill_anywhere_then_the_same_command_resumes_bit_identically(tmp_path, text_data, slm_and_scores):
    """SIGKILL a SALT_DS run at random moments, once in the middle of a checkpoint write, and rerun the same
    command each time: the stitched per-step losses equal an uninterrupted run's, across the KD switch."""
    teacher, scores = slm_and_scores
    salt_ds = [f'--teacher_ckpt={teacher}', f'--score_file={scores}', '--train_sequences=256', '--kd_steps=6',
               '--max_steps=12', '--ckpt_interval=1', '--eval_interval=6']
    train(text_data, tmp_path / 'whole', *salt_ds)
    killed = tmp_path / 'killed'
    command = train_command(text_data, killed, *salt_ds)
    rng = np.random.default_rng(0)
    kills = 0
    while True:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills == 0:  # the first kill lands while a checkpoint is being written
            while not (killed / 'ckpt.pt.tmp').exists() and process.poll() is None:
                time.sleep(0.001)
        elif kills < 5:
            time.sleep(rng.uniform(2.0, 6.0))
        else:
            assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
            break
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    whole, stitched = step_records(tmp_path / 'whole'), step_records(killed)
    assert sorted(stitched) == list(range(1, 13))
    for step in whole:
        assert {k: whole[step][k] for k in ('loss', 'ce', 'kl', 'kd_weight')} == \
            {k: stitched[step][k] for k in ('loss', 'ce', 'kl', 'kd_weight')}, step
    assert whole[12]['val_loss'] == stitched[12]['val_loss']
    assert torch.load(killed / 'ckpt.prev.pt', weights_only=True)['step'] == 11  # the one before is kept


def test_a_dead_rank_ends_the_job_and_the_rerun_resumes(tmp_path, text_data):
    common = ['--max_steps=30', '--ckpt_interval=2', '--eval_interval=10', '--ddp_timeout=30']
    train(text_data, tmp_path / 'whole', *common, nproc=2)
    killed = tmp_path / 'killed'
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    process = subprocess.Popen(launcher + train_command(text_data, killed, *common)[1:], cwd=REPO,
                               env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / 'ckpt.pt').exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(rank_pids(process.pid)[1], signal.SIGKILL)
    killed_at = time.time()
    assert process.wait(timeout=90) != 0
    assert time.time() - killed_at < 60  # the job ends, no rank waits forever
    train(text_data, killed, *common, nproc=2)  # the same command again
    whole, stitched = step_records(tmp_path / 'whole'), step_records(killed)
    assert sorted(stitched) == list(range(1, 31))
    assert [whole[s]['loss'] for s in whole] == pytest.approx([stitched[s]['loss'] for s in whole], rel=1e-6)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, text_data):
    blow_up = ['--learning_rate=1e30', '--warmup_steps=1', '--ckpt_interval=1', '--max_steps=6', '--grad_clip=0.0']
    result = train(text_data, tmp_path / 'stop', *blow_up, check=False)
    assert result.returncode != 0 and 'step 2: loss' in result.stderr and 'not finite' in result.stderr
    assert f"{tmp_path / 'stop' / 'ckpt.pt'} (step 1)" in result.stderr
    assert torch.load(tmp_path / 'stop' / 'ckpt.pt', weights_only=True)['step'] == 1
    result = train(text_data, tmp_path / 'skip', *blow_up, '--skip_nonfinite=2', check=False)
    assert 'batch skipped (1/2)' in result.stdout and 'batch skipped (2/2)' in result.stdout
    assert result.returncode != 0 and 'step 2: loss' in result.stderr


def test_bad_settings_are_clear_errors(tmp_path, text_data, slm_and_scores):
    teacher, scores = slm_and_scores
    missing = tmp_path / 'no_such_slm.pt'
    result = train(text_data, tmp_path / 'a', f'--teacher_ckpt={missing}', '--kd_steps=2', check=False)
    assert result.returncode != 0 and str(missing) in result.stderr and 'train the SLM first' in result.stderr
    result = train(text_data, tmp_path / 'b', f'--teacher_ckpt={teacher}', '--kd_steps=50', '--max_steps=10', check=False)
    assert result.returncode != 0 and 'kd_steps=50' in result.stderr
    result = train(text_data, tmp_path / 'c', f'--score_file={scores}', check=False)
    assert result.returncode != 0 and 'teacher_ckpt' in result.stderr
    # a rerun into the same out_dir with other settings would silently mix two runs: refused
    train(text_data, tmp_path / 'd', '--max_steps=2')
    result = train(text_data, tmp_path / 'd', '--max_steps=4', '--learning_rate=1e-3', check=False)
    assert result.returncode != 0 and 'learning_rate=0.003 (now 0.001)' in result.stderr
    result = train(text_data, tmp_path / 'e', '--init_from=resume', check=False)
    assert result.returncode != 0 and 'holds no checkpoint' in result.stderr


def test_teacher_with_another_vocabulary_or_tokenizer_is_refused(tmp_path):
    other = GPT(GPTConfig(block_size=16, vocab_size=1000, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path / 'other.pt'
    torch.save(dict(model=other.state_dict(), model_args=vars(other.config), run_id='x', step=1), path)
    with pytest.raises(ValueError, match='vocab_size 1000 but the student has 50257'):
        salt.load_teacher(str(path), 'cpu', GPTConfig(block_size=16))
    same_vocab = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    torch.save(dict(model=same_vocab.state_dict(), model_args=vars(same_vocab.config), run_id='y', step=1,
                    tokenizer='cl100k_base'), path)
    with pytest.raises(ValueError, match="trained on 'cl100k_base' tokens but the student's data is 'r50k_base'"):
        salt.load_teacher(str(path), 'cpu', GPTConfig(block_size=16), tokenizer='r50k_base')
    assert salt.load_teacher(str(path), 'cpu', GPTConfig(block_size=16)).config.vocab_size == 50257


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    result = run_script('data.py', 'text', str(empty), f'--out_dir={tmp_path / "out"}', check=False)
    assert result.returncode != 0 and 'the train split got no text from the text input' in result.stderr
    assert not (tmp_path / 'out' / 'meta.json').exists()  # meta.json marks a complete data directory


# ----------------------------------------------------------------------------------------------------------
# the scores, batched in row chunks


def test_chunked_scores_with_tied_logits_follow_the_definition():
    """Row chunks that cut through sequences, and exact ties: a target is learnable iff fewer than k logits
    are strictly larger than its own (test_salt.py's brute-force test has no ties and one chunk)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=90, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # tokens 1..5 share token 0's output row, so their logits tie exactly
        model.lm_head.weight[1:6] = model.lm_head.weight[0]
    seqs = torch.randint(0, 90, (5, 13))
    seqs[:, 1::3] = 3  # a tied target in every third position
    ties_decide = False
    for top_k in (1, 3, 10, 48):
        expected = []
        for seq in seqs:
            with torch.no_grad():
                logits = model(seq[None, :-1])[0].double()
            target_logit = logits.gather(1, seq[1:, None])
            loss = (torch.logsumexp(logits, 1, keepdim=True) - target_logit)[:, 0]
            learnable = (logits > target_logit).sum(1) < top_k
            # counting the tied logits as larger would make these tokens unlearnable
            ties_decide |= bool((learnable & ((logits >= target_logit).sum(1) - 1 >= top_k)).any())
            score = torch.where(learnable, loss, 0.0).numpy()
            expected.append([np.median(score), loss.mean().item(), learnable.double().mean().item()])
        for chunk_rows in (5, 7, 64):
            got = salt.sequence_scores(model, seqs, top_k=top_k, chunk_rows=chunk_rows)
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=f'{top_k=} {chunk_rows=}')
    assert ties_decide


# ----------------------------------------------------------------------------------------------------------
# a tiny SLM, and the scoring command every test below runs

N_SEQUENCES, BATCH = 2048, 8  # 256 batches: long enough to be killed partway, a few seconds whole


@pytest.fixture(scope='module')
def slm(text_data, slm_and_scores):
    """(checkpoint, data_dir) of the small LM that test_salt.py trains for a few steps."""
    return slm_and_scores[0], text_data


def score_args(slm, out):
    ckpt, text_data = slm
    return ['salt.py', 'score', f'--ckpt={ckpt}', f'--data_dir={text_data}', '--block_size=16',
            f'--max_sequences={N_SEQUENCES}', f'--batch_size={BATCH}', f'--out={out}']


@pytest.fixture(scope='module')
def uninterrupted(slm, tmp_path_factory):
    """Scores of uninterrupted runs: {1: one process, 2: two gloo ranks}."""
    out = tmp_path_factory.mktemp('uninterrupted')
    for nproc in (1, 2):
        run_script(*score_args(slm, out / f'{nproc}.npy'), nproc=nproc)
    return {nproc: np.load(out / f'{nproc}.npy') for nproc in (1, 2)}


def test_two_ranks_score_like_one_process(uninterrupted):
    one, two = uninterrupted[1], uninterrupted[2]
    assert one.shape == (N_SEQUENCES, 3) and not np.isnan(one).any()
    np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# resuming after a kill


def rows_done(tmp_path):
    """Rows of a scoring run's .tmp already written (none while it does not exist: it appears complete)."""
    if not os.path.exists(tmp_path):
        return 0
    return int((~np.isnan(np.load(tmp_path, mmap_mode='r')).any(axis=1)).sum())


def rank_pids(torchrun_pid):
    """{rank: pid} of torchrun's worker processes, from /proc."""
    with open(f'/proc/{torchrun_pid}/task/{torchrun_pid}/children') as f:
        children = [int(pid) for pid in f.read().split()]
    ranks = {}
    for pid in children:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
        if b'RANK' in env:
            ranks[int(env[b'RANK'])] = pid
    return ranks


def kill_partway(args, out, nproc):
    """Start scoring, SIGKILL it (rank 1 under torchrun) once a quarter of the rows are written, and return
    how many rows were written then."""
    start = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                 f'--nproc_per_node={nproc}']
    env = dict(os.environ, OMP_NUM_THREADS='1') if nproc > 1 else os.environ
    process = subprocess.Popen(start + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while rows_done(out + '.tmp') < N_SEQUENCES // 4:
        assert process.poll() is None, f"scoring ended before it could be killed:\n{process.stdout.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(process.pid if nproc == 1 else rank_pids(process.pid)[1], signal.SIGKILL)
    process.communicate(timeout=120)
    assert process.returncode != 0 and not os.path.exists(out)
    return rows_done(out + '.tmp')


@pytest.mark.parametrize('nproc', [1, 2])
def test_killed_scoring_resumes_to_the_same_scores(slm, uninterrupted, tmp_path, nproc):
    out = str(tmp_path / 'scores.npy')
    args = score_args(slm, out)
    done = kill_partway(args, out, nproc)
    assert N_SEQUENCES // 4 <= done < N_SEQUENCES
    rerun = run_script(*args, nproc=nproc)
    left = int(re.search(r'resuming, ([\d,]+) batches', rerun.stdout).group(1).replace(',', ''))
    # the batches written before the kill are not redone (each rank may have been cut off inside one)
    assert left <= N_SEQUENCES // BATCH - done // BATCH + nproc
    assert np.array_equal(np.load(out), uninterrupted[nproc])  # exactly an uninterrupted run's scores
    assert sorted(os.listdir(tmp_path)) == ['scores.json', 'scores.npy']  # nothing temporary left


def test_partial_scores_for_another_teacher_are_refused(slm, uninterrupted, tmp_path):
    out = str(tmp_path / 'scores.npy')
    sequences = data.TokenSequences(slm[1], 'train', 16, max_sequences=N_SEQUENCES)
    partial = uninterrupted[1].copy()
    partial[100:] = np.nan
    with open(out + '.tmp', 'wb') as f:  # as a killed run leaves it, but made for another teacher
        np.save(f, partial)
    with open(out + '.tmp.json', 'w') as f:
        json.dump(salt.score_meta('another-slm@step9', sequences, top_k=10), f)
    result = run_script(*score_args(slm, out), check=False)
    assert result.returncode != 0
    assert f"{out}.tmp: partial scores made for teacher='another-slm@step9'" in result.stderr
    assert 'delete' in result.stderr and np.array_equal(np.load(out + '.tmp'), partial, equal_nan=True)
    os.remove(out + '.tmp.json')  # a .tmp without its metadata cannot be trusted either
    with pytest.raises(ValueError, match='without their metadata'):
        salt.prepare_tmp(out + '.tmp', salt.score_meta('x@step1', sequences, top_k=10))


# ----------------------------------------------------------------------------------------------------------
# the selection report on Pile-format data with subsets


def test_example_text_cannot_break_the_markdown():
    line = 'a ```` b | <c>'
    block = salt.example_block((line + '\n') * 100)
    lines = block.split('\n')
    assert lines[0] == '`````text' and lines[-1] == '`````'  # a longer fence than any backtick run inside
    shown = '\n'.join([line] * 12)  # cut to 12 lines
    assert lines[1:-2] == [line] * 12 and lines[-2] == f"[... {len(line * 100) + 100 - len(shown):,} more characters]"


def write_pile_shards(folder):
    """Two .jsonl.zst shards of real text: Shakespeare paragraphs and stdlib source files, with their subsets."""
    paragraphs = [p for p in open(REAL_TEXT, encoding='utf-8').read().split('\n\n') if p.strip()][:240]
    code = [os.path.join(data.sysconfig.get_paths()['stdlib'], name) for name in
            ('this.py', 'bisect.py', 'colorsys.py', 'keyword.py', 'fnmatch.py', 'glob.py')]
    shards = [[{'text': p, 'meta': {'pile_set_name': 'Gutenberg (PG-19)'}} for p in paragraphs[:200]],
              [{'text': data._read_text(f), 'meta': {'pile_set_name': 'Github'}} for f in code] +
              [{'text': p, 'meta': {'pile_set_name': 'Books|3'}} for p in paragraphs[200:]]]
    paths = []
    for i, docs in enumerate(shards):
        paths.append(str(folder / f'{i:02d}.jsonl.zst'))
        lines = ''.join(json.dumps(d) + '\n' for d in docs)
        with open(paths[-1], 'wb') as f:
            f.write(zstandard.ZstdCompressor().compress(lines.encode()))
    return paths


def report_numbers(md):
    """From selection.md: the selected count, the threshold and {subset: (count, selected)}."""
    selected, total, threshold = re.search(r'Selected \*\*([\d,]+) of ([\d,]+)\*\* sequences: median score '
                                           r'>= \*\*([\d.]+)\*\*', md).groups()
    rows = re.findall(r'^\| ((?:[^|\\]|\\\|)+) \| ([\d,]+) \| [\d.]+% \| ([\d,]+) \|', md, re.M)
    subsets = {name.replace('\\|', '|'): (int(n.replace(',', '')), int(k.replace(',', ''))) for name, n, k in rows}
    return int(selected.replace(',', '')), int(total.replace(',', '')), threshold, subsets


def test_report_on_pile_data_with_subsets(slm, tmp_path):
    pile = str(tmp_path / 'pile')
    run_script('data.py', 'pile', *write_pile_shards(tmp_path), f'--out_dir={pile}')
    scores_file = str(tmp_path / 'scores.npy')
    run_script('salt.py', 'score', f'--ckpt={slm[0]}', f'--data_dir={pile}', '--block_size=16', f'--out={scores_file}')
    out_dir = tmp_path / 'selection'
    result = run_script('salt.py', 'report', f'--scores={scores_file}', f'--data_dir={pile}', '--block_size=16',
                        '--select_fraction=0.3', f'--out_dir={out_dir}')

    sequences = data.TokenSequences(pile, 'train', 16)
    scores = np.load(scores_file)
    picked = salt.select_top(scores, 0.3)
    domains, names = sequences.domains()
    md = (out_dir / 'selection.md').read_text()
    assert md in result.stdout  # printed and saved
    selected, total, threshold, subsets = report_numbers(md)
    assert (selected, total) == (len(picked), len(sequences)) and threshold == f"{scores[picked, 0].min():.4f}"
    assert subsets == {names[i]: (int((domains == i).sum()), int((domains[picked] == i).sum()))
                       for i in np.unique(domains)}
    assert set(subsets) == {'Gutenberg (PG-19)', 'Github', 'Books|3'}
    # examples: the top, middle and bottom of the ranking, decoded, three each
    order = salt.ranking(scores)
    shown = [int(i) for i in re.findall(r'^sequence (\d+) \(rank', md, re.M)]
    middle = (len(order) - 3) // 2
    assert shown == [*order[:3], *order[middle:middle + 3], *order[-3:]]
    assert tiktoken.get_encoding(data.ENCODING).decode(sequences.get([order[0]])[0].tolist())[:40] in md
    assert (out_dir / 'score_histogram.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (out_dir / 'score_histogram.png').stat().st_size > 10_000

    # data tokenized before data.py recorded subsets: the report still works and says why there are no shares
    meta = json.loads((tmp_path / 'pile' / 'meta.json').read_text())
    del meta['subsets']
    (tmp_path / 'pile' / 'meta.json').write_text(json.dumps(meta))
    result = run_script('salt.py', 'report', f'--scores={scores_file}', f'--data_dir={pile}', '--block_size=16',
                        '--select_fraction=0.3', f'--out_dir={out_dir}')
    assert 'Subset shares unavailable' in result.stdout and 're-tokenize' in result.stdout
    assert report_numbers(result.stdout)[:3] == (selected, total, threshold)
