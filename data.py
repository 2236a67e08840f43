"""Tokens on disk -> batches.

Prepare a token dataset (GPT-2 BPE via tiktoken, EOT before every document):

    python data.py stdlib [--out_dir data/stdlib]           # default corpus: this Python's stdlib .py files
    python data.py text FILE... --out_dir DIR               # plain text files, one document each
    python data.py pile SHARD.jsonl.zst... --out_dir DIR    # Pile-format jsonl / jsonl.zst shards
    common flags: --val_fraction 0.05 --shard_tokens 100000000

This writes DIR/{train,val}_000000.bin ... in the llm.c shard format (256 int32 header
[MAGIC, VERSION, token_count, 0...] then uint16 tokens) and DIR/meta.json.

Training reads them back with TokenSequences (fixed windows of block_size+1 tokens, each with a
stable integer id, so a method like SALT_DS can select sequences by id) and BatchLoader (a seeded
per-epoch permutation of ids, cut into batches and strided over ranks, resumable via state_dict).
"""
import argparse
import glob
import hashlib
import io
import json
import os
import sys
import secrets
import sysconfig
import time
import zlib

import numpy as np
import tiktoken
import torch
import zstandard

ENCODING = "r50k_base"  # identical to GPT-2's BPE
EOT = 50256  # <|endoftext|>, written before every document
VOCAB_SIZE = 50257
MAGIC = 20240520  # llm.c / modded-nanogpt shard magic
VERSION = 1
HEADER_INTS = 256
SHARD_TOKENS = 100_000_000
SPLITS = ("train", "val")
BATCH_CHARS = 1 << 22  # characters per encode_ordinary_batch call: big enough to keep all threads busy

# -----------------------------------------------------------------------------
# shard files


def _atomic_write(path, chunks):
    """Write byte chunks to path so that no half-written file ever exists under that name."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # same folder: replace is atomic
    try:
        with open(tmp, "xb") as f:  # unlike mkstemp, keeps the usual umask permissions
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bin(path, tokens):
    """Write tokens as one shard: 256 int32 header, then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise ValueError(f"{path}: tokens must lie in [0, 65536) to be stored as uint16")
    if tokens.size >= 1 << 31:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit the int32 header count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    _atomic_write(path, [header.tobytes(), tokens.astype("<u2").tobytes()])


def read_bin(path):
    """Read-only uint16 token array of a shard: llm.c format, or a headerless nanoGPT uint16 file.

    A headerless GPT-2 file cannot be mistaken for a header: MAGIC's low uint16 is 54472 >= VOCAB_SIZE.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: empty file")
    first = np.fromfile(path, dtype="<i4", count=1) if size >= 4 else np.zeros(1, "<i4")
    if first[0] != MAGIC:  # headerless: the whole file is tokens
        if size % 2:
            raise ValueError(f"{path}: headerless uint16 file has an odd byte size {size}")
        return np.memmap(path, dtype="<u2", mode="r")
    header_bytes = HEADER_INTS * 4
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS:
        raise ValueError(f"{path}: truncated header ({size} bytes)")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    if size != header_bytes + 2 * count:
        raise ValueError(f"{path}: header says {count} tokens ({header_bytes + 2 * count} bytes) "
                         f"but the file has {size} bytes (truncated or corrupt)")
    if count == 0:  # numpy cannot memory-map zero bytes
        tokens = np.zeros(0, dtype="<u2")
        tokens.flags.writeable = False
        return tokens
    return np.memmap(path, dtype="<u2", mode="r", offset=header_bytes, shape=(count,))


# -----------------------------------------------------------------------------
# document sources: each yields (split, text) in a deterministic order


def _is_val(key, val_fraction):
    """Split by a hash of a stable key, so adding documents never moves existing ones."""
    # round(): 0.07 * 1000 is 70.00000000000001, which would also admit bucket 70
    return zlib.crc32(key.encode("utf-8")) % 1000 < round(val_fraction * 1000)


def _read_text(path):
    # errors="replace": 4 stdlib files are deliberately not UTF-8 (source-encoding tests); keeping them with
    # U+FFFD is deterministic and keeps the file set equal to "every .py file". Bytes, so no newline translation.
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def stdlib_files(root=None):
    """Relative paths (posix) of every .py file of the stdlib, without site-/dist-packages, in a fixed
    pseudo-random order (by crc32 of the path): any prefix of the corpus, such as the first train_sequences
    of train.py, is then a sample of the whole library rather than of its first letters."""
    root = root or sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
        rel = os.path.relpath(folder, root)
        paths += [os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/") for f in files if f.endswith(".py")]
    return sorted(paths, key=lambda p: (zlib.crc32(p.encode("utf-8")), p))


def stdlib_documents(val_fraction=0.05, root=None):
    root = root or sysconfig.get_paths()["stdlib"]
    for rel in stdlib_files(root):
        yield ("val" if _is_val(rel, val_fraction) else "train"), _read_text(os.path.join(root, rel))


def text_documents(paths, val_fraction=0.05):
    """Each file is one document, split by a hash of its basename. A single file would land wholly in one
    split, so instead its last val_fraction (cut at a line start) becomes the val document (as nanoGPT's
    shakespeare prepare does)."""
    if len(paths) == 1:
        text = _read_text(paths[0])
        target = round(len(text) * (1 - val_fraction))
        cut = len(text) if val_fraction == 0 else (text.rfind("\n", 0, target) + 1 or target)
        yield "train", text[:cut]
        if cut < len(text):
            yield "val", text[cut:]
        return
    for path in paths:
        yield ("val" if _is_val(os.path.basename(path), val_fraction) else "train"), _read_text(path)


def _open_jsonl(path):
    """Binary lines of a .jsonl or .jsonl.zst file, streamed (never the whole file in memory). Bytes, not
    text: each line is decoded on its own, so a UTF-8 error names its exact line."""
    raw = open(path, "rb")
    if not path.endswith(".zst"):
        return raw
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))


def pile_documents(paths, val_fraction=0.05):
    """Pile format: one JSON object a line with "text" (and "meta": {"pile_set_name": ...}, unused here).
    A document goes to val by a hash of f"{basename}:{line_number}"."""
    for path in paths:
        name = os.path.basename(path)
        with _open_jsonl(path) as lines:
            number = 0
            try:
                for number, line in enumerate(lines, 1):
                    if line.strip():  # tolerate blank lines (e.g. a trailing newline)
                        text = _pile_text(path, number, line)
                        yield ("val" if _is_val(f"{name}:{number}", val_fraction) else "train"), text
            except zstandard.ZstdError as e:  # corrupt compressed data, met while reading the next line
                raise ValueError(f"{path}: line {number + 1}: {e}") from e


def _pile_text(path, number, line):
    try:
        doc = json.loads(line.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError or JSONDecodeError
        raise ValueError(f"{path}: line {number}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise ValueError(f'{path}: line {number}: expected a JSON object with a string "text"')
    return doc["text"]


# -----------------------------------------------------------------------------
# tokenization into shards


class ShardWriter:
    """Collects one split's tokens and writes {out_dir}/{split}_{k:06d}.bin shards of shard_tokens tokens."""

    def __init__(self, out_dir, split, shard_tokens):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.pending, self.pending_tokens = [], 0
        self.shards, self.tokens, self.documents = [], 0, 0

    def add(self, document_tokens):
        self.pending.append(np.array([EOT] + document_tokens, dtype=np.uint16))  # EOT separates documents
        self.pending_tokens += len(document_tokens) + 1
        self.tokens += len(document_tokens) + 1
        self.documents += 1
        while self.pending_tokens >= self.shard_tokens:  # a document may continue in the next shard
            buffer = np.concatenate(self.pending)
            self._write(buffer[: self.shard_tokens])
            self.pending, self.pending_tokens = [buffer[self.shard_tokens:]], len(buffer) - self.shard_tokens

    def close(self):
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        # shards left over from an earlier, larger run would otherwise be read as part of this split
        for path in glob.glob(os.path.join(self.out_dir, f"{self.split}_*.bin")):
            if os.path.basename(path) not in self.shards:
                os.remove(path)

    def _write(self, tokens):
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_bin(os.path.join(self.out_dir, name), tokens)
        self.shards.append(name)


def _batches(documents, max_chars=BATCH_CHARS):
    batch, chars = [], 0
    for split, text in documents:
        batch.append((split, text))
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize(documents, out_dir, source, shard_tokens=SHARD_TOKENS):
    """Tokenize (split, text) documents into shards under out_dir and write meta.json; returns the meta dict."""
    if not 0 < shard_tokens < 1 << 31:
        raise ValueError(f"shard_tokens must be in [1, 2**31), got {shard_tokens}")
    os.makedirs(out_dir, exist_ok=True)
    enc = tiktoken.get_encoding(ENCODING)
    writers = {split: ShardWriter(out_dir, split, shard_tokens) for split in SPLITS}
    start = last_print = time.time()
    for batch in _batches(documents):
        encoded = enc.encode_ordinary_batch([text for _, text in batch], num_threads=os.cpu_count())
        for (split, _), tokens in zip(batch, encoded):
            writers[split].add(tokens)
        if time.time() - last_print < 10:
            continue
        last_print, total = time.time(), sum(w.tokens for w in writers.values())
        print(f"{out_dir}: {total:,} tokens, {sum(w.documents for w in writers.values()):,} documents, "
              f"{total / (time.time() - start):,.0f} tokens/s", flush=True)
    for w in writers.values():
        w.close()
    meta = {"encoding": ENCODING, "vocab_size": VOCAB_SIZE, "eot": EOT, "source": source,
            "splits": {s: {"shards": w.shards, "tokens": w.tokens, "documents": w.documents}
                       for s, w in writers.items()}}
    _atomic_write(os.path.join(out_dir, "meta.json"), [json.dumps(meta, indent=2).encode("utf-8")])
    total, seconds = sum(w.tokens for w in writers.values()), time.time() - start
    print(f"{out_dir}: done, {total:,} tokens in {seconds:.1f}s ({total / seconds:,.0f} tokens/s): " +
          ", ".join(f"{s} {w.tokens:,} tokens / {w.documents:,} documents" for s, w in writers.items()))
    return meta


# -----------------------------------------------------------------------------
# training sequences and batches


class TokenSequences:
    """Fixed windows of block_size+1 tokens at stride block_size inside each shard of a split.

    Window i of a shard is tokens[i*T : i*T+T+1] (windows never cross shards); its id is the shard's
    offset + i, over the split's shards in sorted order, so ids are stable for a given data_dir.
    max_sequences keeps only ids [0, max_sequences), e.g. a small demo pool.
    """

    def __init__(self, data_dir, split, block_size, max_sequences=None):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        # {split}_000000.bin ... from this file, or a nanoGPT prepare.py output's single {split}.bin
        self.shards = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin"))) or glob.glob(
            os.path.join(data_dir, f"{split}.bin"))
        if not self.shards:
            raise FileNotFoundError(f"no {split}_*.bin shards in {data_dir!r}; prepare them first, e.g. "
                                    f"`python data.py stdlib --out_dir {data_dir}` (see python data.py -h)")
        self.tokens = [read_bin(path) for path in self.shards]
        for path, tokens in zip(self.shards, self.tokens):
            if tokens.size and int(tokens.max()) >= VOCAB_SIZE:  # one vectorized pass at open
                raise ValueError(f"{path}: token id {int(tokens.max())} >= vocab size {VOCAB_SIZE}")
        counts = [max(0, (len(t) - 1) // block_size) for t in self.tokens]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_sequences = int(self.offsets[-1]) if max_sequences is None else min(max_sequences, int(self.offsets[-1]))

    def __len__(self):
        return self.n_sequences

    def get(self, ids):
        """LongTensor (len(ids), block_size+1) of the windows with these ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sequence ids must be in [0, {len(self)})")
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        T = self.block_size
        out = np.empty((ids.size, T + 1), dtype=np.int64)
        for row, (s, i) in enumerate(zip(shard, ids - self.offsets[shard])):
            out[row] = self.tokens[s][i * T: i * T + T + 1]
        return torch.from_numpy(out)

    def fingerprint(self):
        """Cheap hex id of the data: each shard's name, size and first/last 64 KiB, block_size, len(self)."""
        h = hashlib.sha256(f"block_size={self.block_size} sequences={len(self)}".encode())
        edge = 32 * 1024  # tokens in 64 KiB
        for path, tokens in zip(self.shards, self.tokens):
            h.update(f"{os.path.basename(path)}:{len(tokens)}".encode())
            h.update(np.ascontiguousarray(tokens[:edge]).tobytes())
            h.update(np.ascontiguousarray(tokens[-edge:]).tobytes())
        return h.hexdigest()


class BatchLoader:
    """Batches of sequences: epoch e shuffles the allowed ids with default_rng([seed, e]), cuts the
    permutation into blocks of batch_size, and rank r reads blocks r, r+world_size, ...

    So world_size=2 with 1 accumulation step sees the same global batches as world_size=1 with 2
    accumulation steps (micro-step m of step s reads block 2s+m). Blocks left over at an epoch's end
    are dropped so every rank has the same number of batches.
    """

    def __init__(self, sequences, batch_size, rank=0, world_size=1, seed=0, ids=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.sequences, self.batch_size, self.rank, self.world_size, self.seed = (
            sequences, batch_size, rank, world_size, seed)
        # a subset (e.g. SALT_DS's selection) is a set: sorted and deduplicated, so its order can't matter
        self.ids = np.arange(len(sequences)) if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
        if self.ids.size and (self.ids[0] < 0 or self.ids[-1] >= len(sequences)):
            raise IndexError(f"ids must be in [0, {len(sequences)})")
        self.batches_per_epoch = len(self.ids) // batch_size // world_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.ids)} sequences are too few for batch_size*world_size = "
                             f"{batch_size}*{world_size}; use a smaller batch or more data")
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self):
        if self._perm_epoch != self.epoch:  # own generator per epoch: no global RNG, exact resume
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.ids)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self):
        """(x, y) LongTensors (batch_size, block_size), y = x shifted by one token."""
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        block = self.position * self.world_size + self.rank
        ids = self._permutation()[block * self.batch_size: (block + 1) * self.batch_size]
        self.position += 1
        windows = self.sequences.get(ids)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self):
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state):
        if not 0 <= state["position"] <= self.batches_per_epoch:  # saved with another batch_size/world_size?
            raise ValueError(f"position {state['position']} not in [0, {self.batches_per_epoch}] batches per epoch")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--val_fraction", type=float, default=0.05, help="share of documents for val (0.001 steps)")
    common.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="max tokens per .bin shard")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    p = sub.add_parser("stdlib", parents=[common], help="this interpreter's standard library .py files")
    p.add_argument("--out_dir", default="data/stdlib")
    p = sub.add_parser("text", parents=[common], help="plain text files, one document each")
    p.add_argument("files", nargs="+")
    p.add_argument("--out_dir", required=True)
    p = sub.add_parser("pile", parents=[common], help="Pile-format .jsonl / .jsonl.zst shards")
    p.add_argument("files", nargs="+")
    p.add_argument("--out_dir", required=True)
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")

    if args.source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        source = {"kind": "stdlib", "root": root, "python": sys.version.split()[0]}
        documents = stdlib_documents(args.val_fraction, root)
    elif args.source == "text":
        source = {"kind": "text", "files": args.files}
        documents = text_documents(args.files, args.val_fraction)
    else:
        source = {"kind": "pile", "files": args.files}
        documents = pile_documents(args.files, args.val_fraction)
    source["val_fraction"] = args.val_fraction
    return tokenize(documents, args.out_dir, source, args.shard_tokens)


if __name__ == "__main__":
    main()
