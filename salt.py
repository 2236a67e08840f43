"""
SALT, the method (Rawat et al. 2024, "A Little Help Goes a Long Way: Efficient LLM Training by Leveraging
Small LMs", arXiv 2410.18779): the two-stage KD schedule, the teacher, the SALT_DS scores and the selection.

Scoring the training data with the small LM, once, offline (one process, or any number under torchrun);
the same command run again after a kill resumes where it stopped:

  python salt.py score --ckpt out/demo/slm/ckpt --data_dir data/stdlib --block_size 128 --out out/demo/scores.npy
  torchrun --standalone --nproc_per_node=8 salt.py score --ckpt out/slm/ckpt --data_dir data/pile ...

The score file (.npy, one row per training sequence: median score, mean loss, learnable fraction) gets a
.json beside it that names the teacher, the block size and the data it was made for; train.py refuses a
score file made for anything else. Until every row is scored they live in the folder OUT.parts, one file per
rank (safe on a network filesystem shared by the nodes), with that metadata in OUT.parts/meta.json. While a job
scores, its lock OUT.lock keeps a second job out (common.lock_for_the_job).

What a selection keeps (score histogram, the data subsets before and after, decoded examples), printed and
saved as OUT_DIR/selection.md and OUT_DIR/score_histogram.png:

  python salt.py report --scores out/demo/scores_top10.npy --data_dir data/stdlib --block_size 64 \
      --kd_sequences 1920 --out_dir results/demo/selection
"""
import argparse
import io
import json
import math
import mmap
import os
import re
import shutil
import time
import warnings
import zlib
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

import checkpoint_manager
import hf_model
import tokenizer
from common import (InputError, atomic_write, compute_init, end_job, lock_for_the_job, report_input_errors,
                    write_json)
from data import TokenSequences
from model import GPT, GPT2_NAMES, GPTConfig

SCORE_COLUMNS = ('median_score', 'mean_loss', 'learnable_fraction')
RECORDS = 1 << 16  # score records read at a time (13 MB at batch_size 16)
CHUNK = 1 << 22  # rows of scores handled at a time where every row is read
# DCP says so whenever it reads or writes a checkpoint without collectives, which is what one process means
warnings.filterwarnings('ignore', message='torch.distributed is .*assuming the intent is to (load|save) in a single')

# ----------------------------------------------------------------------------------------------------------
# Stage 1 -> stage 2: the schedule


class Stage(NamedTuple):
    """What one training step does."""
    kd_weight: float  # w: the loss is (1 - w) CE + w KD(teacher || student); 0 is plain next-token training
    teacher: bool     # the teacher's forward runs, for the KD term
    selection: bool   # stage 1: a run with a SALT_DS selection reads it (train.make_loader); SALT, the same data


def stage_at(step, kd_steps, kd_weight, schedule='constant', end=None):
    """SALT's schedule at `step` (0-based). Stage 1, steps [0, end): KD from the teacher with weight kd_weight,
    constant (the paper's hard switch) or decaying linearly towards 0 at kd_steps (schedule='linear'), on the
    selected sequences where the run has a selection; end is kd_steps unless stage 1 ended earlier (Schedule).
    Stage 2: plain next-token training, no teacher. A baseline is kd_steps = 0."""
    if step >= (kd_steps if end is None else end):
        return Stage(kd_weight=0.0, teacher=False, selection=False)
    if schedule == 'constant':
        w = kd_weight
    elif schedule == 'linear':
        w = kd_weight * (1.0 - step / kd_steps)
    else:
        raise InputError(f"kd_schedule={schedule!r}: expected 'constant' or 'linear'")
    return Stage(kd_weight=w, teacher=w > 0, selection=True)


class Schedule:
    """What each step of a run does (at) and when its stage 1 ends: the one thing train.py's loop asks about the
    method, kept in the checkpoint (state_dict), so a run resumed after stage 1 ended never loads the teacher.

    kd_end='steps' (the paper's): stage 1 is the first kd_steps steps. kd_end='teacher': it ends at the first
    evaluation where the student's val CE is at or below the teacher's on the same val set (teacher_val_ce,
    measured once, at the start of stage 1: train.py), kd_steps being the limit. A change of when or how stage 1
    ends is a change here; the loop follows whatever at() says."""

    def __init__(self, kd_steps, kd_weight, kd_schedule='constant', kd_end='steps'):
        if kd_end not in ('steps', 'teacher'):
            raise InputError(f"kd_end={kd_end!r}: expected 'steps' or 'teacher'")
        self.kd_steps, self.kd_weight, self.kd_schedule, self.kd_end = kd_steps, kd_weight, kd_schedule, kd_end
        self.end = kd_steps  # the step stage 1 ends at
        self.teacher_val_ce = None

    def at(self, step):
        return stage_at(step, self.kd_steps, self.kd_weight, self.kd_schedule, self.end)

    def needs_teacher_val_ce(self, step):
        return self.kd_end == 'teacher' and self.teacher_val_ce is None and step < self.end

    def evaluated(self, step, val_ce):
        """The student's val CE after `step` steps: with kd_end='teacher', stage 1 ends here if it is at or below
        the teacher's. Returns whether it ended now."""
        if self.kd_end == 'teacher' and step < self.end and val_ce <= self.teacher_val_ce:
            self.end = step
            return True
        return False

    def state_dict(self):
        return dict(end=self.end, teacher_val_ce=self.teacher_val_ce)

    def load_state_dict(self, state):
        self.end, self.teacher_val_ce = state['end'], state['teacher_val_ce']


# ----------------------------------------------------------------------------------------------------------
# The learning rate, and branches. After a linear warmup, either a cosine decay to min_lr over the run, or
# warmup-stable-decay (WSD: constant, then a linear decay to min_lr over the last decay_fraction of the steps;
# Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"). A WSD run of
# N steps has the learning rate of a WSD run of any M <= N steps up to the latter's decay_start: its checkpoint
# there, decayed to M steps (train.py's branch_from), is that M-step run, so one run and a short decay per budget
# answer "this method at 50/70/100% of the steps" where cosine needs a run per budget.


def decay_start(steps, decay_fraction):
    """The first step of a WSD run's decay: the last round(decay_fraction * steps) of its steps decay."""
    return steps - round(decay_fraction * steps)


def lr_at(step, c):
    """The learning rate of step `step` (0-based) of a run of config c (train.py's keys): lr_schedule 'cosine' or
    'wsd', over lr_decay_steps (0 = max_steps). WSD's last step trains at min_lr; beyond the schedule, min_lr."""
    steps, top, bottom, warmup = c['lr_decay_steps'] or c['max_steps'], c['learning_rate'], c['min_lr'], c['warmup_steps']
    if step < warmup:
        return top * (step + 1) / warmup
    if c['lr_schedule'] == 'wsd':
        start = decay_start(steps, c['decay_fraction'])
        return top + (bottom - top) * min(1.0, max(0, step + 1 - start) / max(1, steps - start))
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return bottom + 0.5 * (1.0 + math.cos(math.pi * progress)) * (top - bottom)


# ----------------------------------------------------------------------------------------------------------
# A trained LM as teacher, scorer or model to evaluate: a train.py checkpoint, a transformers model's directory
# (hf_model.py: Llama, Qwen, Pythia, GPT-2, ...), or the name of one of OpenAI's GPT-2s (from the hub)


def _is_gpt2_name(ckpt):
    return ckpt in GPT2_NAMES and not os.path.exists(ckpt)


def _is_transformers(ckpt):
    return _is_gpt2_name(ckpt) or hf_model.is_directory(ckpt)


def teacher_id(ckpt):
    """What identifies the teacher's weights in score files: its training run and step (or a GPT-2 name, or a hash
    of a transformers directory's files)."""
    if _is_gpt2_name(ckpt):
        return ckpt
    if hf_model.is_directory(ckpt):
        return hf_model.identity(ckpt)
    meta = checkpoint_manager.read_meta(ckpt)
    return f"{meta['run_id']}@step{meta['step']}"


def model_tokenizer(ckpt):
    """The tokenizer (tokenizer.py) of a model: a checkpoint's (its files beside its weights), a transformers
    directory's own (None if it has no tokenizer files), GPT-2's for a GPT-2 name."""
    if _is_gpt2_name(ckpt):
        return tokenizer.GPT2Tokenizer()
    if hf_model.is_directory(ckpt):
        has_files = any(os.path.isfile(os.path.join(ckpt, name)) for name in tokenizer.TOKENIZER_FILES)
        return tokenizer.TransformersTokenizer(ckpt) if has_files else None
    return tokenizer.load(checkpoint_manager.read_meta(ckpt).get('tokenizer'), ckpt)


def model_tokenizer_record(ckpt):
    """model_tokenizer(ckpt)'s record, read from a checkpoint's meta.pt without loading the tokenizer."""
    if _is_transformers(ckpt):
        found = model_tokenizer(ckpt)
        return found.record() if found else None
    return tokenizer.as_record(checkpoint_manager.read_meta(ckpt).get('tokenizer'))


def load_model(ckpt, device, dtype=None):
    """A trained LM, frozen (eval mode, no gradients), in dtype (None: as trained, or fp32 for a transformers
    model): our GPT from a train.py checkpoint, written by any number of ranks under ddp or fsdp and loaded whole
    here (under torchrun every rank reads it on its own); a transformers model from its directory or a GPT-2 name,
    which stays a transformers module (hf_model.py)."""
    if _is_transformers(ckpt):
        return hf_model.load(ckpt, device, dtype or torch.float32, model_tokenizer(ckpt))
    meta = checkpoint_manager.read_meta(ckpt)
    checkpoint_manager.verify(ckpt, meta, share=sorted)  # every file, by every rank: a damaged one is one line
    # the shapes, made on the device, then the checkpoint's weights read into them: no init drawn, no copy
    model = GPT(GPTConfig(**meta['model_args']), device='meta').to_empty(device=device)
    state = {'model': get_model_state_dict(model)}
    try:
        dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    except (Exception, CheckpointException) as error:  # files that passed their checks, damaged before
        raise InputError(f"{ckpt!r} does not load ({type(error).__name__}): the checkpoint is damaged") from error
    set_model_state_dict(model, state['model'])
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_teacher(ckpt, device, data_tokenizer, block_size, dtype=None):
    """The SLM as KD teacher or SALT_DS scorer of data made with data_tokenizer (its record) in sequences of
    block_size, loaded by load_model. KL over the next-token distribution makes sense token for token only: the
    teacher must have the data's vocabulary (a transformers directory with weights alone: at least as many rows
    in its head), and it must have been made for sequences that long."""
    found = model_tokenizer_record(ckpt)
    if found and not tokenizer.same_vocabulary(found, data_tokenizer):
        raise InputError(f"teacher {ckpt!r} has tokenizer {tokenizer.describe(found)} but the data was made with "
                         f"{tokenizer.describe(data_tokenizer)}: KD needs one vocabulary for both")
    teacher = load_model(ckpt, device, dtype)
    if teacher.config.vocab_size < data_tokenizer['vocab_size']:
        raise InputError(f"teacher {ckpt!r} has a vocabulary of {teacher.config.vocab_size:,} tokens, fewer than the "
                         f"data's {data_tokenizer['vocab_size']:,} ({tokenizer.describe(data_tokenizer)})")
    if teacher.config.block_size < block_size:
        raise InputError(f"teacher {ckpt!r} has block_size {teacher.config.block_size} (the positions it was made "
                         f"for), shorter than the run's block_size {block_size}")
    return teacher


# ----------------------------------------------------------------------------------------------------------
# SALT_DS scores (the paper's Sec. 3.2)


@torch.no_grad()
def sequence_scores(model, seqs, top_k=10, chunk_rows=None):
    """seqs (B, T+1) token windows -> (B, 3): [median score, mean loss, learnable fraction].

    Per token the SLM's loss -log p(y_t) counts only if the true next token is among the SLM's top-k
    predictions ("learnable"); otherwise the token scores 0. The sequence score is the median over its
    tokens: high = challenging yet learnable."""
    x, y = seqs[:, :-1], seqs[:, 1:]
    hidden = model(x, return_hidden=True).flatten(0, 1)
    loss, learnable = token_losses(model, hidden, y.flatten(), top_k, chunk_rows)
    loss, learnable = loss.view(y.shape), learnable.view(y.shape)
    score = torch.where(learnable, loss, 0.0)
    # the true median (mean of the two middle values for an even count), as numpy.median
    return torch.stack([score.quantile(0.5, dim=1), loss.mean(dim=1), learnable.float().mean(dim=1)], dim=1)


def token_losses(model, hidden, targets, top_k, chunk_rows=None):
    """hidden (N, C), targets (N,) -> per token the loss -log p(target) and whether the target is learnable:
    fewer than top_k logits strictly larger than its own (its rank is < k).

    The fp32 logits are made chunk_rows rows at a time into two buffers reused chunk after chunk, so memory
    does not grow with N. On a CPU the default 64 rows keep both buffers (26 MB at V = 50K) in the L3 cache
    through the passes over them; on a GPU 2048-row GEMMs keep it busy."""
    chunk_rows = chunk_rows or (64 if hidden.device.type == 'cpu' else 2048)
    vocab, weight = model.config.vocab_size, model.lm_head.weight.float()  # a copy only if the head is not fp32
    logits_buffer = torch.empty(min(len(targets), chunk_rows), weight.size(0), device=hidden.device)
    above_buffer = torch.empty_like(logits_buffer)
    loss = torch.empty(len(targets), device=hidden.device)
    n_above = torch.empty(len(targets), device=hidden.device)
    for start in range(0, len(targets), chunk_rows):
        rows = slice(start, start + chunk_rows)
        h = hidden[rows].float()
        # fp32 (TF32 on CUDA), not bf16: bf16 logits would be off by up to 0.06 and tie ranks; all padded
        # columns, as multiple-of-64 GEMMs are the fast ones
        logits = torch.mm(h, weight.T, out=logits_buffer[:len(h)])
        logits[:, vocab:] = float('-inf')  # padded columns are not tokens
        target_logit = logits.gather(1, targets[rows, None])
        # as 0./1. floats: a vectorized float sum, where summing a bool tensor is several times slower
        n_above[rows] = torch.gt(logits, target_logit, out=above_buffer[:len(h)]).sum(dim=1)
        # logsumexp in place: torch.logsumexp allocates a (rows, V) temporary, and log_softmax on a CPU uses a
        # fast exp that is off by 1e-3 in the loss
        top = logits.amax(dim=1, keepdim=True)
        lse = logits.sub_(top).exp_().sum(dim=1, keepdim=True).log_().add_(top)
        loss[rows] = (lse - target_logit)[:, 0]
    return loss, n_above < top_k


# Scores in progress live in OUT.parts/: meta.json (what they are for) and one file per rank, to which the rank
# appends a record per finished batch. One writer per file is what a network filesystem (NFS, Lustre) makes safe,
# where several nodes writing into one shared file are not. A record is [batch index, the batch's rows padded
# with NaN, crc32 of both], so a record cut short by a kill, or left zero-filled by a crash, fails its check: a
# file is read up to its first bad record, and that batch is scored again. At the end rank 0 gathers the records
# of every file into OUT.


def record_dtype(batch_size):
    return np.dtype([('batch', '<i8'), ('rows', '<f4', (batch_size, len(SCORE_COLUMNS))), ('crc', '<u4')])


def read_records(path, batch_size):
    """The valid records at the start of one rank's file, RECORDS at a time: up to its first incomplete or corrupt
    record (the Pile's 139M sequences are 8.7M records, 1.8 GB)."""
    dtype = record_dtype(batch_size)
    count = os.path.getsize(path) // dtype.itemsize
    with open(path, 'rb') as f:
        for at in range(0, count, RECORDS):
            block = np.fromfile(f, dtype, min(RECORDS, count - at))
            raw = memoryview(block.view(np.uint8))
            crcs = np.fromiter((zlib.crc32(raw[i:i + dtype.itemsize - 4]) for i in range(0, len(raw), dtype.itemsize)),
                               np.uint32, len(block))
            bad = np.flatnonzero(crcs != block['crc'])
            yield block[:bad[0]] if len(bad) else block
            if len(bad):
                return


def parts_records(parts, batch_size):
    """The valid records of every rank's file in the parts folder, whichever run and rank wrote them, RECORDS at a
    time."""
    for name in sorted(os.listdir(parts)):
        if name.startswith('rank'):
            yield from read_records(os.path.join(parts, name), batch_size)


def scored_batches(parts, batch_size):
    """The sorted indices of the batches that the parts folder holds a valid record of."""
    batches = np.concatenate([np.zeros(0, np.int64)] + [block['batch'] for block in parts_records(parts, batch_size)])
    batches.sort()
    return batches[np.concatenate([[True], batches[1:] != batches[:-1]])] if len(batches) else batches


def score_dataset(model, sequences, out_path, meta, *, batch_size, top_k, rank=0, world_size=1, autocast=None):
    """Score every sequence of `sequences` into out_path: each rank appends its batches' records to its own file
    in out_path.parts/, then rank 0 gathers them. Killed anywhere, the same command again redoes only the batches
    without a valid record, each with the same sequences as before: the result is that of an uninterrupted run,
    whatever the number of ranks of either run. The pending batches are dealt out to the ranks in turn, so a
    resumed run keeps them balanced."""
    parts = out_path + '.parts'
    if rank == 0:
        prepare_parts(parts, dict(meta, batch_size=batch_size))
    if world_size > 1:
        dist.barrier()
    done = [scored_batches(parts, batch_size) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(done)  # one reader of every file, not one per rank
    n_batches = -(-len(sequences) // batch_size)
    pending = np.setdiff1d(np.arange(n_batches), done[0], assume_unique=True)  # (np.unique is slow on 8.7M)
    if rank == 0 and len(done[0]):
        print(f"{parts}: resuming, {len(pending):,} batches of {batch_size} sequences left", flush=True)
    with open(own_file(parts, rank, batch_size), 'ab') as out:
        score_batches(model, sequences, pending[rank::world_size], out, batch_size, top_k, rank, autocast)
    if world_size > 1:
        dist.barrier()  # every file is closed (and so visible to rank 0 on a network filesystem)
    if rank == 0:
        finish_score_file(out_path, meta, batch_size, len(sequences))


def own_file(parts, rank, batch_size):
    """This rank's file of records, cut back to its valid records: a kill may have left half a record at its
    end, which would shift every record appended after it."""
    path = os.path.join(parts, f'rank{rank:05d}.bin')
    if os.path.exists(path):
        with open(path, 'r+b') as f:
            f.truncate(sum(map(len, read_records(path, batch_size))) * record_dtype(batch_size).itemsize)
    return path


def score_batches(model, sequences, batches, out, batch_size, top_k, rank, autocast):
    """Score each batch and append its record to `out`; fsync every 30 s, when rank 0 reports progress."""
    device = next(model.parameters()).device
    dtype, start, last_sync = record_dtype(batch_size), time.time(), time.time()
    for done, b in enumerate(batches, 1):
        ids = np.arange(b * batch_size, min(len(sequences), (b + 1) * batch_size))
        with autocast or torch.autocast(device.type, enabled=False):
            rows = sequence_scores(model, sequences.get(ids).to(device), top_k).float().cpu().numpy()
        if np.isnan(rows).any():  # a diverged SLM: its ranking would mean nothing
            raise RuntimeError(f"the SLM gives NaN scores for sequences {ids[0]}..{ids[-1]}")
        record = np.zeros(1, dtype)
        record['batch'], record['rows'] = b, np.nan
        record['rows'][0, :len(ids)] = rows
        record['crc'] = zlib.crc32(record.view(np.uint8)[:-4])
        out.write(record.tobytes())
        if time.time() - last_sync > 30 or done == len(batches):
            out.flush()
            os.fsync(out.fileno())
            last_sync, elapsed = time.time(), time.time() - start
            if rank == 0:
                print(f"rank 0: {done:,}/{len(batches):,} batches, {done * batch_size * sequences.block_size / elapsed:,.0f} "
                      f"tokens/s per rank, eta {(len(batches) - done) * elapsed / done / 60:.1f} min", flush=True)


def prepare_parts(parts, meta):
    """Keep the parts folder if an earlier run for the same teacher, data and settings left it; else make it.
    One made for anything else is refused, not overwritten: it may hold hours of scoring."""
    meta_file = os.path.join(parts, 'meta.json')
    if os.path.isdir(parts):
        if not os.path.isfile(meta_file):  # written first: this folder was made by something else
            raise InputError(f"{parts}: partial scores without their metadata {meta_file}, so they cannot be "
                             f"resumed: delete {parts} to start over")
        with open(meta_file) as f:
            made_for = json.load(f)
        for key, want in meta.items():
            if made_for.get(key) != want:
                raise InputError(f"{parts}: partial scores made for {key}={made_for.get(key)!r}, but this run "
                                 f"has {key}={want!r}: rerun with the settings they were made with to resume, or "
                                 f"delete {parts} to start over")
        return
    os.makedirs(parts + '.new', exist_ok=True)  # complete (with its meta.json) before it gets its name
    write_json(os.path.join(parts + '.new', 'meta.json'), meta)
    os.replace(parts + '.new', parts)


def score_meta(teacher, sequences, top_k):
    """What a score file was made for; train.py compares it with what it is about to train on."""
    return dict(teacher=teacher, data_fingerprint=sequences.fingerprint(), block_size=sequences.block_size,
                n_sequences=len(sequences), top_k=top_k, columns=list(SCORE_COLUMNS))


def finish_score_file(out_path, meta, batch_size, n_sequences):
    """Publish the scores: gather the records of every file in out_path.parts into the .npy, a block of records at
    a time, and check that every batch was scored; then write the .json, then give the .npy its name (a reader
    never sees scores without their metadata, nor a half-written file), then delete the parts. No more than a block
    is held, whatever the number of sequences."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {'descr': '<f4', 'fortran_order': False,
                                                  'shape': (n_sequences, len(SCORE_COLUMNS))})
    folder, name = os.path.split(os.path.abspath(out_path))
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
        scored = _gather_records(tmp, header.getvalue(), out_path + '.parts', batch_size, n_sequences)
        if not scored.all():
            raise RuntimeError(f"{out_path}.parts: {int((~scored).sum())} batches were not scored; run the scoring "
                               f"again")
        write_json(meta_path(out_path), meta)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    shutil.rmtree(out_path + '.parts')


def _gather_records(path, header, parts, batch_size, n_sequences):
    """Write the .npy of the parts' rows to path (fsynced), each record's rows where its batch belongs (a batch
    recorded twice: as the last file read has it). Returns which batches were found."""
    scored = np.zeros(-(-n_sequences // batch_size), dtype=bool)
    with open(path, 'w+b') as f:
        f.write(header)
        f.truncate(len(header) + 4 * len(SCORE_COLUMNS) * n_sequences)
        if n_sequences:
            mapped = mmap.mmap(f.fileno(), 0)
            rows = np.frombuffer(mapped, np.float32, n_sequences * len(SCORE_COLUMNS), len(header))
            for block in parts_records(parts, batch_size):
                ids = block['batch'][:, None] * batch_size + np.arange(batch_size)  # the rows of each record
                inside = ids < n_sequences  # the last batch's padding is not
                rows.reshape(n_sequences, -1)[ids[inside]] = block['rows'][inside]
                scored[block['batch']] = True
                mapped.flush()
                mapped.madvise(mmap.MADV_DONTNEED)  # written: out of this process, so memory stays a block's
            del rows
            mapped.close()
        os.fsync(f.fileno())
    return scored


def meta_path(score_file):
    return os.path.splitext(score_file)[0] + '.json'


def read_score_meta(score_file):
    """The metadata of a score file (what it was made for), after checking the file and it exist."""
    for path in (score_file, meta_path(score_file)):
        if not os.path.isfile(path):
            raise InputError(f"score file {path!r} does not exist: make it with `python salt.py score`")
    with open(meta_path(score_file)) as f:
        return json.load(f)


def load_scores(score_file, expected):
    """The (n, 3) scores of score_file, after checking that its metadata matches `expected` (from
    score_meta for the data, teacher and block size about to be trained on)."""
    meta = read_score_meta(score_file)
    for key, want in expected.items():
        if meta.get(key) != want:
            raise InputError(f"score file {score_file!r} was made for {key}={meta.get(key)!r}, but this run "
                             f"has {key}={want!r}: score this data with this teacher again (python salt.py score)")
    scores = np.load(score_file, mmap_mode='r')
    if scores.shape != (meta['n_sequences'], len(SCORE_COLUMNS)):
        raise InputError(f"score file {score_file!r} has shape {scores.shape}, its metadata says "
                         f"({meta['n_sequences']}, {len(SCORE_COLUMNS)}): the file is damaged, score again")
    return np.asarray(scores)


# ----------------------------------------------------------------------------------------------------------
# SALT_DS selection


def ranking(scores):
    """Sequence ids from the highest median score to the lowest; ties go to the lower id, so the selection
    is deterministic. Float32 scores (a score file's) of fewer than 2**32 sequences sort as one array of keys, in
    place: 1.1 GB for the Pile's 139M sequences, where a lexsort holds five times that."""
    keys = _ranking_keys(scores[:, 0])
    if keys is None:
        return np.lexsort((np.arange(len(scores)), -scores[:, 0]))
    keys.sort()
    return _ids_of(keys)


def ranked(scores, ranks):
    """ranking(scores)[ranks], found by a partition of the keys rather than a sort of them all."""
    keys = _ranking_keys(scores[:, 0])
    if keys is None:
        return ranking(scores)[ranks]
    keys.partition(ranks)  # in place: np.partition would hold a second copy (1.1 GB for the Pile)
    return _ids_of(keys[ranks])


def _ranking_keys(median):
    """uint64 keys in ranking's order: above, the float32 score's bits turned into an unsigned integer that orders
    as the scores do, inverted (the highest first; NaN last, as a sort puts it); below, the id. None where they
    do not fit: scores of another dtype, or 2**32 sequences."""
    if median.dtype != np.float32 or len(median) >= 1 << 32:
        return None
    keys = np.empty(len(median), dtype=np.uint64)
    for at in range(0, len(median), CHUNK):
        chunk = median[at:at + CHUNK] + np.float32(0)  # -0.0 + 0 is 0.0: the two zeros tie, as they compare
        bits = chunk.view(np.uint32)
        ascending = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))
        ascending[np.isnan(chunk)] = 0
        keys[at:at + len(chunk)] = (~ascending).astype(np.uint64) << np.uint64(32)
        keys[at:at + len(chunk)] |= np.arange(at, at + len(chunk), dtype=np.uint64)
    return keys


def _ids_of(keys):
    """The ids in the low half of ranking keys, in place, as int64."""
    keys &= np.uint64(0xFFFFFFFF)
    return keys.view(np.int64)


def selection_size(n_scores, select_fraction, stage1_sequences):
    """How many sequences SALT_DS selects. By default (select_fraction=0) exactly what stage 1 reads, kd_steps x
    the global batch (stage1_sequences), each once: the paper's KD phase trains on the top-scoring sequences, not on
    a part of a larger set that the seed picks. select_fraction > 0: the top fraction of the pool, a larger pool
    stage 1 reads a seeded part of (or a smaller one it reads more than once)."""
    count = round(select_fraction * n_scores) if select_fraction else stage1_sequences
    if not 1 <= count <= n_scores:
        raise InputError(f"SALT_DS would select {count:,} of {n_scores:,} sequences (select_fraction="
                         f"{select_fraction}{'' if select_fraction else ': kd_steps x the global batch'}): expected "
                         f"1 to {n_scores:,}; train on more data or set select_fraction")
    return count


def select_top(scores, count):
    """Ids of the `count` highest median scores, ascending."""
    return np.sort(ranking(scores)[:count])


def selection_summary(scores, selected):
    """A few lines on what the selection kept, for the training log."""
    def describe(rows):
        return (f"median score {rows[:, 0].mean():.3f}, mean loss {rows[:, 1].mean():.3f}, "
                f"learnable {rows[:, 2].mean():.1%}")
    kept = scores[selected]
    return (f"SALT_DS selected {len(selected):,} of {len(scores):,} sequences ({len(selected) / len(scores):.1%}), "
            f"score >= {kept[:, 0].min():.3f}\n  selected: {describe(kept)}\n  all:      {describe(scores)}")


# ----------------------------------------------------------------------------------------------------------
# The selection report: what SALT_DS keeps


def subset_table(domains, names, selected):
    """Markdown table: each data subset's share of all sequences and of the selected ones."""
    everywhere = np.bincount(domains, minlength=len(names))
    kept = np.bincount(domains[selected], minlength=len(names))
    lines = ['| subset | sequences | share | selected | share of selected | kept |', '|---|---|---|---|---|---|']
    for i in np.argsort(-everywhere, kind='stable'):
        if everywhere[i]:
            name = names[i].replace('|', '\\|')  # a | would end the table cell
            lines.append(f"| {name} | {everywhere[i]:,} | {everywhere[i] / len(domains):.1%} | {kept[i]:,} | "
                         f"{kept[i] / len(selected):.1%} | {kept[i] / everywhere[i]:.1%} |")
    return '\n'.join(lines)


def example_block(text, max_chars=400, max_lines=12):
    """A decoded sequence as a markdown code block, cut to a readable length. The fence is longer than any
    run of backticks in the text, so nothing in it can end the block."""
    shown = '\n'.join(text[:max_chars].split('\n')[:max_lines])
    if len(shown) < len(text):
        shown += f"\n[... {len(text) - len(shown):,} more characters]"
    fence = '`' * max(3, 1 + max(map(len, re.findall('`+', shown)), default=0))
    return f"{fence}text\n{shown}\n{fence}"


def example_sections(scores, sequences, n_examples, tok):
    """Decoded examples (by tok, the data's tokenizer) from the top, the middle and the bottom of the ranking, as
    markdown."""
    n_examples = min(n_examples, len(scores))
    parts = (('top', 0), ('middle', (len(scores) - n_examples) // 2), ('bottom', len(scores) - n_examples))
    ids = ranked(scores, [first + i for _, first in parts for i in range(n_examples)])
    sections = []
    for part, (title, first) in enumerate(parts):
        sections.append(f"### {title} of the ranking\n")
        for rank, i in enumerate(ids[part * n_examples:(part + 1) * n_examples], first):
            median, loss, learnable = scores[i]
            text = tok.decode(sequences.get([i])[0].tolist())
            sections.append(f"sequence {i} (rank {rank + 1:,}): median score {median:.3f}, mean loss "
                            f"{loss:.3f}, learnable {learnable:.1%}\n\n{example_block(text)}\n")
    return '\n'.join(sections)


def plot_score_histogram(scores, selected, threshold, path):
    """PNG: histogram of the median scores, all sequences against the selected ones (counted CHUNK rows at a
    time: the Pile has 139M)."""
    import matplotlib  # here, not at the top: training and scoring processes never draw
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    low, high = _column_range(scores[:, 0])
    bins = np.histogram_bin_edges(np.array([low, high]), bins=60)
    every, kept = np.zeros(60, np.int64), np.zeros(60, np.int64)
    for at in range(0, len(scores), CHUNK):
        every += np.histogram(scores[at:at + CHUNK, 0], bins)[0]
    for at in range(0, len(selected), CHUNK):
        kept += np.histogram(scores[selected[at:at + CHUNK], 0], bins)[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stairs(every, bins, fill=True, label=f'all ({len(scores):,})', color='0.7')
    ax.stairs(kept, bins, fill=True, label=f'selected ({len(selected):,})', color='tab:blue', alpha=0.8)
    ax.axvline(threshold, color='tab:red', linestyle='--', label=f'threshold {threshold:.3f}')
    ax.set_yscale('log')  # the spike at 0 (mostly unlearnable sequences) would flatten the rest
    ax.set_xlabel('median score (SLM loss on learnable tokens)')
    ax.set_ylabel('sequences')
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120)
    plt.close(fig)
    atomic_write(path, [buffer.getvalue()])


def _column_range(column):
    """(min, max) of a column, CHUNK rows at a time."""
    ends = [(column[at:at + CHUNK].min(), column[at:at + CHUNK].max()) for at in range(0, len(column), CHUNK)]
    return min(low for low, _ in ends), max(high for _, high in ends)


# ----------------------------------------------------------------------------------------------------------
# CLI


def score_main(args):
    """`python salt.py score`: one pass of the SLM over the training data (any number of ranks); rerun after
    a kill, it resumes."""
    distributed, rank, world_size, device = compute_init()
    if device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 LM head GEMM of the scores
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.startswith('cuda') else None

    sequences = TokenSequences(args.data_dir, 'train', args.block_size, max_sequences=args.max_sequences or None)
    model = load_teacher(args.ckpt, device, tokenizer.data_record(args.data_dir), args.block_size)
    meta = score_meta(teacher_id(args.ckpt), sequences, args.top_k)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    lock_for_the_job(args.out + '.lock', f"score file {args.out}")  # one job writes it, until it is complete
    score_dataset(model, sequences, args.out, meta, batch_size=args.batch_size, top_k=args.top_k,
                  rank=rank, world_size=world_size, autocast=autocast)
    if rank == 0:
        scores = np.load(args.out, mmap_mode='r')
        print(f"wrote {args.out}: {len(scores):,} sequences, median score {np.median(scores[:, 0]):.3f}, "
              f"learnable {scores[:, 2].mean():.1%}")
    end_job(distributed)


def report_main(args):
    """`python salt.py report`: what SALT_DS keeps of the data, printed and saved as markdown and a PNG."""
    meta = read_score_meta(args.scores)
    sequences = TokenSequences(args.data_dir, 'train', args.block_size,
                               max_sequences=args.max_sequences or meta['n_sequences'])
    scores = load_scores(args.scores, dict(block_size=args.block_size, n_sequences=len(sequences),
                                           data_fingerprint=sequences.fingerprint()))
    selected = select_top(scores, selection_size(len(scores), args.select_fraction, args.kd_sequences))
    threshold = float(scores[selected, 0].min())
    ties = int((scores[:, 0] == threshold).sum() - (scores[selected, 0] == threshold).sum())
    try:
        subsets = subset_table(*sequences.domains(), selected)
    except ValueError as e:  # a data dir made before subsets were recorded
        subsets = f"Subset shares unavailable: {e}"
    stats = '\n'.join(f"| {name} | {len(rows):,} | {rows[:, 0].mean():.4f} | {rows[:, 1].mean():.4f} | "
                      f"{rows[:, 2].mean():.1%} |" for name, rows in (('all', scores), ('selected', scores[selected])))
    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, 'score_histogram.png')
    plot_score_histogram(scores, selected, threshold, png)
    report = f"""# SALT_DS selection

Scores `{args.scores}` (teacher {meta['teacher']}, top_k {meta['top_k']}) of the first {len(scores):,} training
sequences of `{args.data_dir}` (block size {args.block_size}); {f"select_fraction {args.select_fraction}" if
 args.select_fraction else f"the {args.kd_sequences:,} sequences stage 1 reads"}.

Selected **{len(selected):,} of {len(scores):,}** sequences: median score >= **{threshold:.4f}**.
{f"{ties:,} more sequences score exactly the threshold; ties go to the lower ids." if ties else ""}

| sequences | count | mean median score | mean loss | learnable |
|---|---|---|---|---|
{stats}

![median scores, all and selected]({os.path.basename(png)})

## Data subsets

{subsets}

## Examples

{example_sections(scores, sequences, args.examples, tokenizer.of_data(args.data_dir))}"""
    md = os.path.join(args.out_dir, 'selection.md')
    atomic_write(md, [report.encode()])
    print(report)
    print(f"wrote {md} and {png}")


if __name__ == '__main__':
    report_input_errors()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    score = commands.add_parser('score', help='score every training sequence with the SLM (SALT_DS); resumes')
    score.add_argument('--ckpt', required=True,
                       help="the SLM: a train.py checkpoint, a transformers model's directory, or a GPT-2 name")
    score.add_argument('--data_dir', required=True, help='tokenized data (python prepare.py ...)')
    score.add_argument('--block_size', type=int, required=True, help="the student's block size")
    score.add_argument('--max_sequences', type=int, default=0, help='score only the first N sequences (0 = all)')
    score.add_argument('--out', required=True, help='the score file to write (.npy, with a .json beside it)')
    score.add_argument('--top_k', type=int, default=10, help='a token is learnable if its target is in the top k')
    score.add_argument('--batch_size', type=int, default=16, help='sequences per forward pass per rank')
    report = commands.add_parser('report', help='what a selection keeps: score histogram, subsets, examples')
    report.add_argument('--scores', required=True, help='a score file of `python salt.py score`')
    report.add_argument('--data_dir', required=True, help='the data it scored')
    report.add_argument('--block_size', type=int, required=True, help='the block size it scored')
    report.add_argument('--max_sequences', type=int, default=0, help='sequences it scored (0 = as its .json says)')
    report.add_argument('--kd_sequences', type=int, default=0,
                        help="the sequences stage 1 reads, kd_steps x the global batch: train.py's default selection")
    report.add_argument('--select_fraction', type=float, default=0,
                        help='or the top fraction of the pool (train.py select_fraction)')
    report.add_argument('--examples', type=int, default=3, help='decoded sequences shown from each part of the ranking')
    report.add_argument('--out_dir', required=True, help='selection.md and score_histogram.png go here')
    args = parser.parse_args()
    for name in ('block_size', 'top_k', 'batch_size', 'examples'):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.command == 'score':
        score_main(args)
    else:
        report_main(args)
