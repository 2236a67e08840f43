"""Tokens on disk -> batches.

Prepare a token dataset (GPT-2 BPE via tiktoken, EOT before every document):

    python data.py stdlib [--out_dir data/stdlib]           # default corpus: this Python's stdlib .py files
    python data.py text FILE... --out_dir DIR               # plain text files, one document each
    python data.py pile SHARD.jsonl.zst... --out_dir DIR    # Pile-format jsonl / jsonl.zst shards
    python data.py tree DIR... --include '*.py' '*.md' [--exclude '*/tests/*'] --out_dir DIR  # files under DIRs
    python data.py tree --python --include '*.py' '*.md' '*.rst' '*.txt' --out_dir data/python
                                                            # this Python's stdlib and installed packages
    common flags: --val_fraction 0.05 --shard_tokens 100000000

`pile` tokenizes its input files in parallel, one worker process per file (as many at a time as this process
may use CPUs), each streaming its file; run again after an interruption, it skips the files already done, with
the same result. `tree` does the same with groups of files. stdlib and text are one input, tokenized in this
process.

`tree` reads the files under directories (name the DIRs before the patterns; --python adds this Python's
sysconfig "stdlib", "purelib" and "platlib" directories):
- which: those whose name matches an --include pattern and whose path under its DIR matches no --exclude
  pattern (shell-style, case-sensitive; `*` matches "/" too: '*/tests/*' leaves out every tests folder below
  the top level, 'test/*' the top-level one). A DIR inside another (site-packages in the stdlib) is read only
  as itself.
- order: one document per file, by crc32 of its path under its DIR, then that path, then the DIR's place on
  the command line: as with stdlib, any prefix of the corpus samples all of it. Val split: by a hash of that path.
- symlinks are followed, but no directory is walked and no file read twice (same device and inode): real
  paths first, then the symlinks met, in sorted order, round after round; the path with fewest symlinks wins.
- skipped, each counted and named with its reason in meta.json: broken symlink, symlink loop, reached twice (a
  file or directory reached already by another path), not a regular file (a FIFO, a device), unreadable
  (permission or I/O error), not text (a NUL byte, or not UTF-8: stdlib keeps its few deliberately non-UTF-8
  files, with U+FFFD for the bad bytes, but a tree may hold anything, and a file that is not UTF-8 is most
  likely not text).
- inputs: the ordered files cut into contiguous groups of about --input_bytes (at most 1000 groups), from the
  file list alone, so a rerun finds the same inputs; an input's manifest records a hash of its files' paths,
  sizes and mtimes, so a changed tree is tokenized again, not resumed.

Files written to DIR, each atomically (a name never shows a half-written file):
- {split}_{k:06d}.bin, k = input * 1000 + part: at most shard_tokens tokens of one input, in the llm.c shard
  format (256 int32 header [MAGIC, VERSION, token_count, 0...] then uint16 tokens). Sorted names follow the
  inputs' order, so the split's documents are in input order, whatever order the workers finish in.
- {split}_{k:06d}.docs.npy: int64 rows (offset of the document's EOT in the shard, subset index into its
  input's "subsets") of each document that starts in the shard; a shard may begin with the end of a document
  started in the previous shard of its input.
- input_{i:03d}.json: input i's manifest (what it was made from, its subsets, shards, token and document
  counts; for tree, the files read and skipped), written after its shards: it marks the input done.
- meta.json, written last: encoding, source (for tree: the roots, patterns, files and bytes read, tokens, and
  the files skipped, counted per reason with the first 100 paths of each), "subsets" (every subset name,
  sorted), per split the shards and counts, and "inputs", the manifests. Subsets: the Pile's
  meta.pile_set_name ("unknown" when absent); the stdlib file's top-level package ("stdlib" for a top-level
  module); the tree file's top-level package, the first component of its path under its DIR ("torch",
  "numpy-2.4.6.dist-info"), or the DIR's own name for a file directly in it ("site-packages"), a name being
  one subset whichever DIR it comes from; "text" for text files.

Training reads them back with TokenSequences (fixed windows of block_size+1 tokens, each with a
stable integer id, so a method like SALT_DS can select sequences by id; domains() gives each window's
subset) and BatchLoader (a seeded per-epoch permutation of ids, cut into batches and strided over ranks,
resumable via state_dict).
"""
import argparse
import errno
import fnmatch
import glob
import hashlib
import io
import json
import multiprocessing
import os
import sys
import secrets
import signal
import stat
import subprocess
import sysconfig
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import tiktoken
import torch

ENCODING = "r50k_base"  # identical to GPT-2's BPE
EOT = 50256  # <|endoftext|>, written before every document
VOCAB_SIZE = 50257
MAGIC = 20240520  # llm.c / modded-nanogpt shard magic
VERSION = 1
HEADER_INTS = 256
SHARD_TOKENS = 100_000_000
SPLITS = ("train", "val")
PARTS = 1000  # output shard k = input * PARTS + part: six digits hold 1000 inputs of up to 1000 shards each
EDGE_TOKENS = 32 * 1024  # tokens read from each end of a shard when opening it (64 KiB)
BATCH_CHARS = 1 << 22  # characters per encode_ordinary_batch call: big enough to keep all threads busy
INPUT_BYTES = 1 << 22  # tree: bytes of files per input, the unit of parallel work and of resuming (~1M tokens)
SKIPPED_PATHS = 100  # tree: paths listed per reason for skipping a file in meta.json (the counts are complete)

# -----------------------------------------------------------------------------
# what every command shares: errors a user can act on, and the code version behind a result


class InputError(ValueError):
    """Bad input the user can fix: a file, a config key or a value, named in the message. The project's
    commands print its message as one line and exit with status 1; any other exception is a bug and keeps
    its traceback."""


def report_input_errors():
    """Install the command-line behaviour of InputError for this process (every script calls it first)."""
    default_hook = sys.excepthook

    def hook(kind, error, traceback):
        if issubclass(kind, InputError):
            print(f"error: {error}", file=sys.stderr)
        else:
            default_hook(kind, error, traceback)
    sys.excepthook = hook


def git_commit():
    """The commit of this code, recorded with every result (or 'unknown' outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

# -----------------------------------------------------------------------------
# shard files


def atomic_write(path, chunks):
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
        raise InputError(f"{path}: tokens must lie in [0, 65536) to be stored as uint16")
    if tokens.size >= 1 << 31:
        raise InputError(f"{path}: {tokens.size} tokens do not fit the int32 header count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    atomic_write(path, [header.tobytes(), tokens.astype("<u2").tobytes()])


def _write_npy(path, array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, [buffer.getvalue()])


def write_json(path, obj):
    atomic_write(path, [json.dumps(obj, indent=2).encode("utf-8")])


def read_bin(path):
    """Read-only uint16 token array of a shard: llm.c format, or a headerless nanoGPT uint16 file.

    A headerless GPT-2 file cannot be mistaken for a header: MAGIC's low uint16 is 54472 >= VOCAB_SIZE.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise InputError(f"{path}: empty file")
    first = np.fromfile(path, dtype="<i4", count=1) if size >= 4 else np.zeros(1, "<i4")
    if first[0] != MAGIC:  # headerless: the whole file is tokens
        if size % 2:
            raise InputError(f"{path}: headerless uint16 file has an odd byte size {size}")
        return np.memmap(path, dtype="<u2", mode="r")
    header_bytes = HEADER_INTS * 4
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS:
        raise InputError(f"{path}: truncated header ({size} bytes)")
    if header[1] != VERSION:
        raise InputError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    if size != header_bytes + 2 * count:
        raise InputError(f"{path}: header says {count} tokens ({header_bytes + 2 * count} bytes) "
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
    # surrogateescape: a file name that is not UTF-8 comes from os as lone surrogates; valid text is unchanged
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % 1000 < round(val_fraction * 1000)


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


def stdlib_documents(val_fraction=0.05, root=None, subsets=False):
    """(split, text) of each stdlib file; with subsets=True (split, text, subset), the subset being the file's
    top-level package ("asyncio", "test", ...) or "stdlib" for a top-level module."""
    root = root or sysconfig.get_paths()["stdlib"]
    for rel in stdlib_files(root):
        split, text = ("val" if _is_val(rel, val_fraction) else "train"), _read_text(os.path.join(root, rel))
        yield (split, text, rel.split("/")[0] if "/" in rel else "stdlib") if subsets else (split, text)


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


def _jsonl_lines(path):
    """Binary lines of a .jsonl or .jsonl.zst file, streamed (never the whole file in memory). Bytes, not text:
    each line is decoded on its own, so a UTF-8 error names its exact line; so does corrupt compressed data."""
    with open(path, "rb") as raw:
        if not path.endswith(".zst"):
            yield from raw
            return
        import zstandard  # here, not at the top: only .zst inputs need it
        number = 0
        try:
            for number, line in enumerate(io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), 1):
                yield line
        except zstandard.ZstdError as e:  # met while reading the next line
            raise InputError(f"{path}: line {number + 1}: {e}") from e


def pile_documents(paths, val_fraction=0.05, subsets=False):
    """Pile format: one JSON object a line with "text" and "meta": {"pile_set_name": ...}. Yields (split, text),
    or (split, text, pile_set_name) with subsets=True ("unknown" when a line has none). A document goes to val
    by a hash of f"{basename}:{line_number}"."""
    for path in paths:
        name = os.path.basename(path)
        for number, line in enumerate(_jsonl_lines(path), 1):
            if line.strip():  # tolerate blank lines (e.g. a trailing newline)
                text, subset = _pile_record(path, number, line)
                split = "val" if _is_val(f"{name}:{number}", val_fraction) else "train"
                yield (split, text, subset) if subsets else (split, text)


def _pile_record(path, number, line):
    try:
        doc = json.loads(line.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError or JSONDecodeError
        raise InputError(f"{path}: line {number}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise InputError(f'{path}: line {number}: expected a JSON object with a string "text"')
    meta = doc.get("meta") or {}
    subset = meta.get("pile_set_name", "unknown") if isinstance(meta, dict) else None
    if not isinstance(subset, str):
        raise InputError(f'{path}: line {number}: "meta" must be an object whose "pile_set_name" is a string')
    return doc["text"], subset


# a tree of files (the rules are at the top of this file)


def python_roots():
    """This Python's standard library and site-packages directories (sysconfig's "stdlib", "purelib" and
    "platlib"), each once, those that exist."""
    paths = sysconfig.get_paths()
    return [p for p in dict.fromkeys(paths[key] for key in ("stdlib", "purelib", "platlib")) if os.path.isdir(p)]


def tree_roots(roots):
    """The roots as absolute paths, each directory once (under the first path given to it)."""
    if not roots:
        raise InputError("tree: name the directories to read (DIR ...), or --python")
    unique = {}
    for root in roots:
        if not os.path.isdir(root):
            raise InputError(f"{root}: {'not a directory' if os.path.exists(root) else 'no such directory'}")
        unique.setdefault(os.path.realpath(root), os.path.abspath(root))
    return list(unique.values())


def tree_files(roots, include, exclude=()):
    """What `tree` reads: ([(path, rel, subset, bytes, mtime_ns)] of the files in corpus order, and
    {reason: {"count": n, "paths": [first paths]}} of those skipped so far), rel being the path under its root
    (posix). Files that are not text are found only when read (tree_documents)."""
    roots = tree_roots(roots)
    if not include:
        raise InputError("tree: no --include pattern: name the files to read, e.g. --include '*.py' '*.md'")
    walk = _TreeWalk(roots, include, exclude)
    for i, root in enumerate(roots):
        walk.walk(i, root)
    while walk.links:  # each round follows the symlinks met in the one before, in sorted order
        links, walk.links = sorted(walk.links), []
        for i, path in links:
            walk.follow(i, path)
    if not walk.files:
        skipped = "".join(f", {v['count']} {reason}" for reason, v in sorted(walk.skipped.items()))
        raise InputError(f"no file to read under {' '.join(roots)} matches --include {' '.join(include)}"
                         + (f" and no --exclude {' '.join(exclude)}" if exclude else "") + skipped)
    files = sorted(walk.files, key=lambda f: (zlib.crc32(f[2].encode("utf-8", "surrogateescape")), f[2], f[0]))
    return [f[1:] for f in files], walk.skipped


class _TreeWalk:
    """The walk of tree_files: the directories walked and files taken, by (device, inode), so that nothing is
    read twice and no symlink loop is followed; symlinks met are kept in self.links for the next round."""

    def __init__(self, roots, include, exclude):
        self.roots, self.include, self.exclude = roots, include, exclude
        self.root_ids = {_inode(os.stat(root)) for root in roots}
        self.seen, self.taken = set(self.root_ids), set()  # directories walked, files taken
        self.files, self.skipped, self.links = [], {}, []

    def walk(self, i, top):
        """Walk directory top of root i, real paths only."""
        for folder, dirs, names in os.walk(top, onerror=lambda e: _skip(self.skipped, "unreadable", e.filename)):
            kept = []
            for name in sorted(dirs):  # sorted: which of two paths to a directory wins must not depend on listdir
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    self.links.append((i, path))
                    continue
                st, reason = _stat(path)
                if reason:
                    _skip(self.skipped, reason, path)
                elif _inode(st) in self.root_ids:
                    pass  # a root is read as itself, not as part of another
                elif _inode(st) in self.seen:
                    _skip(self.skipped, "reached twice", path)  # e.g. a bind mount
                else:
                    self.seen.add(_inode(st))
                    kept.append(name)
            dirs[:] = kept
            for name in sorted(names):
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    self.links.append((i, path))
                else:
                    self.take(i, path, *_stat(path))

    def follow(self, i, path):
        """Follow a symlink of root i met in the previous round: walk its directory, or take its file."""
        st, reason = _stat(path)
        if st is None or not stat.S_ISDIR(st.st_mode):
            self.take(i, path, st, reason)
        elif _inode(st) in self.seen:
            target, here = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
            loop = os.path.commonpath([target, here]) == target  # it points at a directory that holds it
            _skip(self.skipped, "symlink loop" if loop else "reached twice", path)
        else:
            self.seen.add(_inode(st))
            self.walk(i, path)

    def take(self, i, path, st, reason):
        """Take file path of root i (st: its os.stat, or None and the reason it failed) if the patterns want it."""
        rel = os.path.relpath(path, self.roots[i]).replace(os.sep, "/")
        if (not any(fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], p) for p in self.include)
                or any(fnmatch.fnmatchcase(rel, p) for p in self.exclude)):
            return
        if reason is None and not stat.S_ISREG(st.st_mode):
            reason = "not a regular file"  # reading a FIFO would wait forever
        elif reason is None and _inode(st) in self.taken:
            reason = "reached twice"
        if reason:
            return _skip(self.skipped, reason, path)
        self.taken.add(_inode(st))
        subset = rel.split("/")[0] if "/" in rel else os.path.basename(self.roots[i]) or self.roots[i]
        self.files.append((i, path, rel, subset, st.st_size, st.st_mtime_ns))


def _inode(st):
    return st.st_dev, st.st_ino


def _stat(path):
    """(os.stat of path, following symlinks, None), or (None, the reason to skip it)."""
    try:
        return os.stat(path), None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "symlink loop"
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
            return None, "broken symlink"
        return None, "unreadable"


def _skip(skipped, reason, path):
    entry = skipped.setdefault(reason, {"count": 0, "paths": []})
    entry["count"] += 1
    if len(entry["paths"]) < SKIPPED_PATHS:  # bounded: a tree may hold a million binaries named *.txt
        entry["paths"].append(path)


def tree_documents(files, val_fraction=0.05, read=None):
    """(split, text, subset) of each text file of files [(path, rel, subset), ...], in order; a file goes to val
    by a hash of rel. The others are skipped: unreadable, or not text (a NUL byte, or not UTF-8). With a dict
    `read`, count in it, as they are read, the files and bytes read and those skipped."""
    read = {} if read is None else read
    read.update(files=0, bytes=0, skipped={})
    for path, rel, subset in files:
        try:
            with open(path, "rb") as f:  # bytes: no newline translation
                raw = f.read()
        except OSError:
            raw = None
        text, reason = _decode_text(raw) if raw is not None else (None, "unreadable")
        if reason:
            _skip(read["skipped"], reason, path)
            continue
        read["files"] += 1
        read["bytes"] += len(raw)
        yield ("val" if _is_val(rel, val_fraction) else "train"), text, subset


def _decode_text(raw):
    """(text, None) for UTF-8 without NUL bytes, else (None, the reason it is not text)."""
    if b"\0" in raw:
        return None, "not text (NUL byte)"  # binary: text has no use for NUL
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "not text (not UTF-8)"


# -----------------------------------------------------------------------------
# tokenization into shards


class ShardWriter:
    """One split of one input -> {split}_{k:06d}.bin shards of shard_tokens tokens, k = input * PARTS + part,
    each with its .docs.npy: (EOT offset, subset index) of every document that starts in it."""

    def __init__(self, out_dir, split, index, shard_tokens):
        self.out_dir, self.split, self.index, self.shard_tokens = out_dir, split, index, shard_tokens
        self.pending, self.pending_tokens, self.pending_docs = [], 0, []
        self.shards, self.tokens, self.documents = [], 0, 0

    def add(self, document_tokens, subset):
        self.pending_docs.append((self.pending_tokens, subset))
        self.pending.append(np.array([EOT] + document_tokens, dtype=np.uint16))  # EOT separates documents
        self.pending_tokens += len(document_tokens) + 1
        self.tokens += len(document_tokens) + 1
        self.documents += 1
        while self.pending_tokens >= self.shard_tokens:  # a document may continue in the next shard
            self._write(self.shard_tokens)

    def close(self):
        if self.pending_tokens:
            self._write(self.pending_tokens)

    def _write(self, n):
        """Write the first n pending tokens as the next shard, with the documents that start in them."""
        part = len(self.shards)
        if part == PARTS:
            raise InputError(f"input {self.index} needs more than {PARTS} {self.split} shards: raise --shard_tokens")
        buffer, docs = np.concatenate(self.pending), np.array(self.pending_docs, dtype=np.int64).reshape(-1, 2)
        name = f"{self.split}_{self.index * PARTS + part:06d}"
        write_bin(os.path.join(self.out_dir, name + ".bin"), buffer[:n])
        _write_npy(os.path.join(self.out_dir, name + ".docs.npy"), docs[docs[:, 0] < n])
        self.shards.append(name + ".bin")
        # copy: a view would keep the whole written buffer alive
        self.pending, self.pending_tokens = [buffer[n:].copy()], len(buffer) - n
        self.pending_docs = (docs[docs[:, 0] >= n] - [n, 0]).tolist()


def _batches(documents, max_chars=BATCH_CHARS):
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document[1])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _manifest_path(out_dir, index):
    return os.path.join(out_dir, f"input_{index:03d}.json")


def _tokenize_input(index, documents, out_dir, shard_tokens, job, threads, read=None):
    """Tokenize input `index`'s (split, text, subset) documents into its shards, then write its manifest: the
    manifest exists only once every shard of the input does. `job` records what the input was made from;
    `read`, if given, what the documents' reader counted while they were read (tree_documents)."""
    enc = tiktoken.get_encoding(ENCODING)
    writers = {split: ShardWriter(out_dir, split, index, shard_tokens) for split in SPLITS}
    subsets = {}  # name -> index, in order of first appearance in this input
    start = last_print = time.time()
    for batch in _batches(documents):
        encoded = enc.encode_ordinary_batch([text for _, text, _ in batch], num_threads=threads)
        for (split, _, subset), tokens in zip(batch, encoded):
            writers[split].add(tokens, subsets.setdefault(subset, len(subsets)))
        if time.time() - last_print >= 60:
            last_print, total = time.time(), sum(w.tokens for w in writers.values())
            print(f"{out_dir} input {index}: {total:,} tokens, {total / (last_print - start):,.0f} tokens/s",
                  flush=True)
    for w in writers.values():
        w.close()
    manifest = {"job": job, "subsets": list(subsets),
                "splits": {s: {"shards": w.shards, "tokens": w.tokens, "documents": w.documents}
                           for s, w in writers.items()}}
    if read is not None:
        manifest["read"] = read
    write_json(_manifest_path(out_dir, index), manifest)
    return manifest


def _is_done(out_dir, index, job):
    """Whether an earlier run finished input `index` from the same job and its shards are still there."""
    path = _manifest_path(out_dir, index)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        manifest = json.load(f)
    shards = [os.path.join(out_dir, name) for split in manifest["splits"].values() for name in split["shards"]]
    return manifest["job"] == job and all(os.path.exists(p) and os.path.exists(_docs_path(p)) for p in shards)


def _docs_path(shard_path):
    return shard_path[:-len(".bin")] + ".docs.npy"


def _begin(out_dir, shard_tokens):
    if not 0 < shard_tokens < 1 << 31:
        raise InputError(f"shard_tokens must be in [1, 2**31), got {shard_tokens}")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):  # meta.json marks a complete directory
        os.remove(os.path.join(out_dir, "meta.json"))
    return time.time()


def _read_manifests(out_dir, n_inputs):
    manifests = []
    for index in range(n_inputs):
        with open(_manifest_path(out_dir, index)) as f:
            manifests.append(json.load(f))
    return manifests


def _finish(out_dir, source, manifests, tokenized, start):
    """Gather the inputs' manifests into meta.json (written last), after deleting what this run did not make:
    shards of an earlier, larger run, which would otherwise be read as part of a split, and the temporary
    files of a killed one. `tokenized`: the inputs tokenized by this run, for the speed report."""
    splits = {s: {"shards": [name for m in manifests for name in m["splits"][s]["shards"]],
                  "tokens": sum(m["splits"][s]["tokens"] for m in manifests),
                  "documents": sum(m["splits"][s]["documents"] for m in manifests)} for s in SPLITS}
    for split, counts in splits.items():  # every document is an EOT and its text: only EOTs = no text at all
        if counts["tokens"] == counts["documents"] and (split == "train" or source.get("val_fraction", 1) > 0):
            raise InputError(f"{out_dir}: the {split} split got no text from the {source['kind']} input: an empty "
                             f"corpus, or too little of it for a {split} split (see --val_fraction)")
    keep = {os.path.basename(_manifest_path(out_dir, i)) for i in range(len(manifests))}
    keep |= {name for s in splits.values() for shard in s["shards"] for name in (shard, _docs_path(shard))}
    patterns = ["input_*.json", ".*.tmp"] + [f"{s}_*{ext}" for s in SPLITS for ext in (".bin", ".docs.npy")]
    for path in sum((glob.glob(os.path.join(out_dir, p)) for p in patterns), []):
        if os.path.basename(path) not in keep:
            os.remove(path)
    meta = {"encoding": ENCODING, "vocab_size": VOCAB_SIZE, "eot": EOT, "source": source,
            "subsets": sorted({name for m in manifests for name in m["subsets"]}), "splits": splits,
            "inputs": manifests}
    write_json(os.path.join(out_dir, "meta.json"), meta)
    new_tokens = sum(manifests[i]["splits"][s]["tokens"] for i in tokenized for s in SPLITS)
    seconds = time.time() - start
    print(f"{out_dir}: done, {len(tokenized)} of {len(manifests)} inputs tokenized now, {new_tokens:,} tokens in "
          f"{seconds:.1f}s ({new_tokens / seconds:,.0f} tokens/s); " +
          ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} documents" for s, v in splits.items()))
    return meta


def _cpus():
    """The CPUs this process may run on: its affinity (a job scheduler's or taskset's limit), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def tokenize(documents, out_dir, source, shard_tokens=SHARD_TOKENS):
    """Tokenize documents as one input, in this process, into shards under out_dir and write meta.json; returns
    the meta dict. documents: (split, text, subset) triples, or (split, text) pairs of subset source["kind"]."""
    start = _begin(out_dir, shard_tokens)
    triples = (doc if len(doc) == 3 else (*doc, source["kind"]) for doc in documents)
    _tokenize_input(0, triples, out_dir, shard_tokens, dict(source, shard_tokens=shard_tokens), _cpus())
    return _finish(out_dir, source, _read_manifests(out_dir, 1), [0], start)


def _end_with_parent():
    """Pool worker initializer: a worker whose parent is gone, even killed by SIGKILL (which runs no cleanup),
    exits within a second instead of tokenizing on as an orphan. The parent is whoever started the worker (this
    process, or multiprocessing's fork server, which exits with it); an orphan is re-parented."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _tokenize_in_pool(task, inputs, jobs, out_dir, shard_tokens, start):
    """Tokenize input i by task(i, inputs[i], out_dir, shard_tokens, jobs[i], threads) -> its manifest, in worker
    processes, as many at a time as there are CPUs, for every input that an earlier run did not finish from the
    same job; returns the inputs tokenized now. task must be a module-level function (it is pickled)."""
    todo = [i for i, job in enumerate(jobs) if not _is_done(out_dir, i, job)]
    print(f"{out_dir}: {len(jobs) - len(todo)} of {len(jobs)} inputs already done", flush=True)
    workers = max(1, min(_cpus(), len(todo)))
    others = multiprocessing.active_children()  # not ours to kill below
    with ProcessPoolExecutor(workers, initializer=_end_with_parent) as pool:
        futures = [pool.submit(task, i, inputs[i], out_dir, shard_tokens, jobs[i], max(1, _cpus() // workers))
                   for i in todo]
        try:
            tokens = 0
            for done, future in enumerate(as_completed(futures), 1):
                tokens += sum(split["tokens"] for split in future.result()["splits"].values())
                print(f"{out_dir}: {done} of {len(todo)} inputs tokenized, {tokens:,} tokens, "
                      f"{tokens / (time.time() - start):,.0f} tokens/s", flush=True)
        except BaseException:  # an input failed, or Ctrl-C: stop now (the executor would run every input queued)
            for worker in set(multiprocessing.active_children()) - set(others):
                worker.kill()  # not terminate(): the SIGTERM handler of __main__ would only interrupt their task
            raise
    return todo


def _tokenize_pile_file(index, path, out_dir, shard_tokens, job, threads):
    documents = pile_documents([path], job["val_fraction"], subsets=True)
    return _tokenize_input(index, documents, out_dir, shard_tokens, job, threads)


def tokenize_pile(paths, out_dir, source, val_fraction=0.05, shard_tokens=SHARD_TOKENS):
    """Tokenize Pile-format files into shards under out_dir, file i being input i, one worker process per file
    and one per CPU at a time; write meta.json and return it. A file finished by an earlier run with the same
    settings (same size and mtime too) is skipped, so a re-run resumes an interrupted one: the files written
    are the same either way."""
    if len(paths) > PARTS:
        raise InputError(f"{len(paths)} input files: at most {PARTS} per directory; concatenate some")
    jobs = [{"file": os.path.abspath(p), "bytes": os.stat(p).st_size, "mtime_ns": os.stat(p).st_mtime_ns,
             "val_fraction": val_fraction, "shard_tokens": shard_tokens, "encoding": ENCODING} for p in paths]
    start = _begin(out_dir, shard_tokens)
    todo = _tokenize_in_pool(_tokenize_pile_file, paths, jobs, out_dir, shard_tokens, start)
    return _finish(out_dir, source, _read_manifests(out_dir, len(paths)), todo, start)


def _tokenize_tree_files(index, files, out_dir, shard_tokens, job, threads):
    read = {}  # filled in by tree_documents as it reads
    documents = tree_documents(files, job["val_fraction"], read)
    return _tokenize_input(index, documents, out_dir, shard_tokens, job, threads, read)


def tokenize_tree(roots, include, out_dir, exclude=(), val_fraction=0.05, shard_tokens=SHARD_TOKENS,
                  input_bytes=INPUT_BYTES):
    """Tokenize the text files under directories (the rules are at the top of this file) into shards under
    out_dir, in parallel and resumably as tokenize_pile does; write meta.json and return it."""
    if input_bytes < 1:
        raise InputError(f"input_bytes must be positive, got {input_bytes}")
    roots = tree_roots(roots)
    files, skipped = tree_files(roots, include, exclude)
    inputs = _tree_inputs(files, input_bytes)
    jobs = [_tree_job(files, val_fraction, shard_tokens) for files in inputs]
    start = _begin(out_dir, shard_tokens)
    todo = _tokenize_in_pool(_tokenize_tree_files, [[f[:3] for f in files] for files in inputs], jobs, out_dir,
                             shard_tokens, start)
    manifests = _read_manifests(out_dir, len(jobs))
    for manifest in manifests:  # the walk's skips first, then the readers', in corpus order
        for reason, entry in manifest["read"]["skipped"].items():
            total = skipped.setdefault(reason, {"count": 0, "paths": []})
            total["count"] += entry["count"]
            total["paths"] = (total["paths"] + entry["paths"])[:SKIPPED_PATHS]
    source = {"kind": "tree", "roots": roots, "include": list(include), "exclude": list(exclude),
              "val_fraction": val_fraction, "input_bytes": input_bytes,
              "files": sum(m["read"]["files"] for m in manifests), "bytes": sum(m["read"]["bytes"] for m in manifests),
              "tokens": sum(m["splits"][s]["tokens"] for m in manifests for s in SPLITS),
              "skipped": dict(sorted(skipped.items()))}
    meta = _finish(out_dir, source, manifests, todo, start)
    skips = ", ".join(f"{entry['count']:,} {reason}" for reason, entry in source["skipped"].items())
    print(f"{out_dir}: read {source['files']:,} files ({source['bytes'] / 1e6:,.1f} MB); skipped {skips or 'none'} "
          f"(see meta.json)")
    return meta


def _tree_inputs(files, input_bytes):
    """Cut the ordered files into inputs: ceil(bytes / input_bytes) contiguous groups (at most PARTS) of about
    equal bytes, a file going to the group where its first byte falls. Depends on the file list alone, never on
    the machine, so that a rerun finds the same inputs."""
    total = sum(f[3] for f in files)
    n = max(1, min(PARTS, len(files), -(-total // input_bytes)))
    inputs, before = [[] for _ in range(n)], 0
    for f in files:
        inputs[min(n - 1, before * n // max(total, 1))].append(f)  # n - 1: empty files at the end
        before += f[3]
    return [files for files in inputs if files]  # a file larger than a group leaves the next ones empty


def _tree_job(files, val_fraction, shard_tokens):
    """What an input of tree is made from: its files, by a hash of their paths, sizes and mtimes."""
    listing = "".join(f"{path}\0{rel}\0{size}\0{mtime_ns}\n" for path, rel, _, size, mtime_ns in files)
    return {"files": len(files), "bytes": sum(f[3] for f in files), "first": files[0][0], "last": files[-1][0],
            "files_sha256": hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest(),
            "val_fraction": val_fraction, "shard_tokens": shard_tokens, "encoding": ENCODING}


# -----------------------------------------------------------------------------
# training sequences and batches


class TokenSequences:
    """Fixed windows of block_size+1 tokens at stride block_size inside each shard of a split.

    Window i of a shard is tokens[i*T : i*T+T+1] (windows never cross shards); its id is the shard's
    offset + i, over the split's shards in sorted order, so ids are stable for a given data_dir.
    max_sequences keeps only ids [0, max_sequences), e.g. a small demo pool. domains() gives each id's subset.
    """

    def __init__(self, data_dir, split, block_size, max_sequences=None):
        if block_size < 1:
            raise InputError(f"block_size must be positive, got {block_size}")
        self.data_dir, self.split, self.block_size = data_dir, split, block_size
        # {split}_000000.bin ... from this file, or a nanoGPT prepare.py output's single {split}.bin
        self.shards = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin"))) or glob.glob(
            os.path.join(data_dir, f"{split}.bin"))
        if not self.shards:
            raise InputError(f"no {split}_*.bin shards in {data_dir!r}; prepare them first, e.g. "
                             f"`python data.py stdlib --out_dir {data_dir}` (see python data.py -h)")
        self.tokens = [read_bin(path) for path in self.shards]
        for path, tokens in zip(self.shards, self.tokens):
            # the ends only: reading every token is 600 GB for the Pile. A file that is not a shard of ours (a
            # wrong magic reads as a headerless file) shows at the start; get() checks every window it returns.
            _check_vocab(path, np.concatenate([tokens[:EDGE_TOKENS], tokens[-EDGE_TOKENS:]]))
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
        if out.size and out.max() >= VOCAB_SIZE:  # cheap next to the copy; open checked the shards' ends only
            row = int(np.argmax(out.max(axis=1)))
            _check_vocab(f"{self.shards[shard[row]]} (sequence {ids[row]})", out[row])
        return torch.from_numpy(out)

    def domains(self):
        """(int64 array of len(self), list of names): the subset of each sequence id, as an index into the names.
        A sequence's subset is that of the document its first token lies in, which may have begun in an
        earlier shard; see the top of this file for what the subsets are."""
        meta_path = os.path.join(self.data_dir, "meta.json")
        meta = {}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        if "subsets" not in meta:
            raise InputError(f"{self.data_dir!r} has no document subsets (made by an older data.py, or not by "
                             f"data.py): re-tokenize it with `python data.py ... --out_dir {self.data_dir}`")
        names = meta["subsets"]
        # docs.npy holds indices into its input's own subset list: map them to indices into names
        lookup = {shard: np.array([names.index(n) for n in m["subsets"]], dtype=np.int64)
                  for m in meta["inputs"] for shard in m["splits"][self.split]["shards"]}
        out = np.empty(len(self), dtype=np.int64)
        carry = -1  # the subset of the document still open at the end of the previous shard
        for path, first, end in zip(self.shards, self.offsets[:-1], np.minimum(self.offsets[1:], len(self))):
            if first >= len(self):
                break
            if os.path.basename(path) not in lookup or not os.path.exists(_docs_path(path)):
                raise InputError(f"{_docs_path(path)}: missing, or {path} is not in {meta_path}: re-tokenize "
                                 f"with `python data.py ... --out_dir {self.data_dir}`")
            docs = np.load(_docs_path(path))
            subsets = np.concatenate([[carry], lookup[os.path.basename(path)][docs[:, 1]]])
            starts = np.arange(end - first) * self.block_size
            out[first:end] = subsets[np.searchsorted(docs[:, 0], starts, side="right")]  # 0: the carried one
            carry = subsets[-1]
        if (out < 0).any():
            raise InputError(f"{self.data_dir!r}: the first {self.split} shard does not start with a document")
        return out, names

    def fingerprint(self):
        """Cheap hex id of the data: each shard's name, size and first/last 64 KiB, block_size, len(self)."""
        h = hashlib.sha256(f"block_size={self.block_size} sequences={len(self)}".encode())
        for path, tokens in zip(self.shards, self.tokens):
            h.update(f"{os.path.basename(path)}:{len(tokens)}".encode())
            h.update(np.ascontiguousarray(tokens[:EDGE_TOKENS]).tobytes())
            h.update(np.ascontiguousarray(tokens[-EDGE_TOKENS:]).tobytes())
        return h.hexdigest()


def _check_vocab(where, tokens):
    if tokens.size and int(tokens.max()) >= VOCAB_SIZE:
        raise InputError(f"{where}: token id {int(tokens.max())} >= vocab size {VOCAB_SIZE}")


class BatchLoader:
    """Batches of sequences: epoch e shuffles the allowed ids with default_rng([seed, e]) and cuts the
    permutation into blocks of batch_size. An optimizer step reads the next accumulation * world_size blocks:
    micro-step m of rank r reads block m * world_size + r of them.

    So the global batches depend on batch_size and accumulation * world_size alone: 2 ranks with 1 accumulation
    step read what 1 process with 2 reads (micro-step m of step s: block 2s+m), and a run may resume on another
    number of ranks that keeps the product. An epoch is as many whole steps as fit; its other blocks are dropped.
    """

    def __init__(self, sequences, batch_size, rank=0, world_size=1, seed=0, ids=None, accumulation=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.sequences, self.batch_size, self.rank, self.world_size, self.seed = (
            sequences, batch_size, rank, world_size, seed)
        # a subset (e.g. SALT_DS's selection) is a set: sorted and deduplicated, so its order can't matter
        self.ids = np.arange(len(sequences)) if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
        if self.ids.size and (self.ids[0] < 0 or self.ids[-1] >= len(sequences)):
            raise IndexError(f"ids must be in [0, {len(sequences)})")
        steps_per_epoch = len(self.ids) // (batch_size * world_size * accumulation)
        self.batches_per_epoch = steps_per_epoch * accumulation  # this rank's
        if self.batches_per_epoch == 0:
            raise InputError(f"{len(self.ids)} sequences are too few for batch_size*world_size*grad_accum_steps = "
                             f"{batch_size}*{world_size}*{accumulation}; use a smaller batch or more data")
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
        """Where the job is, on any number of ranks: the epoch and the blocks all ranks have read in it."""
        return {"epoch": int(self.epoch), "blocks": int(self.position * self.world_size)}

    def load_state_dict(self, state):
        position, rest = divmod(state["blocks"], self.world_size)
        if rest or not 0 <= position <= self.batches_per_epoch:  # saved with another batch or global batch?
            raise ValueError(f"{state['blocks']} blocks read in an epoch: not a whole number of batches per rank "
                             f"within the {self.batches_per_epoch} of an epoch on {self.world_size} ranks")
        self.epoch, self.position = int(state["epoch"]), position


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
    p = sub.add_parser("tree", parents=[common], help="the text files under directories, one document each")
    p.add_argument("roots", nargs="*", metavar="DIR", help="directories to read (before the patterns)")
    p.add_argument("--python", action="store_true", help="read this Python's stdlib and site-packages too")
    p.add_argument("--include", nargs="*", metavar="PATTERN", help="file names to read, e.g. '*.py' (quoted)")
    p.add_argument("--exclude", nargs="*", metavar="PATTERN", help="paths under DIR to leave out: '*/tests/*'")
    p.add_argument("--input_bytes", type=int, default=INPUT_BYTES, help="bytes of files per parallel input")
    p.add_argument("--out_dir", required=True)
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")

    if args.source == "pile":
        source = {"kind": "pile", "files": args.files, "val_fraction": args.val_fraction}
        return tokenize_pile(args.files, args.out_dir, source, args.val_fraction, args.shard_tokens)
    if args.source == "tree":
        if args.exclude == []:  # --exclude and nothing after it: a pattern lost to the shell?
            raise InputError("tree: --exclude without a pattern")
        roots = args.roots + (python_roots() if args.python else [])
        return tokenize_tree(roots, args.include or [], args.out_dir, args.exclude or [], args.val_fraction,
                             args.shard_tokens, args.input_bytes)
    if args.source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        source = {"kind": "stdlib", "root": root, "python": sys.version.split()[0]}
        documents = stdlib_documents(args.val_fraction, root, subsets=True)
    else:
        source = {"kind": "text", "files": args.files}
        documents = text_documents(args.files, args.val_fraction)  # pairs: their subset is "text"
    source["val_fraction"] = args.val_fraction
    return tokenize(documents, args.out_dir, source, args.shard_tokens)


if __name__ == "__main__":
    report_input_errors()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the workers too, as Ctrl-C does
    main()
