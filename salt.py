"""
SALT, the method (Rawat et al. 2024, "A Little Help Goes a Long Way: Efficient LLM Training by Leveraging
Small LMs", arXiv 2410.18779): the two-stage KD schedule, the teacher, the SALT_DS scores and the selection.

Scoring the training data with the small LM, once, offline (one process, or any number under torchrun):

  python salt.py score --ckpt out/demo/slm/ckpt.pt --data_dir data/stdlib --block_size 128 --out out/demo/scores.npy
  torchrun --standalone --nproc_per_node=8 salt.py score --ckpt out/slm/ckpt.pt --data_dir data/pile ...

The score file (.npy, one row per training sequence: median score, mean loss, learnable fraction) gets a
.json beside it that names the teacher, the block size and the data it was made for; train.py refuses a
score file made for anything else.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import TokenSequences
from model import GPT, GPTConfig

SCORE_COLUMNS = ('median_score', 'mean_loss', 'learnable_fraction')

# ----------------------------------------------------------------------------------------------------------
# Stage 1 -> stage 2: the KD weight over training


def kd_weight_at(step, kd_steps, kd_weight, schedule='constant'):
    """The weight w of the KD term at `step` (0-based). Stage 1 is steps [0, kd_steps): w constant, or
    decaying linearly from kd_weight towards 0 with schedule='linear'. Stage 2 (step >= kd_steps): 0."""
    if step >= kd_steps:
        return 0.0
    if schedule == 'constant':
        return kd_weight
    if schedule == 'linear':
        return kd_weight * (1.0 - step / kd_steps)
    raise ValueError(f"kd_schedule={schedule!r}: expected 'constant' or 'linear'")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints of a trained LM as teacher or scorer


def _is_gpt2_name(ckpt):
    return ckpt.startswith('gpt2') and not os.path.exists(ckpt)


def _read_checkpoint(ckpt):
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"teacher checkpoint {ckpt!r} does not exist: train the SLM first "
                                f"(python train.py config/<slm config>.py) or fix teacher_ckpt")
    # mmap: tensors are read from disk only when used, so asking for the id of a 1.5B teacher is cheap
    return torch.load(ckpt, map_location='cpu', weights_only=True, mmap=True)


def teacher_id(ckpt):
    """What identifies the teacher's weights in score files: its training run and step (or a GPT-2 name)."""
    if _is_gpt2_name(ckpt):
        return ckpt
    state = _read_checkpoint(ckpt)
    return f"{state['run_id']}@step{state['step']}"


def load_model(ckpt, device):
    """A trained GPT from a train.py checkpoint (or a GPT-2 name: 'gpt2', ..., through transformers),
    frozen: eval mode, no gradients."""
    if _is_gpt2_name(ckpt):
        model = GPT.from_pretrained(ckpt)
    else:
        state = _read_checkpoint(ckpt)
        model = GPT(GPTConfig(**state['model_args']))
        model.load_state_dict(state['model'])
    return model.to(device).eval().requires_grad_(False)


def load_teacher(ckpt, device, student_config):
    """The SLM as KD teacher. It must share the student's tokenizer (vocabulary): KL over the next-token
    distribution only makes sense token for token."""
    teacher = load_model(ckpt, device)
    if teacher.config.vocab_size != student_config.vocab_size:
        raise ValueError(f"teacher {ckpt!r} has vocab_size {teacher.config.vocab_size} but the student has "
                         f"{student_config.vocab_size}: KD needs one tokenizer for both")
    if teacher.config.block_size < student_config.block_size:
        raise ValueError(f"teacher {ckpt!r} has block_size {teacher.config.block_size}, shorter than the "
                         f"student's {student_config.block_size}")
    return teacher


# ----------------------------------------------------------------------------------------------------------
# SALT_DS scores (the paper's Sec. 3.2)


@torch.no_grad()
def sequence_scores(model, seqs, top_k=10):
    """seqs (B, T+1) token windows -> (B, 3): [median score, mean loss, learnable fraction].

    Per token the SLM's loss -log p(y_t) counts only if the true next token is among the SLM's top-k
    predictions ("learnable"); otherwise the token scores 0. The sequence score is the median over its
    tokens: high = challenging yet learnable."""
    x, y = seqs[:, :-1], seqs[:, 1:]
    hidden = model(x, return_hidden=True)
    rows = []
    for h, target in zip(hidden, y):  # one sequence at a time: (T, V) logits, never (B, T, V)
        logits = model.logits(h).float()
        target_logit = logits.gather(1, target[:, None])
        loss = torch.logsumexp(logits, dim=1) - target_logit[:, 0]
        # rank of the target = number of strictly larger logits; in the top-k iff rank < k
        learnable = (logits > target_logit).sum(dim=1) < top_k
        score = torch.where(learnable, loss, torch.zeros_like(loss))
        # the true median (mean of the two middle values for an even count), as numpy.median
        rows.append(torch.stack([score.quantile(0.5), loss.mean(), learnable.float().mean()]))
    return torch.stack(rows)


def score_dataset(model, sequences, out_path, *, batch_size, top_k, rank=0, world_size=1, autocast=None):
    """Score every sequence of `sequences` into a (len, 3) float32 .npy at out_path.tmp; batch b goes to
    rank b % world_size, which writes its rows straight into the shared memmap (so memory stays flat and
    the ranks need no gather). Rows still NaN at the end mean a rank failed."""
    n = len(sequences)
    tmp_path = out_path + '.tmp'
    if rank == 0:
        np.lib.format.open_memmap(tmp_path, mode='w+', dtype=np.float32, shape=(n, len(SCORE_COLUMNS)))[:] = np.nan
    if world_size > 1:
        dist.barrier()
    scores = np.lib.format.open_memmap(tmp_path, mode='r+')
    device = next(model.parameters()).device
    n_batches = (n + batch_size - 1) // batch_size
    for b in range(rank, n_batches, world_size):
        ids = np.arange(b * batch_size, min(n, (b + 1) * batch_size))
        with autocast or torch.autocast(device.type, enabled=False):
            rows = sequence_scores(model, sequences.get(ids).to(device), top_k)
        scores[ids] = rows.float().cpu().numpy()
        if rank == 0 and (b // world_size) % 50 == 0:
            print(f"scored {min(n, (b + 1) * batch_size):,}/{n:,} sequences", flush=True)
    scores.flush()
    del scores
    if world_size > 1:
        dist.barrier()


def score_meta(teacher, sequences, top_k):
    """What a score file was made for; train.py compares it with what it is about to train on."""
    return dict(teacher=teacher, data_fingerprint=sequences.fingerprint(), block_size=sequences.block_size,
                n_sequences=len(sequences), top_k=top_k, columns=list(SCORE_COLUMNS))


def _write_json_atomic(path, obj):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finish_score_file(out_path, meta):
    """Publish the scores: check every row was written, then the .json, then the .npy by atomic rename
    (a reader never sees scores without their metadata, nor a half-written file)."""
    scores = np.load(out_path + '.tmp', mmap_mode='r')
    missing = int(np.isnan(scores).any(axis=1).sum())
    if missing:
        raise RuntimeError(f"{out_path}.tmp: {missing} sequences were not scored; run the scoring again")
    _write_json_atomic(meta_path(out_path), meta)
    os.replace(out_path + '.tmp', out_path)


def meta_path(score_file):
    return os.path.splitext(score_file)[0] + '.json'


def load_scores(score_file, expected):
    """The (n, 3) scores of score_file, after checking that its metadata matches `expected` (from
    score_meta for the data, teacher and block size about to be trained on)."""
    for path in (score_file, meta_path(score_file)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"score file {path!r} does not exist: make it with `python salt.py score`")
    with open(meta_path(score_file)) as f:
        meta = json.load(f)
    for key, want in expected.items():
        if meta.get(key) != want:
            raise ValueError(f"score file {score_file!r} was made for {key}={meta.get(key)!r}, but this run "
                             f"has {key}={want!r}: score this data with this teacher again (python salt.py score)")
    scores = np.load(score_file, mmap_mode='r')
    if scores.shape != (meta['n_sequences'], len(SCORE_COLUMNS)):
        raise ValueError(f"score file {score_file!r} has shape {scores.shape}, its metadata says "
                         f"({meta['n_sequences']}, {len(SCORE_COLUMNS)}): the file is damaged, score again")
    return np.asarray(scores)


# ----------------------------------------------------------------------------------------------------------
# SALT_DS selection


def select_top(scores, fraction):
    """Ids of the round(fraction * n) highest median scores (at least one), ascending; ties go to the
    lower id so the selection is deterministic."""
    if not 0 < fraction <= 1:
        raise ValueError(f"select_fraction={fraction}: expected 0 < fraction <= 1")
    median = scores[:, 0]
    k = max(1, round(fraction * len(median)))
    order = np.lexsort((np.arange(len(median)), -median))  # by score descending, then id ascending
    return np.sort(order[:k])


def selection_summary(scores, selected):
    """A few lines on what the selection kept, for the training log."""
    def describe(rows):
        return (f"median score {rows[:, 0].mean():.3f}, mean loss {rows[:, 1].mean():.3f}, "
                f"learnable {rows[:, 2].mean():.1%}")
    kept = scores[selected]
    return (f"SALT_DS selected {len(selected):,} of {len(scores):,} sequences ({len(selected) / len(scores):.1%}), "
            f"score >= {kept[:, 0].min():.3f}\n  selected: {describe(kept)}\n  all:      {describe(scores)}")


# ----------------------------------------------------------------------------------------------------------
# CLI


def score_main(args):
    """`python salt.py score`: one pass of the SLM over the training data (any number of ranks)."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world_size = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else 'cpu'
    if ddp:
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.startswith('cuda') else None

    model = load_model(args.ckpt, device)
    sequences = TokenSequences(args.data_dir, 'train', args.block_size, max_sequences=args.max_sequences or None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    score_dataset(model, sequences, args.out, batch_size=args.batch_size, top_k=args.top_k,
                  rank=rank, world_size=world_size, autocast=autocast)
    if rank == 0:
        finish_score_file(args.out, score_meta(teacher_id(args.ckpt), sequences, args.top_k))
        scores = np.load(args.out)
        print(f"wrote {args.out}: {len(scores):,} sequences, median score {np.median(scores[:, 0]):.3f}, "
              f"learnable {scores[:, 2].mean():.1%}")
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    score = commands.add_parser('score', help='score every training sequence with the SLM (SALT_DS)')
    score.add_argument('--ckpt', required=True, help='the SLM: a train.py checkpoint, or a GPT-2 name')
    score.add_argument('--data_dir', required=True, help='tokenized data (python data.py ...)')
    score.add_argument('--block_size', type=int, required=True, help="the student's block size")
    score.add_argument('--max_sequences', type=int, default=0, help='score only the first N sequences (0 = all)')
    score.add_argument('--out', required=True, help='the score file to write (.npy, with a .json beside it)')
    score.add_argument('--top_k', type=int, default=10, help='a token is learnable if its target is in the top k')
    score.add_argument('--batch_size', type=int, default=16, help='sequences per forward pass per rank')
    args = parser.parse_args()
    score_main(args)
