"""
Tokens on disk -> batches: what training reads, from the shards that prepare.py writes.

A split is the {split}_*.bin shards of a directory, in sorted order: the llm.c shard format (256 int32 header
[MAGIC, VERSION, token_count, 0...], then the tokens: uint16 in version 1, uint32 in version 2, for vocabularies
beyond 65,536 such as Llama 3's), or the single headerless uint16 {split}.bin of nanoGPT's prepare.py. Beside
each shard prepare.py writes a .docs.npy (where each document starts, and its subset), and meta.json names the
tokenizer (tokenizer.py), its vocabulary size and the shards of each split (prepare.py's docstring has the
details); data without meta.json is GPT-2's.

- TokenSequences: fixed windows of block_size+1 tokens, each with a stable integer id, so that SALT_DS can
  score sequences and select them by id; domains() gives each window's data subset.
- BatchLoader: a seeded per-epoch permutation of the allowed ids (every sequence, or SALT_DS's selection), cut
  into batches and strided over ranks, resumable via state_dict; epoch_order is that permutation, one random
  stream per role and part of the data.
"""
import glob
import hashlib
import mmap
import os
import zlib

import numpy as np
import torch

from common import InputError
from tokenizer import GPT2_VOCAB_SIZE, read_data_meta

MAGIC = 20240520  # llm.c / modded-nanogpt shard magic
TOKEN_DTYPES = {1: "<u2", 2: "<u4"}  # shard version -> token dtype (llm.c: 1 for GPT-2's, 2 for Llama 3's)
HEADER_INTS = 256
EDGE_TOKENS = 32 * 1024  # tokens read from each end of a shard when opening it (64 KiB)
# the data order's version, kept in checkpoints: 2 since every random stream has its own key (epoch_order) and
# SALT's stage 2 goes on with its loader (train.py); a checkpoint of version 1 would read other data from its step on
ORDER_VERSION = 2


def read_bin(path):
    """Read-only token array of a shard: llm.c format (uint16 or uint32), or a headerless nanoGPT uint16 file.

    A headerless GPT-2 file cannot be mistaken for a header: MAGIC's low uint16 is 54472 >= GPT-2's 50257 tokens.
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
    if header[1] not in TOKEN_DTYPES:
        raise InputError(f"{path}: unsupported shard version {header[1]} (expected one of {sorted(TOKEN_DTYPES)})")
    dtype, count = np.dtype(TOKEN_DTYPES[int(header[1])]), int(header[2])
    if size != header_bytes + dtype.itemsize * count:
        raise InputError(f"{path}: header says {count} tokens ({header_bytes + dtype.itemsize * count} bytes) "
                         f"but the file has {size} bytes (truncated or corrupt)")
    if count == 0:  # numpy cannot memory-map zero bytes
        tokens = np.zeros(0, dtype=dtype)
        tokens.flags.writeable = False
        return tokens
    return np.memmap(path, dtype=dtype, mode="r", offset=header_bytes, shape=(count,))


def docs_path(shard_path):
    """The .docs.npy beside a shard: (offset of its EOT, subset index) of each document starting in it."""
    return shard_path[:-len(".bin")] + ".docs.npy"


# -----------------------------------------------------------------------------
# training sequences and batches


class TokenSequences:
    """Fixed windows of block_size+1 tokens at stride block_size inside each shard of a split.

    Window i of a shard is tokens[i*T : i*T+T+1] (windows never cross shards); its id is the shard's
    offset + i, over the split's shards in sorted order, so ids are stable for a given data_dir.
    max_sequences keeps only ids [0, max_sequences), e.g. a small demo pool. domains() gives each id's subset.
    vocab_size is meta.json's (GPT-2's without one): a token at or beyond it is an error naming its shard.
    """

    def __new__(cls, data_dir, *args, **kwargs):
        # a directory of prepare.py megatron reads someone else's .bin files in place: the same interface
        meta = read_data_meta(data_dir) if cls is TokenSequences else None
        indexed = meta and meta.get("source", {}).get("kind") == "megatron"
        return super().__new__(IndexedSequences if indexed else cls)

    def __init__(self, data_dir, split, block_size, max_sequences=None):
        if block_size < 1:
            raise InputError(f"block_size must be positive, got {block_size}")
        self.data_dir, self.split, self.block_size = data_dir, split, block_size
        # {split}_000000.bin ... from prepare.py, or a nanoGPT prepare.py output's single {split}.bin
        self.shards = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin"))) or glob.glob(
            os.path.join(data_dir, f"{split}.bin"))
        if not self.shards:
            raise InputError(f"no {split}_*.bin shards in {data_dir!r}; prepare them first, e.g. "
                             f"`python prepare.py stdlib --out_dir {data_dir}` (see python prepare.py -h)")
        meta = read_data_meta(data_dir)
        self.vocab_size = meta["vocab_size"] if meta else GPT2_VOCAB_SIZE
        if meta and "splits" in meta:  # one tokenization: meta.json lists every shard it wrote
            for path in self.shards:
                if os.path.basename(path) not in meta["splits"][split]["shards"]:
                    raise InputError(f"{path} is not a shard of {os.path.join(data_dir, 'meta.json')} (made with "
                                     f"tokenizer {meta.get('encoding')!r}): a shard of another tokenization? Move it "
                                     f"away, or tokenize again into an empty directory")
        self.tokens = [random_access(read_bin(path)) for path in self.shards]
        for path, tokens in zip(self.shards, self.tokens):
            # the ends only: reading every token is 600 GB for the Pile. A file that is not a shard of ours (a
            # wrong magic reads as a headerless file) shows at the start; get() checks every window it returns.
            self._check_vocab(path, np.concatenate([tokens[:EDGE_TOKENS], tokens[-EDGE_TOKENS:]]))
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
        out = self._windows(ids)
        if out.size and out.max() >= self.vocab_size:  # cheap next to the copy; open checked the shards' ends only
            row = int(np.argmax(out.max(axis=1)))
            self._check_vocab(f"{self._file_of(ids[row])} (sequence {ids[row]})", out[row])
        return torch.from_numpy(out)

    def _windows(self, ids):
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        T = self.block_size
        out = np.empty((ids.size, T + 1), dtype=np.int64)
        for row, (s, i) in enumerate(zip(shard, ids - self.offsets[shard])):
            out[row] = self.tokens[s][i * T: i * T + T + 1]
        return out

    def _file_of(self, sequence_id):
        return self.shards[np.searchsorted(self.offsets, sequence_id, side="right") - 1]

    def domains(self):
        """(int64 array of len(self), list of names): the subset of each sequence id, as an index into the names.
        A sequence's subset is that of the document its first token lies in, which may have begun in an
        earlier shard; prepare.py's docstring says what the subsets are."""
        meta_path = os.path.join(self.data_dir, "meta.json")
        meta = read_data_meta(self.data_dir) or {}
        if "subsets" not in meta:
            raise InputError(f"{self.data_dir!r} has no document subsets (made before they were recorded, or "
                             f"not by prepare.py): re-tokenize it with `python prepare.py ... --out_dir "
                             f"{self.data_dir}`")
        names = meta["subsets"]
        # docs.npy holds indices into its input's own subset list: map them to indices into names
        lookup = {shard: np.array([names.index(n) for n in m["subsets"]], dtype=np.int64)
                  for m in meta["inputs"] for shard in m["splits"][self.split]["shards"]}
        out = np.empty(len(self), dtype=np.int64)
        carry = -1  # the subset of the document still open at the end of the previous shard
        for path, first, end in zip(self.shards, self.offsets[:-1], np.minimum(self.offsets[1:], len(self))):
            if first >= len(self):
                break
            if os.path.basename(path) not in lookup or not os.path.exists(docs_path(path)):
                raise InputError(f"{docs_path(path)}: missing, or {path} is not in {meta_path}: re-tokenize "
                                 f"with `python prepare.py ... --out_dir {self.data_dir}`")
            docs = np.load(docs_path(path))
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

    def _check_vocab(self, where, tokens):
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise InputError(f"{where}: token id {int(tokens.max())} >= vocab size {self.vocab_size}")


class IndexedSequences(TokenSequences):
    """TokenSequences over Megatron-LM / GPT-NeoX indexed datasets, their .bin files memory-mapped where they lie
    (prepare.py megatron checked them and wrote meta.json's "indexed" and {split}.runs.npy).

    A split is a stream: its runs (rows: first token, tokens, subset), each a range of consecutive documents of
    that split in the concatenation of every .bin, one after the other. Windows are at stride block_size along it,
    as in a shard; but where every document has the same length L >= block_size+1 (fixed training sequences, as
    Pythia's 2049 tokens), windows lie inside documents, (L-1)//block_size each: block_size 2048 reads exactly
    Pythia's sequences. Ids are int64 and stable for a given data_dir.
    """

    def __init__(self, data_dir, split, block_size, max_sequences=None):
        if block_size < 1:
            raise InputError(f"block_size must be positive, got {block_size}")
        self.data_dir, self.split, self.block_size = data_dir, split, block_size
        meta = read_data_meta(data_dir)
        self.vocab_size, indexed = meta["vocab_size"], meta["indexed"]
        self.shards = [piece["path"] for piece in indexed["pieces"]]
        self.tokens = [_map_piece(piece) for piece in indexed["pieces"]]
        self.piece_offsets = np.concatenate([[0], np.cumsum([len(t) for t in self.tokens])]).astype(np.int64)
        self.runs = np.load(os.path.join(data_dir, f"{split}.runs.npy"), mmap_mode="r")
        self.stream = np.concatenate([[0], np.cumsum(self.runs[:, 1])]).astype(np.int64)  # where each run starts
        length = indexed["document_tokens"]  # None: documents of many lengths
        if length and length >= block_size + 1:
            self.per_document, self.length = (length - 1) // block_size, length
            counts = self.runs[:, 1] // length * self.per_document
            self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first window of each run
            total = int(self.offsets[-1])
        else:
            self.per_document, total = 0, max(0, (int(self.stream[-1]) - 1) // block_size)
        self.n_sequences = total if max_sequences is None else min(max_sequences, total)

    def _starts(self, ids):
        """Where each window starts in the split's stream."""
        if not self.per_document:
            return ids * self.block_size
        run = np.searchsorted(self.offsets, ids, side="right") - 1
        document, i = np.divmod(ids - self.offsets[run], self.per_document)
        return self.stream[run] + document * self.length + i * self.block_size

    def _windows(self, ids):
        out = np.empty((ids.size, self.block_size + 1), dtype=np.int64)
        for row, start in enumerate(self._starts(ids)):
            _gather(out[row], start, self.stream, lambda k, at, n: _gather(
                np.empty(n, np.int64), int(self.runs[k, 0]) + at, self.piece_offsets,
                lambda p, at_, n_: self.tokens[p][at_:at_ + n_]))
        return out

    def _file_of(self, sequence_id):
        run = np.searchsorted(self.stream, self._starts(np.int64(sequence_id)), side="right") - 1
        return self.shards[np.searchsorted(self.piece_offsets, self.runs[run, 0], side="right") - 1]

    def domains(self):
        """The subset of each window: that of the run its first token lies in (meta.json's "subsets": one per
        dataset named to prepare.py megatron). Made run by run, the array of the answer alone, in the smallest
        integer type that holds the subsets' indices: 139 MB for the Pile's 139M sequences (1.1 GB in int64)."""
        names = read_data_meta(self.data_dir)["subsets"]
        if self.per_document:
            counts = np.diff(self.offsets)  # the windows of each run
        else:  # the window starts, multiples of block_size, in each run's [start, end) of the stream
            counts = np.diff(-(-self.stream // self.block_size))
        runs = int(np.searchsorted(np.cumsum(counts), len(self))) + 1  # those that hold the first len(self)
        subsets = np.asarray(self.runs[:runs, 2]).astype(np.min_scalar_type(max(0, len(names) - 1)))
        return np.repeat(subsets, counts[:runs])[:len(self)], names

    def fingerprint(self):
        """The .bin files' (as TokenSequences'), and the split's runs."""
        runs = hashlib.sha256(np.ascontiguousarray(self.runs)).hexdigest()  # the file's pages, not a copy
        return hashlib.sha256(f"{super().fingerprint()} runs={runs}".encode()).hexdigest()


def _gather(out, position, offsets, read):
    """Fill out with the tokens from `position` on of a concatenation of parts, part k holding positions
    [offsets[k], offsets[k+1]) and read(k, at, n) giving its n tokens from its own position `at`."""
    k, filled = int(np.searchsorted(offsets, position, side="right")) - 1, 0
    while filled < len(out):
        n = int(min(len(out) - filled, offsets[k + 1] - position))
        out[filled:filled + n] = read(k, int(position - offsets[k]), n)
        filled, position, k = filled + n, position + n, k + 1
    return out


def _map_piece(piece):
    """A .bin (or one piece of it) of an indexed dataset, memory-mapped, checked to be the size prepare.py saw."""
    path, dtype = piece["path"], np.dtype(piece["dtype"])
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size != piece["tokens"] * dtype.itemsize:
        raise InputError(f"{path}: {'missing' if size is None else f'{size} bytes'}, but prepare.py megatron read "
                         f"{piece['tokens'] * dtype.itemsize} bytes there: moved or changed? Prepare it again")
    return random_access(np.memmap(path, dtype=dtype, mode="r", shape=(piece["tokens"],)))


def random_access(tokens):
    """A memory-mapped shard or .bin, its pages marked for random reads (MADV_RANDOM): a batch reads scattered
    windows, and the kernel's readahead would otherwise read 128 KiB or more around each 4 KiB window (a random
    batch of 2049-token windows of a sparse 600 GB .bin read 140x faster with it: bench_data.py pythia)."""
    if isinstance(tokens, np.memmap) and hasattr(mmap, "MADV_RANDOM"):
        tokens._mmap.madvise(mmap.MADV_RANDOM)
    return tokens


def epoch_order(ids, seed, stream, epoch):
    """The order in which epoch `epoch` of a random stream reads `ids` (an int n: the ids 0..n-1), a permutation drawn
    from default_rng([seed, stream's key, epoch]): its own generator per epoch (no global RNG: exact resume), and
    one stream per role and part of the data, so that no two of them correlate, whatever their seeds (numpy's
    permutations of pools of different lengths from one seed do: stream 'slm/pool' against 'student/pool')."""
    key = zlib.crc32(stream.encode())
    if isinstance(ids, (int, np.integer)):  # int32 where it fits: half the memory at the Pile's 146M sequences, and
        ids = np.arange(ids, dtype=np.int32 if ids < 2 ** 31 else np.int64)  # the same order as permutation(n)
    return np.random.default_rng([seed, key, epoch]).permutation(ids)


class BatchLoader:
    """Batches of sequences: epoch e reads the allowed ids (every sequence, or SALT_DS's selection) in
    epoch_order(ids, seed, stream, e), cut into blocks of batch_size. An optimizer step reads the next
    accumulation * world_size blocks: micro-step m of rank r reads block m * world_size + r of them.

    So the global batches depend on batch_size and accumulation * world_size alone: 2 ranks with 1 accumulation
    step read what 1 process with 2 reads (micro-step m of step s: block 2s+m), and a run may resume on another
    number of ranks that keeps the product. An epoch is as many whole steps as fit; its other blocks are dropped.
    `skip`: ids left out of epoch 0 (SALT_DS's stage 2 leaves out what stage 1 read: train.py), in every later
    epoch read again.
    """

    def __init__(self, sequences, batch_size, rank=0, world_size=1, seed=0, ids=None, accumulation=1,
                 device='cpu', stream='student/pool', skip=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.sequences, self.batch_size, self.rank, self.world_size, self.seed = (
            sequences, batch_size, rank, world_size, seed)
        self.accumulation, self.stream, self.device = accumulation, stream, torch.device(device)
        # a subset (e.g. SALT_DS's selection) is a set: sorted and deduplicated, so its order can't matter
        # (every sequence: their number, epoch_order's range)
        self.ids = len(sequences) if ids is None else np.asarray(ids, dtype=np.int64)
        if ids is not None and not (self.ids[1:] > self.ids[:-1]).all():  # select_top's are: no sort of 18M ids
            self.ids = np.unique(self.ids)
        self.n_ids = len(sequences) if ids is None else len(self.ids)
        if ids is not None and self.n_ids and (self.ids[0] < 0 or self.ids[-1] >= len(sequences)):
            raise IndexError(f"ids must be in [0, {len(sequences)})")
        self.skip = None if skip is None or not len(skip) else np.asarray(skip, dtype=np.int64)
        if self.n_ids // self.global_batch == 0:
            raise InputError(f"{self.n_ids} sequences are too few for batch_size*world_size*grad_accum_steps = "
                             f"{batch_size}*{world_size}*{accumulation}; use a smaller batch or more data")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def global_batch(self):
        return self.batch_size * self.world_size * self.accumulation

    def order(self, epoch):
        """The ids epoch `epoch` reads, in order (whole steps of them; the rest of the epoch is dropped)."""
        if self._order_epoch != epoch:
            order = epoch_order(self.ids, self.seed, self.stream, epoch)
            if epoch == 0 and self.skip is not None:  # a mask over the pool: no sort of the Pile's 146M ids
                keep = np.ones(len(self.sequences), dtype=bool)
                keep[self.skip] = False
                order = order[keep[order]]
            self._order = order[:len(order) // self.global_batch * self.global_batch]
            self._order_epoch = epoch
        return self._order

    def batches_in(self, epoch):
        """This rank's batches in epoch `epoch`."""
        return len(self.order(epoch)) // self.global_batch * self.accumulation

    def next_batch(self):
        """(x, y) LongTensors (batch_size, block_size) on the loader's device, y = x shifted by one token."""
        while self.position == self.batches_in(self.epoch):  # (an epoch 0 whose skip leaves no whole step: none)
            self.epoch, self.position = self.epoch + 1, 0
        block = self.position * self.world_size + self.rank
        ids = self.order(self.epoch)[block * self.batch_size: (block + 1) * self.batch_size]
        self.position += 1
        self.last_ids = ids  # what this batch read (train.py's log_ids)
        windows = self.sequences.get(ids)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.device.type == 'cuda':  # from pinned memory, asynchronously: the step need not wait for it
            return [t.pin_memory().to(self.device, non_blocking=True) for t in (x, y)]
        return x, y

    def read_ids(self, steps):
        """The ids the first `steps` optimizer steps read, on every rank together: ascending, each once."""
        read, epoch = np.zeros(len(self.sequences), dtype=bool), 0
        while steps > 0 and (epoch == 0 or read.sum() < self.n_ids):  # a few epochs read every id
            order = self.order(epoch)
            taken = min(steps, len(order) // self.global_batch)
            read[order[:taken * self.global_batch]] = True
            steps, epoch = steps - taken, epoch + 1
        return np.flatnonzero(read)

    def state_dict(self):
        """Where the job is, on any number of ranks: the epoch and the blocks all ranks have read in it, and the
        version of the data order (ORDER_VERSION), which a checkpoint of another cannot continue."""
        return {"epoch": int(self.epoch), "blocks": int(self.position * self.world_size), "order": ORDER_VERSION}

    def load_state_dict(self, state):
        position, rest = divmod(state["blocks"], self.world_size)
        if rest or not 0 <= position <= self.batches_in(state["epoch"]):  # saved with another global batch?
            raise ValueError(f"{state['blocks']} blocks read in epoch {state['epoch']}: not a whole number of batches "
                             f"per rank within the {self.batches_in(state['epoch'])} of that epoch on "
                             f"{self.world_size} ranks")
        self.epoch, self.position = int(state["epoch"]), position
