"""
One training loop for the small LM, the baseline and the SALT students.

  python train.py config/demo_slm.py                                   # one process, CPU or one GPU
  python train.py config/demo_student.py --teacher_ckpt=out/demo/slm/ckpt.pt --kd_steps=100   # SALT
  torchrun --standalone --nproc_per_node=8 train.py config/pile_student.py                    # one node
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...

A config file sets any of the globals below and `--key=value` overrides them; an unknown key or a value
of the wrong type is an error. The run is SALT as soon as `teacher_ckpt` is set: for the first `kd_steps`
steps the loss is (1-w) CE + w KL(teacher || student); afterwards plain CE and the teacher is freed.
With `score_file` set too it is SALT_DS: stage 1 trains only on the SLM-selected sequences.
"""
import ast
import datetime
import json
import math
import os
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import TokenSequences, BatchLoader
from kernels import salt_loss
from model import GPT, GPTConfig, model_args
import salt

# ----------------------------------------------------------------------------------------------------------
# config: defaults, overridden by config/*.py and --key=value
out_dir = 'out/run'          # checkpoints and metrics.jsonl go here
init_from = 'scratch'        # a new run starts from 'scratch' or a GPT-2 name ('gpt2', ...); whatever it says,
                             # a run whose out_dir holds a checkpoint continues from it ('resume' requires one)
seed = 1337                  # model init and data order
# data
data_dir = 'data/stdlib'     # made by `python data.py ...`
train_sequences = 0          # train on the first N sequences only (0 = all), e.g. a small demo pool
block_size = 128             # tokens per sequence
batch_size = 8               # sequences per micro-batch per process
grad_accum_steps = 1         # micro-batches per optimizer step per process
# model
model_size = 'demo-student'  # a preset of model.PRESETS
dropout = 0.0
# optimizer: AdamW, linear warmup then cosine decay to min_lr
max_steps = 600              # this job stops after this many steps
lr_decay_steps = 0           # the cosine ends here (0 = max_steps); set it to stop a job early and resume
learning_rate = 1e-3
min_lr = 1e-4
warmup_steps = 50
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0              # clip the global gradient norm (0 = off)
skip_nonfinite = 0           # skip up to this many steps whose loss or gradient is inf/NaN (0 = stop at the first)
# SALT (the paper's w and tau; select_fraction from our CPU studies: README, "Choosing the defaults")
teacher_ckpt = ''            # the SLM (a checkpoint of this script, or a GPT-2 name); '' = baseline
kd_steps = 0                 # stage 1 length in steps (paper: 36K of ~208K, 17%)
kd_weight = 0.667            # w: loss = (1-w) CE + w KL during stage 1
teacher_temperature = 1.0    # tau: the teacher's soft labels are softmax(z_teacher / tau)
kd_schedule = 'constant'     # w over stage 1: 'constant' (the paper's hard switch) or 'linear' decay to 0
score_file = ''              # SALT_DS: the SLM's scores (python salt.py score); '' = no selection
select_fraction = 0.25       # SALT_DS: stage 1 trains on this fraction of sequences, the highest scores
# evaluation and logging
eval_interval = 50           # steps between val-loss evaluations (also at step 0 and at the end)
eval_batches = 20            # val batches of batch_size sequences per evaluation, shared by the ranks
log_interval = 10
ckpt_interval = 200          # steps between checkpoints (also at the end)
wandb_log = False
wandb_project = 'salt'
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype on CUDA
compile = False              # torch.compile the model
ddp_timeout = 600            # seconds a rank waits for the others in a collective before the job fails
peak_flops = 989e12          # per-GPU dense bf16 peak for MFU (H100/H200 SXM)
# ----------------------------------------------------------------------------------------------------------


def apply_overrides(config, argv):
    """nanoGPT's configurator, strict: `path.py` arguments are executed into the config, `--key=value`
    arguments are parsed as Python literals (or kept as strings). Unknown keys and values of another type
    than the default's are errors."""
    def set_key(key, value, source):
        if key not in config:
            raise SystemExit(f"{source}: unknown config key {key!r} (known: {', '.join(sorted(config))})")
        default = config[key]
        if type(default) is float and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise SystemExit(f"{source}: {key}={value!r} is a {type(value).__name__}, expected a "
                             f"{type(default).__name__} like the default {default!r}")
        config[key] = value

    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise SystemExit(f"config file {arg!r} does not exist")
            scope = {}
            exec(open(arg).read(), scope)
            for key, value in scope.items():
                if not key.startswith('__'):
                    set_key(key, value, arg)
        else:
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise SystemExit(f"argument {arg!r}: expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text
            set_key(key, value, arg)


config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
config = {k: globals()[k] for k in config_keys}
apply_overrides(config, sys.argv[1:])
globals().update(config)
lr_decay_steps = lr_decay_steps or max_steps
if teacher_ckpt and not 0 < kd_steps <= lr_decay_steps:
    raise SystemExit(f"kd_steps={kd_steps}: with a teacher, 0 < kd_steps <= the run's {lr_decay_steps} steps")
if score_file and not teacher_ckpt:
    raise SystemExit("score_file is set but teacher_ckpt is not: SALT_DS selects data for the KD stage")

# ----------------------------------------------------------------------------------------------------------
# DDP: one process per device; rank 0 logs and checkpoints
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    # the timeout bounds how long a rank waits in a collective for a rank that died
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo', timeout=datetime.timedelta(seconds=ddp_timeout))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith('cuda'):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
autocast = (torch.autocast(device_type, dtype=getattr(torch, dtype)) if device_type == 'cuda' else nullcontext())
tokens_per_step = batch_size * block_size * grad_accum_steps * world_size
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"{world_size} process(es) on {device}, {tokens_per_step:,} tokens per step")

# ----------------------------------------------------------------------------------------------------------
# data
train_data = TokenSequences(data_dir, 'train', block_size, max_sequences=train_sequences or None)
meta_file = os.path.join(data_dir, 'meta.json')  # names the tokenizer; nanoGPT-style data has none
tokenizer = json.load(open(meta_file))['encoding'] if os.path.isfile(meta_file) else None
val_data = TokenSequences(data_dir, 'val', block_size)
selected_ids = None
if score_file:
    scores = salt.load_scores(score_file, expected=dict(
        data_fingerprint=train_data.fingerprint(), block_size=block_size, n_sequences=len(train_data),
        teacher=salt.teacher_id(teacher_ckpt)))
    selected_ids = salt.select_top(scores, select_fraction)
    if master:
        print(salt.selection_summary(scores, selected_ids))


def make_loader(step):
    """Stage 1 of SALT_DS reads the selected sequences only; everything else reads all of them."""
    ids = selected_ids if step < kd_steps else None
    return BatchLoader(train_data, batch_size, rank=rank, world_size=world_size, seed=seed, ids=ids)


# ----------------------------------------------------------------------------------------------------------
# model init, or resume: a run whose out_dir holds a checkpoint continues from it, so that a job killed at
# any moment is restarted with the same command
CHECKPOINTS = [os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'ckpt.prev.pt')]  # newest first
# settings a resumed run may change without changing what it computes
RESUMABLE_CHANGES = {'out_dir', 'init_from', 'max_steps', 'eval_interval', 'eval_batches', 'log_interval',
                     'ckpt_interval', 'wandb_log', 'wandb_project', 'compile', 'device', 'dtype', 'peak_flops',
                     'ddp_timeout', 'skip_nonfinite'}


def latest_good_checkpoint():
    """(path, state) of the newest checkpoint in out_dir that loads, or (None, None) when there is none.
    ckpt.prev.pt, the one before ckpt.pt, covers a ckpt.pt damaged after it was written."""
    for path in CHECKPOINTS:
        if os.path.isfile(path):
            try:
                return path, torch.load(path, map_location='cpu', weights_only=True)
            except Exception as error:  # whatever is wrong with the file, the previous one may be fine
                print(f"warning: {path} does not load ({type(error).__name__}: {error}); trying the previous one")
    if any(os.path.exists(path) for path in CHECKPOINTS):
        raise SystemExit(f"no checkpoint in {out_dir} loads (see the warnings above): move them away to start over")
    return None, None


def check_resumable(saved):
    changed = [f"{key}={saved.get(key)!r} (now {value!r})" for key, value in config.items()
               if key not in RESUMABLE_CHANGES and saved.get(key) != value]
    if changed:
        raise SystemExit(f"{out_dir} holds a checkpoint of a run with other settings: {', '.join(changed)}. "
                         f"Continue that run with its settings, or give this one another out_dir.")


ckpt_path, checkpoint = latest_good_checkpoint()
if checkpoint:
    check_resumable(checkpoint['config'])
    model_config = GPTConfig(**checkpoint['model_args'])
    model = GPT(model_config)
    model.load_state_dict(checkpoint['model'])
    if master:
        print(f"resuming from {ckpt_path} at step {checkpoint['step']}")
elif init_from == 'resume':
    raise SystemExit(f"init_from=resume but {out_dir} holds no checkpoint")
elif init_from.startswith('gpt2'):
    model = GPT.from_pretrained(init_from)
    model_config = model.config
else:
    model_config = GPTConfig.from_preset(model_size, block_size=block_size, dropout=dropout)
    model = GPT(model_config)
model.to(device)
step = checkpoint['step'] if checkpoint else 0
run_id = checkpoint['run_id'] if checkpoint else uuid.uuid4().hex[:12]
last_good = f"{ckpt_path} (step {step})" if checkpoint else None  # for the message if the loss goes non-finite
nonfinite_skipped = checkpoint['nonfinite_skipped'] if checkpoint else 0
elapsed_before = checkpoint.get('elapsed_s', 0.0) if checkpoint else 0.0  # a resumed run's wall-clock goes on

teacher = None
if teacher_ckpt and step < kd_steps:
    teacher = salt.load_teacher(teacher_ckpt, device, model_config, tokenizer)

# ----------------------------------------------------------------------------------------------------------
# optimizer: weight decay on matrices only (not on biases and LayerNorm gains)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(
    [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
     {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
    lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
loader = make_loader(step)
if checkpoint:
    optimizer.load_state_dict(checkpoint['optimizer'])
    loader.load_state_dict(checkpoint['loader'])
    torch.set_rng_state(checkpoint['rng_cpu'])
    if device_type == 'cuda' and 'rng_cuda' in checkpoint:
        torch.cuda.set_rng_state(checkpoint['rng_cuda'])
    checkpoint = None  # free the memory

raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None)
vocab_size = model_config.vocab_size


def lr_at(step):
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, lr_decay_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def loss_on(x, y, w):
    """(loss, ce, kl) of the student on one micro-batch; the teacher adds its soft labels when w > 0."""
    with autocast:
        hidden = model(x, return_hidden=True)
        teacher_hidden = None
        if w > 0:
            with torch.no_grad():
                teacher_hidden = teacher(x, return_hidden=True)
    return salt_loss(hidden, raw_model.lm_head.weight, y, teacher_hidden,
                     teacher.lm_head.weight if w > 0 else None, kd_weight=w,
                     temperature=teacher_temperature, vocab_size=vocab_size, return_parts=True)


@torch.no_grad()
def estimate_val_loss():
    """Mean next-token CE over the first eval_batches * batch_size val sequences: the same ones every time
    and for any number of ranks (which share them)."""
    model.eval()
    n = min(len(val_data), eval_batches * batch_size)
    ids = np.arange(rank * batch_size, n, world_size * batch_size)
    total = torch.zeros(2, device=device)
    for start in ids:
        seqs = val_data.get(np.arange(start, min(start + batch_size, n))).to(device)
        _, ce, _ = loss_on(seqs[:, :-1], seqs[:, 1:], 0.0)
        total += torch.tensor([ce.item() * len(seqs), len(seqs)], device=device)
    if ddp:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------------------
# logging: metrics.jsonl opens with the config, the code version and the device, so any number in it can
# be traced back to what produced it
metrics_path = os.path.join(out_dir, 'metrics.jsonl')


def git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def open_metrics():
    """Start metrics.jsonl, or on resume keep only the records up to the checkpoint's step (a killed job
    may have logged steps after its last checkpoint, which are about to be trained again, and may have left
    half a line)."""
    kept = []
    if step > 0 and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            kept = [line for line in f if line.endswith('\n') and json.loads(line).get('step', 0) <= step]
    header = dict(type='header', run_id=run_id, resumed_at=step, config=config, git_commit=git_commit(),
                  device=torch.cuda.get_device_name() if device_type == 'cuda' else 'cpu', torch=torch.__version__,
                  world_size=world_size, n_params=raw_model.num_params(), time=time.strftime('%Y-%m-%d %H:%M:%S'))
    with open(metrics_path + '.tmp', 'w') as f:
        f.writelines(kept + [json.dumps(header) + '\n'])
    os.replace(metrics_path + '.tmp', metrics_path)
    return open(metrics_path, 'a')


def log(record):
    metrics_file.write(json.dumps(record) + '\n')
    metrics_file.flush()
    if wandb_log:
        wandb.log(record, step=record['step'])


def save_checkpoint():
    """Write ckpt.pt.tmp, fsync it, move ckpt.pt to ckpt.prev.pt, rename the new file to ckpt.pt. A kill at
    any moment leaves at least one complete checkpoint (latest_good_checkpoint looks at both). Only tensors
    and plain values, so torch.load(weights_only=True) reads it."""
    state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args(model_config),
                 step=step, run_id=run_id, loader=loader.state_dict(), config=config, rng_cpu=torch.get_rng_state(),
                 nonfinite_skipped=nonfinite_skipped, tokenizer=tokenizer, elapsed_s=elapsed_before + time.time() - t_start)
    if device_type == 'cuda':
        state['rng_cuda'] = torch.cuda.get_rng_state()
    newest, previous = CHECKPOINTS
    with open(newest + '.tmp', 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(newest):
        os.replace(newest, previous)
    os.replace(newest + '.tmp', newest)
    directory = os.open(out_dir, os.O_RDONLY)  # make the renames themselves durable
    os.fsync(directory)
    os.close(directory)
    return f"{newest} (step {step})"


if master:
    metrics_file = open_metrics()
    print(f"model {model_size}: {raw_model.num_params() / 1e6:.2f}M parameters (without position embeddings); "
          f"{'SALT_DS' if score_file else 'SALT' if teacher_ckpt else 'baseline'} run, steps {step}..{max_steps}")
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=os.path.basename(out_dir.rstrip('/')), id=run_id, resume='allow',
                   config=config)

# ----------------------------------------------------------------------------------------------------------
# the loop
if step == 0 and master:
    log(dict(step=0, val_loss=estimate_val_loss()))
elif step == 0:
    estimate_val_loss()  # every rank takes part in the all_reduce
t_start, t_last, step_at_start, step_at_last = time.time(), time.time(), step, step
not_training_s = 0.0  # evaluation and checkpoint time since the last log: tokens_per_s leaves it out
while step < max_steps:
    w = salt.kd_weight_at(step, kd_steps, kd_weight, kd_schedule) if teacher is not None else 0.0
    lr = lr_at(step)
    for group in optimizer.param_groups:
        group['lr'] = lr
    parts = torch.zeros(3, device=device)
    for micro in range(grad_accum_steps):
        x, y = (t.to(device) for t in loader.next_batch())
        # DDP averages gradients across ranks only on the last micro-batch
        sync = not ddp or micro == grad_accum_steps - 1
        with (nullcontext() if sync else model.no_sync()):
            loss, ce, kl = loss_on(x, y, w)
            (loss / grad_accum_steps).backward()
        parts += torch.stack([loss.detach(), ce, kl]) / grad_accum_steps
    # clip_grad_norm_ also gives the norm for the check below (max_norm=inf: measure, don't clip)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if ddp:
        dist.all_reduce(parts, op=dist.ReduceOp.AVG)  # every rank takes the same decision below
    if not (torch.isfinite(parts[0]) and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        nonfinite_skipped += 1
        if nonfinite_skipped > skip_nonfinite:
            raise SystemExit(f"step {step + 1}: loss {parts[0].item()}, gradient norm {grad_norm.item()}: not finite, "
                             f"stopping. The last good checkpoint is {last_good or 'none (none was written yet)'}. "
                             f"Lower learning_rate, or set skip_nonfinite=N to skip up to N such batches.")
        if master:
            print(f"step {step + 1}: non-finite loss or gradient, batch skipped ({nonfinite_skipped}/{skip_nonfinite})")
        continue
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1

    if teacher_ckpt and step == kd_steps:  # stage 1 -> stage 2: drop the teacher, read all the data
        teacher = None
        if device_type == 'cuda':
            torch.cuda.empty_cache()
        loader = make_loader(step)
    do_eval = step % eval_interval == 0 or step == max_steps
    t_eval = time.time()
    val_loss = estimate_val_loss() if do_eval else None
    not_training_s += time.time() - t_eval
    if master and (step % log_interval == 0 or do_eval):
        now = time.time()
        tokens_per_s = (step - step_at_last) * tokens_per_step / (now - t_last - not_training_s)
        t_last, step_at_last, not_training_s = now, step, 0.0
        loss_v, ce_v, kl_v = parts.tolist()
        record = dict(step=step, loss=loss_v, ce=ce_v, kl=kl_v, kd_weight=w, lr=lr, tokens_per_s=tokens_per_s,
                      elapsed_s=elapsed_before + now - t_start)
        if device_type == 'cuda':
            record['mfu'] = raw_model.flops_per_token() * tokens_per_s / (peak_flops * world_size)
        if val_loss is not None:
            record['val_loss'] = val_loss
        log(record)
        eta = (max_steps - step) * (now - t_start) / (step - step_at_start)
        print(f"step {step}/{max_steps} | loss {loss_v:.4f} (ce {ce_v:.4f} kl {kl_v:.4f} w {w:.3f}) | lr {lr:.2e} | "
              f"{tokens_per_s:,.0f} tok/s" + (f" | mfu {record['mfu']:.1%}" if 'mfu' in record else '') +
              (f" | val {val_loss:.4f}" if val_loss is not None else '') + f" | eta {eta / 60:.1f} min", flush=True)
    if master and (step % ckpt_interval == 0 or step == max_steps):
        t_save = time.time()
        last_good = save_checkpoint()
        not_training_s += time.time() - t_save

if master:
    metrics_file.close()
if ddp:
    dist.barrier()  # rank 0 may still be writing the last checkpoint: leave together, or gloo may abort
    dist.destroy_process_group()
