"""
Text -> the token shards that data.py reads (GPT-2's BPE by tiktoken, or with --tokenizer DIR the tokenizer of
a transformers model; its end-of-text token before every document), as nanoGPT's data/*/prepare.py do:

    python prepare.py stdlib [--out_dir data/stdlib]        # default corpus: this Python's stdlib .py files
    python prepare.py text FILE... --out_dir DIR            # plain text files, one document each
    python prepare.py pile SHARD.jsonl.zst... --out_dir DIR # Pile-format jsonl / jsonl.zst shards
    python prepare.py tree DIR... --include '*.py' '*.md' [--exclude '*/tests/*'] --out_dir DIR  # under DIRs
    python prepare.py tree --python --include '*.py' '*.md' '*.rst' '*.txt' --out_dir data/python
                                                            # this Python's stdlib and installed packages
    python prepare.py tree ... --max_bytes 50000000         # the first 50 MB of files of the tree's order
    python prepare.py parquet FILE.parquet... [--text_column text] [--subset_column dump] --out_dir DIR
    python prepare.py hf NAME_OR_DIR [--name CONFIG] [--split train] [--data_files F...] [--max_tokens 2e9] --out_dir DIR
    python prepare.py megatron PREFIX... --tokenizer DIR --out_dir DIR  # .bin + .idx, read where they lie
    python prepare.py bpe --data_dir DATA --vocab_size 4096 --out_dir TOKENIZER  # a BPE trained on DATA's train
                                                            # split (nanochat's way), for --tokenizer TOKENIZER
    common flags: --val_fraction 0.05 --shard_tokens 100000000
                  --tokenizer DIR   # a transformers model's (or tokenizer's) directory: SmolLM2, Qwen, Pythia ...

parquet and hf (a Hugging Face dataset: streamed, or a save_to_disk folder) are read a batch of rows at a time and go
the way of pile; a budget (--max_tokens, --max_bytes) is shared equally by the inputs; a local dataset resumes by
its files' content (hf_key). megatron copies nothing: it checks the indexed datasets' headers and sizes, and a
sample of their tokens (--check_fraction; 1 checks every one) against --tokenizer, and writes meta.json and the runs
of each split's documents for data.py's IndexedSequences (prepare_megatron, read_index), in memory that does not
grow with the datasets. A damaged input (a file that is not parquet or is cut short, a row group or an Arrow file
that cannot be decoded, a damaged .idx) is one line naming the file; nothing of it is marked done.

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
- budget: --max_bytes N takes the files in that order while their sizes add up to at most N bytes, and stops
  at the first that would go over (meta.json records N and what it left out).
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
  format (256 int32 header [MAGIC, VERSION, token_count, 0...] then the tokens: uint16, version 1, while the
  vocabulary fits, else uint32, version 2). Sorted names follow the inputs' order, so the split's documents are
  in input order, whatever order the workers finish in.
- {split}_{k:06d}.docs.npy: int64 rows (offset of the document's EOT in the shard, subset index into its
  input's "subsets") of each document that starts in the shard; a shard may begin with the end of a document
  started in the previous shard of its input.
- input_{i:03d}.json: input i's manifest (what it was made from, its subsets, shards, token and document
  counts; for tree, the files read and skipped), written after its shards: it marks the input done.
- tokenizer/: with --tokenizer, its files (save_pretrained), from which the workers and later readers load it.
- meta.json, written last: "tokenizer" (its record: tokenizer.py), "encoding" (its name), "vocab_size" and "eot",
  source (for tree: the roots, patterns, files and bytes read, tokens, and
  the files skipped, counted per reason with the first 100 paths of each), "subsets" (every subset name,
  sorted), per split the shards and counts, and "inputs", the manifests. Subsets: the Pile's
  meta.pile_set_name ("unknown" when absent); the stdlib file's top-level package ("stdlib" for a top-level
  module); the tree file's top-level package, the first component of its path under its DIR ("torch",
  "numpy-2.4.6.dist-info"), or the DIR's own name for a file directly in it ("site-packages"), a name being
  one subset whichever DIR it comes from; "text" for text files.

Training reads them back with data.py's TokenSequences and BatchLoader.
"""
import argparse
import errno
import fnmatch
import glob
import hashlib
import importlib
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import struct
import sys
import signal
import stat
import sysconfig
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

import tokenizer
from common import InputError, atomic_write, end_with_parent, report_input_errors, write_json
from data import HEADER_INTS, MAGIC, TOKEN_DTYPES, docs_path, read_bin

SHARD_TOKENS = 100_000_000
SPLITS = ("train", "val")
PARTS = 1000  # output shard k = input * PARTS + part: six digits hold 1000 inputs of up to 1000 shards each
BATCH_CHARS = 1 << 22  # characters per encode_ordinary_batch call: big enough to keep all threads busy
INPUT_BYTES = 1 << 22  # tree: bytes of files per input, the unit of parallel work and of resuming (~1M tokens)
SKIPPED_PATHS = 100  # tree: paths listed per reason for skipping a file in meta.json (the counts are complete)
ROWS = 1024  # parquet and hf: rows read at a time (a parquet file is read a batch of rows at a time, never whole)
HF_ROWS = 100_000  # hf: rows per input of a dataset saved by save_to_disk (a streamed one's input is a data file)
SAVED_MARKS = ("state.json", "dataset_dict.json")  # hf: the files of a save_to_disk folder (a Dataset, a DatasetDict)
CHECK_TOKENS = 1 << 28  # megatron: tokens per input of the vocabulary check, the unit of parallel work and resuming
CHECK_FRACTION = 0.01  # megatron: the share of the tokens checked at prepare time (IndexedSequences.get checks the rest)
CHECK_CHUNK = 1 << 24  # megatron: tokens mapped at a time by the check
INDEX_CHUNK = 1 << 22  # megatron: entries of an .idx read at a time (the Pile's has 146M sequences)

# -----------------------------------------------------------------------------
# shard files


def shard_version(vocab_size):
    """The shard version whose tokens hold a vocabulary: 1 (uint16) while it fits, else 2 (uint32)."""
    return 1 if vocab_size <= 1 << 16 else 2


def write_bin(path, tokens, version=1):
    """Write tokens as one shard: 256 int32 header, then the tokens, uint16 (version 1) or uint32 (version 2)."""
    tokens, dtype = np.asarray(tokens), np.dtype(TOKEN_DTYPES[version])
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 8 * dtype.itemsize):
        raise InputError(f"{path}: tokens must lie in [0, {1 << 8 * dtype.itemsize}) to be stored as {dtype.name}")
    if tokens.size >= 1 << 31:
        raise InputError(f"{path}: {tokens.size} tokens do not fit the int32 header count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, version, tokens.size
    atomic_write(path, [header.tobytes(), tokens.astype(dtype).tobytes()])


def _write_npy(path, array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, [buffer.getvalue()])


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


def _import(module, package):
    """A module that only some sources need (pyarrow, datasets), or a one-line error naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise InputError(f"this source needs {package}: pip install {package}") from error


def row_documents(batches, name, val_fraction, where):
    """(split, text, subset) of table rows given as batches of (texts, subsets): a row goes to val by a hash of
    f"{name}:{row}" (rows counted from 0), a subset of None is "unknown"."""
    row = 0
    for texts, subsets in batches:
        for text, subset in zip(texts, subsets):
            if not isinstance(text, str):
                raise InputError(f"{where}: row {row}: the text is {type(text).__name__}, not a string")
            split = "val" if _is_val(f"{name}:{row}", val_fraction) else "train"
            yield split, text, "unknown" if subset is None else str(subset)
            row += 1


def open_parquet(path, columns):
    """A parquet file's reader, after checking its footer and that it has the columns: a file that is not parquet,
    or one cut short, is one line. Returns it and the errors its reading may raise."""
    pa, pq = _import("pyarrow", "pyarrow"), _import("pyarrow.parquet", "pyarrow")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        reader = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: not a parquet file, or a truncated one ({_first_line(error)})") from error
    _check_columns(path, columns, reader.schema_arrow.names)
    return reader, (OSError, pa.ArrowException)


def parquet_batches(path, text_column, subset_column=None):
    """(texts, subsets) of a parquet file, ROWS rows at a time (pyarrow's iter_batches: a row group at most in
    memory); subsets are the subset column's values, or "parquet". A row group that cannot be decoded is one line."""
    columns = [text_column] + ([subset_column] if subset_column else [])
    reader, errors = open_parquet(path, columns)
    groups = reader.metadata.num_row_groups
    for group in range(groups):
        batches = reader.iter_batches(batch_size=ROWS, row_groups=[group], columns=columns)
        for batch in _decoded(batches, f"{path}: row group {group} of {groups}", errors):
            texts = batch.column(0).to_pylist()
            yield texts, batch.column(1).to_pylist() if subset_column else ["parquet"] * len(texts)


def _decoded(batches, where, errors):
    """The batches of a table's reader; one of its errors (a damaged row group, a cut Arrow file) is one line."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except errors as error:
            raise InputError(f"{where}: cannot be decoded ({_first_line(error)})") from error
        yield batch


def _first_line(error):
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _check_columns(where, columns, names):
    for column in columns:
        if column not in names:
            raise InputError(f"{where}: no column {column!r} (it has {', '.join(map(str, names))}): name the text "
                             f"with --text_column, the subset with --subset_column")


def open_hf(dataset):
    """A Hugging Face dataset, never read whole into memory: a save_to_disk directory (memory-mapped Arrow files),
    else load_dataset(..., streaming=True) of dataset {"path", "name", "split", "data_files"}: a hub name (its
    cache when offline), a local dataset folder, or a builder such as "parquet" with data_files."""
    datasets = _import("datasets", "datasets")
    path, split = dataset["path"], dataset["split"]
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in SAVED_MARKS):
        try:
            saved = datasets.load_from_disk(path)
        except (OSError, ValueError, KeyError) as error:  # a JSON or Arrow file damaged, cut short or missing
            raise InputError(f"{path}: a damaged save_to_disk folder ({_first_line(error)})") from error
        if not isinstance(saved, datasets.DatasetDict):
            return saved
        if split not in saved:
            raise InputError(f"{path}: no split {split!r} (it has {', '.join(saved)}); name one with --split")
        return saved[split]
    try:
        return datasets.load_dataset(path, dataset["name"], split=split, data_files=dataset["data_files"],
                                     streaming=True)
    except (OSError, ValueError) as error:  # ConnectionError is an OSError; an unknown config a ValueError
        import huggingface_hub
        offline = isinstance(error, ConnectionError) or huggingface_hub.constants.HF_HUB_OFFLINE
        raise InputError(f"{path}: cannot be read{' (offline: not in the local cache)' if offline else ''}: "
                         f"{_first_line(error)}") from error


def hf_key(dataset):
    """What a job records of a dataset, to resume by: a local one (a folder, or local data_files) by its files'
    names and SHA-256, so that a copy elsewhere resumes and one changed under the same path is tokenized
    again; one of the hub by its name."""
    files = {}
    if os.path.isdir(dataset["path"]):
        for folder, _, names in os.walk(dataset["path"]):
            files.update({os.path.relpath(os.path.join(folder, name), dataset["path"]): os.path.join(folder, name)
                          for name in names})
    for pattern in dataset["data_files"] or []:
        files.update({os.path.basename(path): path for path in glob.glob(pattern)})
    if not files:
        return dataset
    content = hashlib.sha256()
    for name, path in sorted(files.items()):
        with open(path, "rb") as f:
            content.update(name.encode("utf-8", "surrogateescape") + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return {"content_sha256": content.hexdigest(), "name": dataset["name"], "split": dataset["split"]}


def hf_inputs(ds):
    """How many inputs a dataset is cut into: a streamed one's data files (datasets' shards), a saved one's
    blocks of HF_ROWS rows; at most PARTS. Depends on the dataset alone, so that a rerun finds the same inputs."""
    count = ds.n_shards if hasattr(ds, "n_shards") else -(-ds.num_rows // HF_ROWS)
    return max(1, min(PARTS, count))


def hf_batches(ds, index, inputs, text_column, subset_column=None, where="the dataset"):
    """(texts, subsets) of input `index` of `inputs` of a dataset, ROWS rows at a time; a row that cannot be read
    (a damaged Arrow or data file) is one line naming `where`."""
    shard = ds.shard(inputs, index) if hasattr(ds, "n_shards") else ds.shard(inputs, index, contiguous=True)
    for batch in _decoded(iter(shard.iter(batch_size=ROWS)), where, (OSError, ValueError)):
        texts = batch[text_column]
        yield texts, batch[subset_column] if subset_column else ["hf"] * len(texts)


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


def tree_documents(files, val_fraction=0.05, read=None, val_files=()):
    """(split, text, subset) of each text file of files [(path, rel, subset), ...], in order; a file goes to val
    by a hash of rel, or when its rel is in val_files (_val_files). The others are skipped: unreadable, or not text (a NUL byte, or not UTF-8). With a dict
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
        yield ("val" if _is_val(rel, val_fraction) or rel in val_files else "train"), text, subset


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
    each with its .docs.npy: (EOT offset, subset index) of every document that starts in it. The tokenizer gives
    the EOT and, by its vocabulary, the shard version."""

    def __init__(self, out_dir, split, index, shard_tokens, tokenizer):
        self.out_dir, self.split, self.index, self.shard_tokens = out_dir, split, index, shard_tokens
        self.eot, self.version = tokenizer.eot, shard_version(tokenizer.vocab_size)
        self.pending, self.pending_tokens, self.pending_docs = [], 0, []
        self.shards, self.tokens, self.documents = [], 0, 0

    def add(self, document_tokens, subset):
        self.pending_docs.append((self.pending_tokens, subset))
        dtype = np.uint16 if self.version == 1 else np.uint32
        self.pending.append(np.array([self.eot] + document_tokens, dtype=dtype))  # EOT separates documents
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
        write_bin(os.path.join(self.out_dir, name + ".bin"), buffer[:n], self.version)
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


_TOKENIZERS = {}  # a worker's tokenizer, loaded by its first input and kept for the next ones


def _job_tokenizer(job, out_dir, threads):
    """The tokenizer that a job names: GPT-2's, or the one saved in out_dir/tokenizer, loaded once per process."""
    key = json.dumps(job.get("tokenizer", job["encoding"]), sort_keys=True)
    if key not in _TOKENIZERS:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # a transformers tokenizer's threads, at first use
        _TOKENIZERS[key] = tokenizer.load(job.get("tokenizer", job["encoding"]), os.path.join(out_dir, "tokenizer"))
    return _TOKENIZERS[key]


def _tokenize_input(index, documents, out_dir, shard_tokens, job, threads, read=None):
    """Tokenize input `index`'s (split, text, subset) documents into its shards, then write its manifest: the
    manifest exists only once every shard of the input does. `job` records what the input was made from, its
    tokenizer included; `read`, if given, what the documents' reader counted while they were read
    (tree_documents)."""
    tok = _job_tokenizer(job, out_dir, threads)
    writers = {split: ShardWriter(out_dir, split, index, shard_tokens, tok) for split in SPLITS}
    subsets = {}  # name -> index, in order of first appearance in this input
    budget = _Budget(job.get("max_tokens", 0), job.get("max_bytes", 0))
    start = last_print = time.time()
    for batch in _batches(documents):
        encoded = tok.encode_batch([text for _, text, _ in batch], threads=threads)
        for (split, text, subset), tokens in zip(batch, encoded):
            if not budget.take(text, tokens):
                break
            writers[split].add(tokens, subsets.setdefault(subset, len(subsets)))
        if budget.stopped:
            break  # the reader is closed with the loop: a stream stops here
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
    if budget.limits:
        manifest["budget"] = {"stopped": budget.stopped, "bytes": budget.bytes, "tokens": budget.tokens}
    write_json(_manifest_path(out_dir, index), manifest)
    return manifest


class _Budget:
    """An input's share of --max_tokens / --max_bytes (0: none): documents are taken in order while their tokens
    (each with its EOT) and UTF-8 bytes add up to at most the share, and none from the first that would go over."""

    def __init__(self, max_tokens, max_bytes):
        self.max_tokens, self.max_bytes, self.limits = max_tokens, max_bytes, bool(max_tokens or max_bytes)
        self.tokens = self.bytes = 0
        self.stopped = False

    def take(self, text, tokens):
        size = len(text.encode("utf-8")) if self.max_bytes else 0
        if ((self.max_tokens and self.tokens + len(tokens) + 1 > self.max_tokens)
                or (self.max_bytes and self.bytes + size > self.max_bytes)):
            self.stopped = True
        else:
            self.tokens, self.bytes = self.tokens + len(tokens) + 1, self.bytes + size
        return not self.stopped


def _is_done(out_dir, index, job):
    """Whether an earlier run finished input `index` from the same job and its shards are still there."""
    path = _manifest_path(out_dir, index)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        manifest = json.load(f)
    shards = [os.path.join(out_dir, name) for split in manifest["splits"].values() for name in split["shards"]]
    return manifest["job"] == job and all(os.path.exists(p) and os.path.exists(docs_path(p)) for p in shards)


def tokenizer_key(tok):
    """What a job records of its tokenizer: GPT-2's by its name alone (as jobs did before other tokenizers, so that
    their inputs still count as done), any other by its record too."""
    record = tok.record()
    return {"encoding": record["name"]} if record["kind"] == "tiktoken" else {"encoding": record["name"],
                                                                             "tokenizer": record}


def _check_one_tokenizer(out_dir, record):
    """Refuse an out_dir that holds another tokenizer's shards (its meta.json, or an interrupted run's manifests),
    before anything in it is touched: they may be hours of tokenizing, and one directory is one vocabulary."""
    found = [("meta.json", tokenizer.data_record(out_dir))] if tokenizer.read_data_meta(out_dir) else []
    for path in sorted(glob.glob(os.path.join(out_dir, "input_*.json"))):
        with open(path) as f:
            job = json.load(f).get("job", {})
        found.append((os.path.basename(path), tokenizer.as_record(job.get("tokenizer", job.get("encoding")))))
    for where, other in found:
        if not tokenizer.same_vocabulary(other, record):
            raise InputError(f"{out_dir} holds shards of tokenizer {tokenizer.describe(other)} ({where}), this run "
                             f"tokenizes with {tokenizer.describe(record)}: give another --out_dir, or empty it first")


def _begin(out_dir, shard_tokens, tok):
    """Start a tokenization into out_dir: checked, its meta.json (which marks a complete directory) removed, and a
    transformers tokenizer's files saved in out_dir/tokenizer for the workers and every later reader."""
    if not 0 < shard_tokens < 1 << 31:
        raise InputError(f"shard_tokens must be in [1, 2**31), got {shard_tokens}")
    os.makedirs(out_dir, exist_ok=True)
    _check_one_tokenizer(out_dir, tok.record())
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))
    if tok.kind == "transformers":
        folder = os.path.join(out_dir, "tokenizer")
        shutil.rmtree(folder + ".tmp", ignore_errors=True)
        tok.save(folder + ".tmp")
        shutil.rmtree(folder, ignore_errors=True)  # the same vocabulary (checked above), saved again
        os.replace(folder + ".tmp", folder)
    return time.time()


def _read_manifests(out_dir, n_inputs):
    manifests = []
    for index in range(n_inputs):
        with open(_manifest_path(out_dir, index)) as f:
            manifests.append(json.load(f))
    return manifests


def _finish(out_dir, source, manifests, tokenized, start, tok):
    """Gather the inputs' manifests into meta.json (written last), after deleting what this run did not make:
    shards of an earlier, larger run, which would otherwise be read as part of a split, and the temporary
    files of a killed one. `tokenized`: the inputs tokenized by this run, for the speed report."""
    splits = {s: {"shards": [name for m in manifests for name in m["splits"][s]["shards"]],
                  "tokens": sum(m["splits"][s]["tokens"] for m in manifests),
                  "documents": sum(m["splits"][s]["documents"] for m in manifests)} for s in SPLITS}
    for split, counts in splits.items():  # every document is an EOT and its text: only EOTs = no text at all
        if counts["tokens"] == counts["documents"] and (split == "train" or source.get("val_fraction", 1) > 0):
            works = _val_fraction_that_works(source) if split == "val" and splits["train"]["documents"] else None
            raise InputError(f"{out_dir}: the {split} split got no text from the {source['kind']} input: " + (
                f"--val_fraction {works:g} is the least that sends it a document" if works else
                f"an empty corpus, or too little of it for a {split} split (see --val_fraction)"))
    keep = {os.path.basename(_manifest_path(out_dir, i)) for i in range(len(manifests))}
    keep |= {name for s in splits.values() for shard in s["shards"] for name in (shard, docs_path(shard))}
    patterns = ["input_*.json", ".*.tmp"] + [f"{s}_*{ext}" for s in SPLITS for ext in (".bin", ".docs.npy")]
    for path in sum((glob.glob(os.path.join(out_dir, p)) for p in patterns), []):
        if os.path.basename(path) not in keep:
            os.remove(path)
    record = tok.record()
    meta = {"tokenizer": record, "encoding": record["name"], "vocab_size": record["vocab_size"],
            "eot": record["eot"], "source": source,
            "subsets": sorted({name for m in manifests for name in m["subsets"]}), "splits": splits,
            "inputs": manifests}
    write_json(os.path.join(out_dir, "meta.json"), meta)
    new_tokens = sum(manifests[i]["splits"][s]["tokens"] for i in tokenized for s in SPLITS)
    seconds = time.time() - start
    print(f"{out_dir}: done, {len(tokenized)} of {len(manifests)} inputs tokenized now, {new_tokens:,} tokens in "
          f"{seconds:.1f}s ({new_tokens / seconds:,.0f} tokens/s); " +
          ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} documents" for s, v in splits.items()))
    return meta


def _val_fraction_that_works(source):
    """The least --val_fraction (in its steps of 0.001) that gives the val split text, or None: the split's rules
    (_is_val, text_documents) applied to the input's documents again, which this error only meets when they are
    few. A single file of text gives val its last val_fraction; other documents go by the hash of their key."""
    if source["kind"] == "text" and len(source["files"]) == 1:
        length = len(_read_text(source["files"][0]))  # val is empty while round(length * (1 - f)) == length
        least = (int(500 / length) + 1) / 1000 if length else 1
        return least if least < 1 else None
    keys = {"text": lambda: [os.path.basename(path) for path in source["files"]],
            "stdlib": lambda: stdlib_files(source["root"]),
            "pile": lambda: [f"{os.path.basename(path)}:{number}" for path in source["files"]
                             for number, line in enumerate(_jsonl_lines(path), 1) if line.strip()]}
    if source["kind"] not in keys:  # tree: a file goes to val whenever there are two (_val_files)
        return None
    buckets = [zlib.crc32(key.encode("utf-8", "surrogateescape")) % 1000 for key in keys[source["kind"]]()]
    return (min(buckets) + 1) / 1000 if buckets and min(buckets) < 999 else None


def _cpus():
    """The CPUs this process may run on: its affinity (a job scheduler's or taskset's limit), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def tokenize(documents, out_dir, source, shard_tokens=SHARD_TOKENS, tok=None):
    """Tokenize documents as one input, in this process, into shards under out_dir and write meta.json; returns
    the meta dict. documents: (split, text, subset) triples, or (split, text) pairs of subset source["kind"].
    tok: the tokenizer (tokenizer.py; GPT-2's by default), as for every function below."""
    tok = tok or tokenizer.GPT2Tokenizer()
    start = _begin(out_dir, shard_tokens, tok)
    triples = (doc if len(doc) == 3 else (*doc, source["kind"]) for doc in documents)
    job = dict(source, shard_tokens=shard_tokens, **tokenizer_key(tok))
    _tokenize_input(0, triples, out_dir, shard_tokens, job, _cpus())
    return _finish(out_dir, source, _read_manifests(out_dir, 1), [0], start, tok)


def _tokenize_in_pool(task, inputs, jobs, out_dir, shard_tokens, start):
    """Tokenize input i by task(i, inputs[i], out_dir, shard_tokens, jobs[i], threads) -> its manifest, in worker
    processes, as many at a time as there are CPUs, for every input that an earlier run did not finish from the
    same job; returns the inputs tokenized now. task must be a module-level function (it is pickled)."""
    todo = [i for i, job in enumerate(jobs) if not _is_done(out_dir, i, job)]
    print(f"{out_dir}: {len(jobs) - len(todo)} of {len(jobs)} inputs already done", flush=True)
    workers = max(1, min(_cpus(), len(todo)))
    others = multiprocessing.active_children()  # not ours to kill below
    # a worker ends within a second of this process, even of a SIGKILL, rather than tokenize on as an orphan
    with ProcessPoolExecutor(workers, initializer=end_with_parent, initargs=('a tokenizing worker',)) as pool:
        futures = [pool.submit(task, i, inputs[i], out_dir, shard_tokens, jobs[i], max(1, _cpus() // workers))
                   for i in todo]
        try:
            tokens = 0
            for done, future in enumerate(as_completed(futures), 1):
                manifest = future.result()  # the megatron check's has no splits, only its tokens
                tokens += manifest.get("tokens", sum(split["tokens"] for split in manifest["splits"].values()))
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


def _tokenize_parquet_file(index, path, out_dir, shard_tokens, job, threads):
    batches = parquet_batches(path, job["text_column"], job.get("subset_column"))
    documents = row_documents(batches, os.path.basename(path), job["val_fraction"], path)
    return _tokenize_input(index, documents, out_dir, shard_tokens, job, threads)


def tokenize_pile(paths, out_dir, source, val_fraction=0.05, shard_tokens=SHARD_TOKENS, tok=None):
    """Tokenize Pile-format files into shards under out_dir (tokenize_files)."""
    return tokenize_files(_tokenize_pile_file, paths, out_dir, source, {"val_fraction": val_fraction}, shard_tokens,
                          tok)


def tokenize_files(task, paths, out_dir, source, settings, shard_tokens=SHARD_TOKENS, tok=None):
    """Tokenize files into shards under out_dir, file i being input i of task (_tokenize_pile_file, ...), one
    worker process per file and one per CPU at a time; write meta.json and return it. settings: the job's
    val_fraction and the source's other settings (columns, budget shares). A file finished by an earlier run with
    the same settings (same size and mtime too) is skipped, so a re-run resumes an interrupted one: the files
    written are the same either way."""
    if len(paths) > PARTS:
        raise InputError(f"{len(paths)} input files: at most {PARTS} per directory; concatenate some")
    tok = tok or tokenizer.GPT2Tokenizer()
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file")
    settings = _budget_shares(settings, len(paths))
    jobs = [{"file": os.path.abspath(p), "bytes": os.stat(p).st_size, "mtime_ns": os.stat(p).st_mtime_ns,
             **settings, "shard_tokens": shard_tokens, **tokenizer_key(tok)} for p in paths]
    start = _begin(out_dir, shard_tokens, tok)
    todo = _tokenize_in_pool(task, paths, jobs, out_dir, shard_tokens, start)
    manifests = _read_manifests(out_dir, len(paths))
    if "max_tokens" in settings:  # what the budget took
        source["stopped_by_budget"] = sum(m["budget"]["stopped"] for m in manifests if "budget" in m)
    return _finish(out_dir, source, manifests, todo, start, tok)


def _budget_shares(settings, inputs):
    """settings with --max_tokens and --max_bytes cut into equal shares, one per input: each input is a stream
    stopped at its share, so that a budget samples every input and the inputs still run in parallel."""
    return dict(settings, **{key: -(-settings[key] // inputs) for key in ("max_tokens", "max_bytes")
                             if settings.get(key)})


def _tokenize_hf_input(index, dataset, out_dir, shard_tokens, job, threads):
    where = f"{dataset['path']} input {index}"
    batches = hf_batches(open_hf(dataset), index, job["inputs"], job["text_column"], job.get("subset_column"), where)
    documents = row_documents(batches, f"{index}-of-{job['inputs']}", job["val_fraction"], where)
    return _tokenize_input(index, documents, out_dir, shard_tokens, job, threads)


def tokenize_hf(dataset, out_dir, source, settings, shard_tokens=SHARD_TOKENS, tok=None):
    """Tokenize a Hugging Face dataset (open_hf) into shards under out_dir, in parallel and resumably as
    tokenize_files: input i is the dataset's shard i of hf_inputs, its rows going to val by a hash of
    f"{i}-of-{inputs}:{row}". A local dataset is resumed by its content (hf_key)."""
    ds = open_hf(dataset)
    if ds.column_names is not None:  # None: a stream whose features are known only once read
        _check_columns(dataset["path"], [c for c in (settings["text_column"], settings["subset_column"]) if c],
                       ds.column_names)
    tok, inputs = tok or tokenizer.GPT2Tokenizer(), hf_inputs(ds)
    key = hf_key(dataset)
    jobs = [dict(_budget_shares(settings, inputs), dataset=key, inputs=inputs, shard_tokens=shard_tokens,
                 **tokenizer_key(tok)) for _ in range(inputs)]
    start = _begin(out_dir, shard_tokens, tok)
    todo = _tokenize_in_pool(_tokenize_hf_input, [dataset] * inputs, jobs, out_dir, shard_tokens, start)
    manifests = _read_manifests(out_dir, inputs)
    source["stopped_by_budget"] = sum(m["budget"]["stopped"] for m in manifests if "budget" in m)
    return _finish(out_dir, source, manifests, todo, start, tok)


def _tokenize_tree_files(index, files, out_dir, shard_tokens, job, threads):
    read = {}  # filled in by tree_documents as it reads
    documents = tree_documents(files, job["val_fraction"], read, job.get("val_files", ()))
    return _tokenize_input(index, documents, out_dir, shard_tokens, job, threads, read)


def tokenize_tree(roots, include, out_dir, exclude=(), val_fraction=0.05, shard_tokens=SHARD_TOKENS,
                  input_bytes=INPUT_BYTES, max_bytes=0, tok=None):
    """Tokenize the text files under directories (the rules are at the top of this file) into shards under
    out_dir, in parallel and resumably as tokenize_pile does; write meta.json and return it. max_bytes: the
    budget (0 = none)."""
    if input_bytes < 1 or max_bytes < 0:
        raise InputError(f"input_bytes must be positive and max_bytes >= 0: {input_bytes} and {max_bytes}")
    roots = tree_roots(roots)
    files, skipped = tree_files(roots, include, exclude)
    files, left_out = _within_budget(files, max_bytes)
    inputs = _tree_inputs(files, input_bytes)
    tok = tok or tokenizer.GPT2Tokenizer()
    jobs = [dict(_tree_job(files, val_fraction, shard_tokens), **tokenizer_key(tok)) for files in inputs]
    forced = _val_files(files, val_fraction)
    if forced:  # the key only then: the outputs of the runs before it stay valid for resuming
        for job in jobs:
            job["val_files"] = forced
    start = _begin(out_dir, shard_tokens, tok)
    todo = _tokenize_in_pool(_tokenize_tree_files, [[f[:3] for f in files] for files in inputs], jobs, out_dir,
                             shard_tokens, start)
    manifests = _read_manifests(out_dir, len(jobs))
    for manifest in manifests:  # the walk's skips first, then the readers', in corpus order
        for reason, entry in manifest["read"]["skipped"].items():
            total = skipped.setdefault(reason, {"count": 0, "paths": []})
            total["count"] += entry["count"]
            total["paths"] = (total["paths"] + entry["paths"])[:SKIPPED_PATHS]
    source = {"kind": "tree", "roots": roots, "include": list(include), "exclude": list(exclude),
              "val_fraction": val_fraction, "input_bytes": input_bytes, "max_bytes": max_bytes,
              "left_out_by_max_bytes": left_out, "files": sum(m["read"]["files"] for m in manifests),
              "bytes": sum(m["read"]["bytes"] for m in manifests),
              "tokens": sum(m["splits"][s]["tokens"] for m in manifests for s in SPLITS),
              "skipped": dict(sorted(skipped.items()))}
    meta = _finish(out_dir, source, manifests, todo, start, tok)
    skips = ", ".join(f"{entry['count']:,} {reason}" for reason, entry in source["skipped"].items())
    print(f"{out_dir}: read {source['files']:,} files ({source['bytes'] / 1e6:,.1f} MB); skipped {skips or 'none'} "
          f"(see meta.json)")
    return meta


def _within_budget(files, max_bytes):
    """The first files of the corpus order whose sizes add up to at most max_bytes (all of them for 0), and
    what the budget left out: {"files": count, "bytes": their sizes' sum}."""
    sizes = np.cumsum([f[3] for f in files])
    n = int(np.searchsorted(sizes, max_bytes, side="right")) if max_bytes else len(files)
    if n == 0:
        raise InputError(f"--max_bytes {max_bytes}: the first file of the tree's order, {files[0][0]}, "
                         f"alone has {files[0][3]:,} bytes")
    return files[:n], {"files": len(files) - n, "bytes": int(sizes[-1] - sizes[n - 1])}


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


def _val_files(files, val_fraction):
    """[rel] of the file that goes to val although its hash does not send it there: the one with the lowest
    hash, when two or more files were found and the hash sends none (a small tree at a small val_fraction)."""
    rels = [f[1] for f in files]
    if val_fraction == 0 or len(rels) < 2 or any(_is_val(rel, val_fraction) for rel in rels):
        return []
    return [min(rels, key=lambda rel: (zlib.crc32(rel.encode("utf-8", "surrogateescape")) % 1000, rel))]


def _tree_job(files, val_fraction, shard_tokens):
    """What an input of tree is made from: its files, by a hash of their paths, sizes and mtimes."""
    listing = "".join(f"{path}\0{rel}\0{size}\0{mtime_ns}\n" for path, rel, _, size, mtime_ns in files)
    return {"files": len(files), "bytes": sum(f[3] for f in files), "first": files[0][0], "last": files[-1][0],
            "files_sha256": hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest(),
            "val_fraction": val_fraction, "shard_tokens": shard_tokens}


# -----------------------------------------------------------------------------
# Megatron-LM / GPT-NeoX indexed datasets (PREFIX.bin + PREFIX.idx), read where they lie

INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents; then the arrays
INDEX_MAGIC = b"MMIDIDX\x00\x00"
# the tokens' dtype codes of Megatron-core (8 = uint16). GPT-NeoX's are the same but for 6 and 7, float32 and
# float64 swapped, and no writer stores tokens as floats: both layouts read the same, a float code is refused.
INDEX_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}


def read_index(prefix):
    """PREFIX.idx, checked against its tokens: ([{"path", "dtype", "tokens"}] of the .bin, PREFIX.bin or the
    pieces PREFIX-00000-of-000NN.bin that Pythia's preshuffled Pile ships instead (byte ranges of one .bin), and
    the index: {"path", "sequences", "documents", "itemsize", "tokens"}, whose document_bounds() reads the
    documents' token offsets). The sequences must lie one after the other. Read INDEX_CHUNK entries at a time:
    the Pile's index is 2.9 GB."""
    idx = prefix + ".idx"
    if not os.path.isfile(idx):
        raise InputError(f"{idx}: no such file (name a dataset by its prefix: PREFIX.bin and PREFIX.idx)")
    with open(idx, "rb") as f:
        header = f.read(INDEX_HEADER.size)
    if len(header) < INDEX_HEADER.size or header[:len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise InputError(f"{idx}: unknown magic {header[:len(INDEX_MAGIC)]!r}, not a Megatron / GPT-NeoX index "
                         f"({INDEX_MAGIC!r})")
    _, version, code, n_sequences, n_documents = INDEX_HEADER.unpack(header)
    if version != 1:
        raise InputError(f"{idx}: index version {version}; only version 1 is known")
    if code not in INDEX_DTYPES:
        raise InputError(f"{idx}: dtype code {code} is {'a float type' if code in (6, 7) else 'unknown'}: tokens "
                         f"are integers, codes {sorted(INDEX_DTYPES)}")
    expected = INDEX_HEADER.size + 12 * n_sequences + 8 * n_documents
    if n_sequences == 0 or os.path.getsize(idx) not in (expected, expected + n_sequences):  # + Megatron's modes
        raise InputError(f"{idx}: {os.path.getsize(idx)} bytes, but its header says {n_sequences} sequences and "
                         f"{n_documents} documents ({expected} bytes): truncated, or empty")
    dtype = np.dtype(INDEX_DTYPES[code])
    index = {"path": idx, "sequences": n_sequences, "documents": n_documents, "itemsize": dtype.itemsize}
    index["tokens"] = _check_sequences(index)
    _check_documents(index)
    return _bin_pieces(prefix, dtype, index["tokens"], idx), index


def _read_ints(path, dtype, offset, count):
    """count integers of dtype at byte `offset` of a file: read, not memory-mapped, so that no page stays mapped."""
    with open(path, "rb") as f:
        f.seek(offset)
        return np.fromfile(f, dtype, count)


def _check_sequences(index):
    """The index's token count, after checking that each sequence starts where the one before ends."""
    path, n, itemsize, tokens = index["path"], index["sequences"], index["itemsize"], 0
    for at in range(0, n, INDEX_CHUNK):
        count = min(INDEX_CHUNK, n - at)
        lengths = _read_ints(path, "<i4", INDEX_HEADER.size + 4 * at, count).astype(np.int64)
        pointers = _read_ints(path, "<i8", INDEX_HEADER.size + 4 * n + 8 * at, count)
        starts = tokens + np.cumsum(lengths) - lengths
        if (lengths < 0).any() or (pointers != starts * itemsize).any():
            raise InputError(f"{path}: its sequences do not lie one after the other in the .bin")
        tokens = int(starts[-1] + lengths[-1])
    return tokens


def _check_documents(index):
    """Check that the document indices run from 0 to the number of sequences, never backwards."""
    last = 0
    for at in range(0, index["documents"], INDEX_CHUNK):
        documents = _document_indices(index, at, min(index["documents"], at + INDEX_CHUNK))
        if (at == 0 and documents[0] != 0) or documents[0] < last or (np.diff(documents) < 0).any():
            break
        last = documents[-1]
    else:
        if last == index["sequences"]:
            return
    raise InputError(f"{index['path']}: its document indices do not run from 0 to its {index['sequences']} sequences")


def _document_indices(index, first, stop):
    """Entries [first, stop) of the index's document indices: the sequence each document starts at."""
    offset = INDEX_HEADER.size + 12 * index["sequences"] + 8 * first
    return _read_ints(index["path"], "<i8", offset, stop - first)


def document_bounds(index, first, stop):
    """The token offsets of the starts of documents [first, stop) of an index (checked by read_index), the
    document `index["documents"] - 1` being the end of its tokens. Reads the pointers of those documents only."""
    documents = _document_indices(index, first, stop)
    n = index["sequences"]
    inside = np.minimum(documents, n - 1)
    low, high = int(inside[0]), int(inside[-1]) + 1  # a window of the pointers, mapped for this call alone
    pointers = np.memmap(index["path"], "<i8", "r", INDEX_HEADER.size + 4 * n + 8 * low, (high - low,))
    return np.where(documents < n, pointers[inside - low] // index["itemsize"], index["tokens"])


def _bin_pieces(prefix, dtype, tokens, idx):
    """The .bin of an index, whole or in pieces, checked to hold its tokens."""
    paths = [prefix + ".bin"] if os.path.isfile(prefix + ".bin") else sorted(
        glob.glob(glob.escape(prefix) + "-[0-9]*-of-[0-9]*.bin"))
    if not paths:
        raise InputError(f"{prefix}.bin: no such file (nor its pieces {prefix}-00000-of-NNNNN.bin)")
    sizes = [os.path.getsize(path) for path in paths]
    if sum(sizes) != tokens * dtype.itemsize:
        pieces = f" and its {len(paths) - 1} other pieces" if len(paths) > 1 else ""
        raise InputError(f"{paths[0]}{pieces}: {sum(sizes):,} bytes, but {idx} says {tokens:,} tokens of "
                         f"{dtype.name} ({tokens * dtype.itemsize:,} bytes)")
    for path, size in zip(paths, sizes):
        if size % dtype.itemsize:
            raise InputError(f"{path}: {size:,} bytes, cut inside a {dtype.name} token")
    return [{"path": os.path.abspath(path), "dtype": dtype.str, "tokens": size // dtype.itemsize}
            for path, size in zip(paths, sizes) if size]


def _check_vocabulary(index, span, out_dir, shard_tokens, job, threads):
    """Input `index` of megatron's pass: tokens [start, end) of one .bin, read in order, each checked to be an id of
    the tokenizer's vocabulary; its manifest marks it done."""
    path, dtype, start, end = span
    dtype, vocab_size = np.dtype(dtype), job["vocab_size"]
    for at in range(start, end, CHECK_CHUNK):
        # a map of this chunk alone: its pages leave the process with it (a map of the span would keep them all)
        chunk = np.memmap(path, dtype, "r", at * dtype.itemsize, (min(end, at + CHECK_CHUNK) - at,))
        if chunk.max() >= vocab_size or (dtype.kind == "i" and chunk.min() < 0):
            bad = int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
            raise InputError(f"{path}: token {int(chunk[bad])} at token offset {at + bad:,} is not in the vocabulary "
                             f"of {job['encoding']!r} ({vocab_size:,} ids): is that the tokenizer of this data?")
    manifest = {"job": job, "tokens": end - start, "splits": {}}
    write_json(_manifest_path(out_dir, index), manifest)
    return manifest


def _check_spans(pieces, check_tokens, check_fraction):
    """The spans (path, dtype, start, end) of the vocabulary check: the pieces cut into spans of check_tokens, and
    of those ceil(check_fraction * count) spread evenly, the first one always (all of them for 1)."""
    spans = [(piece["path"], piece["dtype"], at, min(at + check_tokens, piece["tokens"]))
             for piece in pieces for at in range(0, piece["tokens"], check_tokens)]
    sampled = min(len(spans), math.ceil(check_fraction * len(spans)))
    return [spans[i * len(spans) // sampled] for i in range(sampled)]


def prepare_megatron(prefixes, out_dir, tok, val_fraction=0.05, check_tokens=CHECK_TOKENS,
                     check_fraction=CHECK_FRACTION):
    """Make out_dir read Megatron-LM / GPT-NeoX indexed datasets where they lie, copying no token: every header and
    size checked, then a sample of the tokens (check_fraction of them, in spans of check_tokens; 1: every one)
    checked against tok's vocabulary (in parallel, resumably), then {split}.runs.npy and meta.json (the .bin
    files, their subsets: each dataset's name) for data.py's IndexedSequences. The rest is checked as it is read:
    IndexedSequences.get refuses a window with a token beyond the vocabulary."""
    if check_tokens < 1 or not 0 < check_fraction <= 1:
        raise InputError(f"--check_tokens must be positive and --check_fraction in (0, 1]: got {check_tokens} and "
                         f"{check_fraction}")
    datasets = [read_index(prefix) for prefix in prefixes]  # every header and size checked before any write
    spans = _check_spans([piece for pieces, _ in datasets for piece in pieces], check_tokens, check_fraction)
    jobs = [{"file": path, "bytes": os.path.getsize(path), "mtime_ns": os.stat(path).st_mtime_ns, "dtype": dtype,
             "span": [at, end], "vocab_size": tok.vocab_size, **tokenizer_key(tok)} for path, dtype, at, end in spans]
    start = _begin(out_dir, SHARD_TOKENS, tok)
    todo = _tokenize_in_pool(_check_vocabulary, spans, jobs, out_dir, SHARD_TOKENS, start)
    names = sorted({os.path.basename(prefix) for prefix in prefixes})
    splits, lengths = _indexed_runs(prefixes, [index for _, index in datasets], names, val_fraction, out_dir)
    for split, counts in splits.items():
        if counts["documents"] == 0 and (split == "train" or val_fraction > 0):
            raise InputError(f"{out_dir}: the {split} split got no documents of the {sum(splits[s]['documents'] for s in SPLITS)} "
                             f"(see --val_fraction)")
    for path in glob.glob(os.path.join(out_dir, "input_*.json")):
        if int(os.path.basename(path)[len("input_"):-len(".json")]) >= len(jobs):
            os.remove(path)  # an earlier run's, of more spans
    record = tok.record()
    meta = {"tokenizer": record, "encoding": record["name"], "vocab_size": record["vocab_size"], "eot": record["eot"],
            "source": {"kind": "megatron", "prefixes": [os.path.abspath(p) for p in prefixes],
                       "val_fraction": val_fraction, "check_tokens": check_tokens, "check_fraction": check_fraction,
                       "checked_tokens": sum(end - at for _, _, at, end in spans)},
            "indexed": {"pieces": [piece for pieces, _ in datasets for piece in pieces],
                        "document_tokens": lengths.pop() if len(lengths) == 1 else None},
            "subsets": names, "splits": splits, "inputs": _read_manifests(out_dir, len(jobs))}
    write_json(os.path.join(out_dir, "meta.json"), meta)
    checked, seconds = sum(spans[i][3] - spans[i][2] for i in todo), time.time() - start
    print(f"{out_dir}: done, {len(todo)} of {len(jobs)} spans checked now, {checked:,} tokens in {seconds:.1f}s "
          f"({checked / seconds:,.0f} tokens/s); " +
          ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} documents" for s, v in splits.items()))
    return meta


def _indexed_runs(prefixes, indexes, names, val_fraction, out_dir):
    """Write {split}.runs.npy: per split, int64 rows (first token, tokens, subset) of its runs of consecutive
    documents in the concatenation of the datasets' tokens. Returns per split its counts, and the set of document
    lengths (one value iff every document has it). A document goes to val by a hash of (its dataset's name, its
    index) (_is_val_index). Streamed: INDEX_CHUNK documents at a time, the rows through a file."""
    files = {s: _RowsFile(os.path.join(out_dir, f"{s}.runs.npy")) for s in SPLITS}
    splits, lengths, offset = {s: {"tokens": 0, "documents": 0} for s in SPLITS}, set(), 0
    for prefix, index in zip(prefixes, indexes):
        name = os.path.basename(prefix)
        for runs in _dataset_runs(index, name, val_fraction, lengths):
            for split, in_val in (("train", 0), ("val", 1)):
                mine = runs[runs[:, 0] == in_val]
                splits[split]["tokens"] += int(mine[:, 2].sum())
                splits[split]["documents"] += int(mine[:, 3].sum())
                rows = np.stack([offset + mine[:, 1], mine[:, 2], np.full(len(mine), names.index(name))], axis=1)
                files[split].add(rows[rows[:, 1] > 0])
        offset += index["tokens"]
    for rows_file in files.values():
        rows_file.close()
    return splits, lengths


def _dataset_runs(index, name, val_fraction, lengths):
    """The runs of consecutive documents of one split in one dataset, in order, as int64 rows (in val, first token,
    tokens, documents), a block of them per INDEX_CHUNK documents: the run still open at a block's end goes on in
    the next block. Adds to `lengths` the shortest and longest document of each block."""
    n, pending = index["documents"] - 1, None
    for at in range(0, n, INDEX_CHUNK):
        stop = min(n, at + INDEX_CHUNK)
        bounds = document_bounds(index, at, stop + 1)
        sizes = np.diff(bounds)
        lengths |= {int(sizes.min()), int(sizes.max())}
        val = _is_val_index(name, stop - at, val_fraction, first=at)
        first = np.concatenate([[0], np.flatnonzero(val[1:] != val[:-1]) + 1])
        last = np.append(first[1:], stop - at)
        runs = np.stack([val[first], bounds[first], bounds[last] - bounds[first], last - first], axis=1)
        if pending is not None and pending[0] == runs[0, 0]:  # one run across the blocks' border
            runs[0, 1:] = pending[1], pending[2] + runs[0, 2], pending[3] + runs[0, 3]
        elif pending is not None:
            runs = np.concatenate([pending[None], runs])
        pending = runs[-1]
        yield runs[:-1]
    if pending is not None:
        yield pending[None]


class _RowsFile:
    """An (n, 3) int64 .npy written a block of rows at a time: the rows go to a temporary file, and close() writes
    the .npy (atomically) once their number is known."""

    def __init__(self, path):
        self.path, self.count = path, 0
        self.rows = open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.rows.tmp"), "wb")

    def add(self, rows):
        self.rows.write(rows.astype("<i8").tobytes())
        self.count += len(rows)

    def close(self):
        self.rows.close()
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (self.count, 3)})
        with open(self.rows.name, "rb") as rows:
            atomic_write(self.path, itertools.chain([header.getvalue()], iter(lambda: rows.read(1 << 24), b"")))
        os.remove(self.rows.name)


def _is_val_index(name, n, val_fraction, first=0):
    """Whether each of a dataset's documents first .. first+n-1 goes to val: by a hash of (name, index) as _is_val's of
    a key, but vectorized (crc32 of a key a document would take minutes for the Pile's 134M)."""
    x = np.arange(first, first + n, dtype=np.uint64) + np.uint64(zlib.crc32(name.encode("utf-8")) << 32)
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):  # splitmix64: every bit moves all
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(factor)
    return (x ^ (x >> np.uint64(31))) % np.uint64(1000) < round(val_fraction * 1000)


# -----------------------------------------------------------------------------
# a tokenizer trained on the corpus


def train_split_texts(data_dir, max_bytes=0):
    """The documents of a data directory's train split as text (decoded with its own tokenizer, cut at its end-of-text
    tokens), in the order of its shards, the first up to max_bytes bytes of text (0 = all)."""
    shards = sorted(glob.glob(os.path.join(data_dir, "train_*.bin")))
    if not shards:
        raise InputError(f"--data_dir {data_dir}: no train_*.bin shards (made by prepare.py stdlib, text, pile, ...)")
    tok, total = tokenizer.of_data(data_dir), 0
    for shard in shards:
        tokens = np.asarray(read_bin(shard))
        # the text between end-of-text tokens; a document across two shards as its two pieces (BPE's pre-tokenization
        # cuts the text into words before it counts pairs: one word at most is lost to the cut)
        ends = np.flatnonzero(tokens == tok.eot)
        for start, end in zip(np.concatenate([[0], ends + 1]), np.concatenate([ends, [len(tokens)]])):
            if end <= start:
                continue
            text = tok.decode(tokens[start:end].tolist())
            total += len(text.encode("utf-8"))
            if max_bytes and total > max_bytes:
                return
            yield text


def train_tokenizer(data_dir, vocab_size, out_dir, max_bytes=0):
    """prepare.py bpe: a byte-level BPE of vocab_size tokens trained on data_dir's train split (the val split never
    seen), saved in out_dir for --tokenizer. The same split gives the same tokenizer."""
    if os.path.exists(out_dir):
        raise InputError(f"--out_dir {out_dir} exists: a tokenizer is trained once; remove it to train another")
    if vocab_size < 257:
        raise InputError(f"--vocab_size {vocab_size}: at least 257 (the 256 bytes and <|endoftext|>)")
    started = time.time()
    tok = tokenizer.save_bpe(tokenizer.train_bpe(train_split_texts(data_dir, max_bytes), vocab_size), out_dir)
    print(f"trained {tokenizer.describe(tok.record())} on {data_dir}'s train split in {time.time() - started:.0f} s: "
          f"{out_dir} (vocab_sha256 {tok.record()['vocab_sha256'][:12]}); now python prepare.py ... --tokenizer {out_dir}")


# -----------------------------------------------------------------------------
# command line


def argument_parser():
    """prepare.py's command line: a subcommand per source, and bpe."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--val_fraction", type=float, default=0.05, help="share of documents for val (0.001 steps)")
    common.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="max tokens per .bin shard")
    common.add_argument("--tokenizer", default="", metavar="DIR",
                        help="a transformers model's or tokenizer's directory (default: GPT-2's BPE, by tiktoken)")
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
    p.add_argument("--max_bytes", type=int, default=0, help="the first files of the order up to N bytes")
    p.add_argument("--out_dir", required=True)
    table = argparse.ArgumentParser(add_help=False, parents=[common])  # parquet and hf: rows of a table
    table.add_argument("--text_column", default="text", help="the column of the documents' text")
    table.add_argument("--subset_column", default="", help="a column naming each row's subset (e.g. dump, source)")
    table.add_argument("--max_tokens", type=float, default=0, help="budget: stop at N tokens (shared by the inputs)")
    table.add_argument("--max_bytes", type=float, default=0, help="budget: stop at N bytes of text")
    table.add_argument("--out_dir", required=True)
    p = sub.add_parser("parquet", parents=[table], help="parquet files with a text column (FineWeb, DCLM, ...)")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("hf", parents=[table], help="a Hugging Face dataset: a hub name, or a local one")
    p.add_argument("dataset", help="load_dataset's path (streamed), or a save_to_disk directory")
    p.add_argument("--name", default=None, help="the dataset's configuration (e.g. sample-10BT)")
    p.add_argument("--split", default="train")
    p.add_argument("--data_files", nargs="*", default=None, help="load_dataset's data_files")
    p = sub.add_parser("megatron", parents=[common], help="Megatron-LM / GPT-NeoX indexed datasets, read in place")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX", help="PREFIX.bin (or its pieces) and PREFIX.idx")
    p.add_argument("--check_tokens", type=int, default=CHECK_TOKENS, help="tokens per span of the vocabulary check")
    p.add_argument("--check_fraction", type=float, default=CHECK_FRACTION,
                   help="share of the tokens checked now, spans spread evenly (1: every token; the others are "
                        "checked as training reads them)")
    p.add_argument("--out_dir", required=True)
    p = sub.add_parser("bpe", help="train a byte-level BPE tokenizer on a data directory's train split")
    p.add_argument("--data_dir", required=True, help="a data directory (of any tokenizer): the text to train on")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--max_bytes", type=float, default=0, help="the split's first documents up to N bytes (0 = all)")
    p.add_argument("--out_dir", required=True, help="the tokenizer's directory, for --tokenizer")
    return parser


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.source == "bpe":
        return train_tokenizer(args.data_dir, args.vocab_size, args.out_dir, int(args.max_bytes))
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.source == "megatron" and not args.tokenizer:
        parser.error(f"megatron: name the tokenizer (--tokenizer DIR, or {tokenizer.GPT2} for GPT-2's): the .bin "
                     f"files do not say which one made them")
    tok = tokenizer.for_prepare(args.tokenizer)

    if args.source == "megatron":
        return prepare_megatron(args.prefixes, args.out_dir, tok, args.val_fraction, args.check_tokens,
                                args.check_fraction)
    if args.source in ("parquet", "hf"):
        return _tokenize_table(args, tok)
    if args.source == "pile":
        source = {"kind": "pile", "files": args.files, "val_fraction": args.val_fraction}
        return tokenize_pile(args.files, args.out_dir, source, args.val_fraction, args.shard_tokens, tok)
    if args.source == "tree":
        if args.exclude == []:  # --exclude and nothing after it: a pattern lost to the shell?
            raise InputError("tree: --exclude without a pattern")
        roots = args.roots + (python_roots() if args.python else [])
        return tokenize_tree(roots, args.include or [], args.out_dir, args.exclude or [], args.val_fraction,
                             args.shard_tokens, args.input_bytes, args.max_bytes, tok)
    if args.source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        source = {"kind": "stdlib", "root": root, "python": sys.version.split()[0]}
        documents = stdlib_documents(args.val_fraction, root, subsets=True)
    else:
        source = {"kind": "text", "files": args.files}
        documents = text_documents(args.files, args.val_fraction)  # pairs: their subset is "text"
    source["val_fraction"] = args.val_fraction
    return tokenize(documents, args.out_dir, source, args.shard_tokens, tok)


def _tokenize_table(args, tok):
    """prepare.py parquet and hf."""
    if args.max_tokens < 0 or args.max_bytes < 0:
        raise InputError(f"--max_tokens and --max_bytes must be >= 0: {args.max_tokens:g} and {args.max_bytes:g}")
    settings = {"val_fraction": args.val_fraction, "text_column": args.text_column,
                "subset_column": args.subset_column, "max_tokens": int(args.max_tokens),
                "max_bytes": int(args.max_bytes)}
    if args.source == "parquet":
        for path in args.files:  # each one's footer and columns, before anything is written
            open_parquet(path, [args.text_column] + ([args.subset_column] if args.subset_column else []))
        source = dict(settings, kind="parquet", files=args.files)
        return tokenize_files(_tokenize_parquet_file, args.files, args.out_dir, source, settings, args.shard_tokens,
                              tok)
    dataset = {"path": args.dataset, "name": args.name, "split": args.split, "data_files": args.data_files}
    return tokenize_hf(dataset, args.out_dir, dict(settings, kind="hf", dataset=dataset), settings,
                       args.shard_tokens, tok)


if __name__ == "__main__":
    report_input_errors()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the workers too, as Ctrl-C does
    main()
