"""
One training loop for the small LM, the baseline and the SALT students.

  python train.py config/demo_slm.py                                   # one process, CPU or one GPU
  python train.py config/demo_student.py --teacher_ckpt=out/demo/slm/ckpt --kd_steps=100      # SALT
  torchrun --standalone --nproc_per_node=8 train.py config/pile_student.py                    # one node
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...

parallelism='ddp' keeps a whole copy of the student, its gradients and AdamW's state on every GPU (about 16
bytes per parameter); parallelism='fsdp' shards all three over the GPUs (FSDP2's fully_shard on each block
and the root), for students that do not fit DDP. The plan of the expected memory per GPU is printed at start.

A config file sets any of the globals below and `--key=value` overrides them; an unknown key or a value
of the wrong type is an error. The run is SALT as soon as `teacher_ckpt` is set: for the first `kd_steps`
steps the loss is (1-w) CE + w KL(teacher || student); afterwards plain CE and the teacher is freed.
With `score_file` set too it is SALT_DS: stage 1 trains only on the SLM-selected sequences.
"""
import ast
import datetime
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import uuid
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from data import BatchLoader, InputError, TokenSequences, atomic_write, git_commit, report_input_errors
import evaluate
from model import GPT, GPT2_NAMES, GPTConfig, PRESETS, memory_plan, memory_table, model_args
import salt

report_input_errors()  # bad input (a file, a key, a value) ends in one line naming it, not a traceback
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
eval_tasks = ''              # few-shot tasks run at each evaluation too: 'hellaswag:PATH,lambada:PATH' (evaluate.py)
eval_shots = 0               # with eval_tasks: solved examples before each one, from eval_fewshot_files
eval_fewshot_files = ''      # 'hellaswag:PATH,lambada:PATH': where the shots come from (another split)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype ('float32' = no autocast)
compile = False              # torch.compile the model (and the teacher)
parallelism = 'ddp'          # under torchrun: 'ddp' (a replica per GPU) or 'fsdp' (parameters, gradients and
                             # optimizer state sharded over the GPUs)
shard_teacher = False        # fsdp: shard the teacher's blocks too (default: a frozen replica per GPU)
activation_checkpointing = False  # recompute each block's activations in the backward: less memory, ~1/3 more compute
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


def check_settings():
    """Refuse, at start and naming the key, settings that make no sense, rather than train on them."""
    rules = [(key, config[key] >= 1, '>= 1') for key in ('batch_size', 'block_size', 'grad_accum_steps', 'max_steps',
                                                          'eval_interval', 'eval_batches', 'log_interval', 'ckpt_interval')]
    rules += [
        ('learning_rate', learning_rate > 0, '> 0'), ('min_lr', 0 <= min_lr <= learning_rate, 'in [0, learning_rate]'),
        ('lr_decay_steps', lr_decay_steps >= 0, '>= 0 (0 = max_steps)'),
        ('warmup_steps', 0 <= warmup_steps <= (lr_decay_steps or max_steps), 'in [0, lr_decay_steps or max_steps]'),
        ('weight_decay', weight_decay >= 0, '>= 0'), ('beta1', 0 <= beta1 < 1, 'in [0, 1)'),
        ('beta2', 0 <= beta2 < 1, 'in [0, 1)'), ('grad_clip', grad_clip >= 0, '>= 0 (0 = off)'),
        ('dropout', 0 <= dropout < 1, 'in [0, 1)'), ('train_sequences', train_sequences >= 0, '>= 0 (0 = all)'),
        ('kd_weight', 0 <= kd_weight <= 1, 'in [0, 1]'), ('teacher_temperature', teacher_temperature > 0, '> 0'),
        ('select_fraction', 0 < select_fraction <= 1, 'in (0, 1]'),
        ('kd_schedule', kd_schedule in ('constant', 'linear'), "'constant' or 'linear'"),
        ('model_size', model_size in PRESETS, f"one of {', '.join(PRESETS)}"),
        ('init_from', init_from in ('scratch', 'resume') + GPT2_NAMES, f"'scratch', 'resume' or one of {GPT2_NAMES}"),
        # float16 would need loss scaling (a GradScaler); every GPU this is for has bfloat16
        ('dtype', dtype in ('float32', 'bfloat16'), "'float32' or 'bfloat16' (float16 is not supported)"),
        ('parallelism', parallelism in ('ddp', 'fsdp'), "'ddp' or 'fsdp'"),
        ('shard_teacher', not shard_teacher or parallelism == 'fsdp', "False unless parallelism='fsdp'"),
        ('eval_shots', eval_shots >= 0 and (eval_tasks or not eval_shots), '>= 0, with eval_tasks'),
        ('skip_nonfinite', skip_nonfinite >= 0, '>= 0'), ('kd_steps', kd_steps >= 0, '>= 0'),
        ('ddp_timeout', ddp_timeout > 0, '> 0'), ('peak_flops', peak_flops > 0, '> 0'),
    ]
    for key, ok, expected in rules:
        if not ok:
            raise SystemExit(f"{key}={config[key]!r}: expected {expected}")
    if teacher_ckpt and not 0 < kd_steps <= (lr_decay_steps or max_steps):
        raise SystemExit(f"kd_steps={kd_steps}: with a teacher, 0 < kd_steps <= the run's {lr_decay_steps or max_steps} steps")
    if score_file and not teacher_ckpt:
        raise SystemExit("score_file is set but teacher_ckpt is not: SALT_DS selects data for the KD stage")


check_settings()
lr_decay_steps = lr_decay_steps or max_steps

# ----------------------------------------------------------------------------------------------------------
# processes: one per device under torchrun; rank 0 logs
distributed = int(os.environ.get('RANK', -1)) != -1
if distributed:
    # the timeout bounds how long a rank waits in a collective for a rank that died
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo', timeout=datetime.timedelta(seconds=ddp_timeout))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith('cuda'):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
elif parallelism == 'fsdp':
    raise SystemExit("parallelism='fsdp' shards over the processes of torchrun: start this run with torchrun")
else:
    rank, world_size = 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
# the student, the teacher and the loss (inside the student's forward) all run under it
autocast = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != 'float32' else nullcontext()
tokens_per_step = batch_size * block_size * grad_accum_steps * world_size
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"{world_size} process(es) on {device} ({parallelism if distributed else 'single process'}), "
          f"{tokens_per_step:,} tokens per step")

# ----------------------------------------------------------------------------------------------------------
# data
train_data = TokenSequences(data_dir, 'train', block_size, max_sequences=train_sequences or None)
meta_file = os.path.join(data_dir, 'meta.json')  # names the tokenizer; nanoGPT-style data has none
tokenizer = json.load(open(meta_file))['encoding'] if os.path.isfile(meta_file) else None
val_data = TokenSequences(data_dir, 'val', block_size)
train_fingerprint = train_data.fingerprint()  # reads both ends of every shard: once
selected_ids = None
if score_file:
    scores = salt.load_scores(score_file, expected=dict(  # the most telling difference first
        block_size=block_size, n_sequences=len(train_data), teacher=salt.teacher_id(teacher_ckpt),
        data_fingerprint=train_fingerprint))
    selected_ids = salt.select_top(scores, select_fraction)
    if master:
        print(salt.selection_summary(scores, selected_ids))
# What the run reads, by content: a resumed run may find its data, teacher or scores moved or copied elsewhere
# (a new path), not changed. The teacher's is added with the model, below.
inputs = dict(data_dir=f"{train_fingerprint}/{val_data.fingerprint()}",
              score_file=hashlib.sha256(selected_ids.tobytes()).hexdigest() if score_file else '')
# every evaluation reads the same val sequences, spread evenly over the val split (its first ones may all be one
# document, or one subset); their data subsets give a val loss per subset
val_ids = np.unique(np.linspace(0, len(val_data) - 1, min(len(val_data), eval_batches * batch_size)).round().astype(np.int64))
try:
    val_subsets, subset_names = val_data.domains()
    val_subsets = val_subsets[val_ids]
except InputError:  # data without subsets (nanoGPT's prepare.py): the overall val loss only
    val_subsets, subset_names = np.zeros(len(val_ids), dtype=np.int64), []
tasks = evaluate.read_tasks(eval_tasks, eval_fewshot_files) if eval_tasks else []


def make_loader(step):
    """Stage 1 of SALT_DS reads the selected sequences only; everything else reads all of them."""
    ids = selected_ids if step < kd_steps else None
    return BatchLoader(train_data, batch_size, rank=rank, world_size=world_size, seed=seed, ids=ids,
                       accumulation=grad_accum_steps)


# ----------------------------------------------------------------------------------------------------------
# checkpoints: out_dir/ckpt, a torch.distributed.checkpoint (DCP) directory that every rank writes its part of
# in parallel (a rank's shard under fsdp; under ddp the replicated tensors are spread over the ranks), and
# that loads on any number of ranks, or in one process (salt.load_model); plus ckpt/meta.pt, written by rank 0:
# the step, config, loader and RNG state. A run whose out_dir holds a checkpoint continues from it, so that a
# job killed at any moment is restarted with the same command.
CHECKPOINTS = [os.path.join(out_dir, 'ckpt'), os.path.join(out_dir, 'ckpt.prev')]  # newest first
# settings a resumed run may change without changing what it computes
RESUMABLE_CHANGES = {'out_dir', 'init_from', 'max_steps', 'eval_interval', 'eval_batches', 'log_interval',
                     'ckpt_interval', 'wandb_log', 'wandb_project', 'eval_tasks', 'eval_shots', 'eval_fewshot_files',
                     'compile', 'device', 'dtype', 'peak_flops', 'ddp_timeout', 'skip_nonfinite', 'parallelism',
                     'shard_teacher', 'activation_checkpointing', 'grad_accum_steps'}  # the last: see below


def latest_good_checkpoint():
    """(path, meta) of the newest checkpoint in out_dir that is complete, or (None, None) when there is none.
    ckpt.prev, the one before ckpt, covers a ckpt damaged after it was written."""
    for path in CHECKPOINTS:
        if os.path.isdir(path):
            try:
                return path, salt.read_checkpoint_meta(path)
            except InputError as error:  # whatever is wrong with it, the previous one may be fine
                print(f"warning: {error}; trying the previous checkpoint")
    if any(os.path.exists(path) for path in CHECKPOINTS):
        raise SystemExit(f"no checkpoint in {out_dir} is complete (see the warnings above): move them away to start over")
    return None, None


# paths a resumed run compares by what they hold (inputs, above), not by name
MOVABLE = {'data_dir': 'data', 'teacher_ckpt': 'teacher', 'score_file': 'SALT_DS selection'}


def teacher_identity():
    return salt.teacher_id(teacher_ckpt) if teacher_ckpt else ''


def check_resumable(meta):
    """Refuse to continue a run with other settings; paths may differ where they hold the same thing."""
    saved = meta['config']
    changed = [f"{key}={saved.get(key)!r} (now {value!r})" for key, value in config.items()
               if key not in RESUMABLE_CHANGES | set(MOVABLE) and saved.get(key) != value]
    # the same path is the same teacher: not read again, stage 2 may have deleted it
    inputs['teacher_ckpt'] = meta['inputs']['teacher_ckpt'] if saved['teacher_ckpt'] == teacher_ckpt else teacher_identity()
    changed += [f"{key}={config[key]!r} (the run read another {what} from {saved[key]!r})"
                for key, what in MOVABLE.items() if inputs[key] != meta['inputs'][key]]
    # the global batch: on other processes, grad_accum_steps must keep it (the loader reads the same batches)
    if saved['grad_accum_steps'] * meta['world_size'] != grad_accum_steps * world_size:
        changed.append(f"grad_accum_steps x processes = {saved['grad_accum_steps']} x {meta['world_size']} "
                       f"(now {grad_accum_steps} x {world_size})")
    if changed:
        raise SystemExit(f"{out_dir} holds a checkpoint of a run with other settings: {', '.join(changed)}. "
                         f"Continue that run with its settings, or give this one another out_dir.")


# ----------------------------------------------------------------------------------------------------------
# model and teacher: built whole on every rank (the same init from the same seed), then sharded under fsdp;
# a checkpoint's weights are loaded after the sharding, each rank reading its part
ckpt_path, checkpoint = latest_good_checkpoint()
if checkpoint:
    check_resumable(checkpoint)
    model_config = GPTConfig(**checkpoint['model_args'])
    model = GPT(model_config)
    if master:
        print(f"resuming from {ckpt_path} at step {checkpoint['step']}")
elif init_from == 'resume':
    raise SystemExit(f"init_from=resume but {out_dir} holds no checkpoint")
elif init_from in GPT2_NAMES:
    model = GPT.from_pretrained(init_from)
    model_config = model.config
else:
    model_config = GPTConfig.from_preset(model_size, block_size=block_size, dropout=dropout)
    model = GPT(model_config)
if not checkpoint:
    inputs['teacher_ckpt'] = teacher_identity()
model.activation_checkpointing = activation_checkpointing
model.to(device)
step = checkpoint['step'] if checkpoint else 0
run_id = checkpoint['run_id'] if checkpoint else uuid.uuid4().hex[:12]
last_good = f"{ckpt_path} (step {step})" if checkpoint else None  # for the message if the loss goes non-finite
nonfinite_skipped = checkpoint['nonfinite_skipped'] if checkpoint else 0
elapsed_before = checkpoint.get('elapsed_s', 0.0) if checkpoint else 0.0  # a resumed run's wall-clock goes on

teacher = teacher_config = None
if teacher_ckpt and step < kd_steps:
    teacher = salt.load_teacher(teacher_ckpt, device, model_config, tokenizer)
    teacher_config = teacher.config
    if dtype != 'float32':  # frozen: its weights need no fp32 master copy (half the memory, no cast per step)
        teacher.to(getattr(torch, dtype))
if master:  # what this run should need per device, under ddp and fsdp (an estimate: model.memory_plan)
    plan = memory_plan(model_config, teacher_config, tokens=batch_size * block_size,
                       world_size=world_size, compute_bytes=2 if dtype == 'bfloat16' else 4,
                       checkpointing=activation_checkpointing, shard_teacher=shard_teacher)
    print(memory_table(plan, world_size, torch.cuda.get_device_properties(device).total_memory
                       if device_type == 'cuda' else None))


def shard(module, blocks_only=False):
    """FSDP2: each block its own unit, gathered whole only inside its forward and backward, so at any moment a
    rank holds its shard of everything plus the few blocks at work; the root unit holds the embeddings, the
    final LayerNorm and the (tied) LM head. On CUDA, bf16 compute with gradients reduced in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device_type == 'cuda' and dtype == 'bfloat16' else MixedPrecisionPolicy()
    for block in module.transformer.h:
        fully_shard(block, mp_policy=policy)
    if not blocks_only:
        fully_shard(module, mp_policy=policy)


raw_model = model  # the GPT itself (under fsdp, sharded in place): weights, checkpoints, evaluation
if parallelism == 'fsdp':
    shard(model)
    if teacher is not None and shard_teacher:
        shard(teacher, blocks_only=True)  # the root stays whole: its LM head feeds the loss outside its forward

# ----------------------------------------------------------------------------------------------------------
# optimizer: AdamW, weight decay on matrices only (not on biases and LayerNorm gains)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(
    [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
     {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
    lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
loader = make_loader(step)
if checkpoint:
    state = dict(zip(('model', 'optimizer'), get_state_dict(raw_model, optimizer)))
    dcp.load(state, checkpoint_id=ckpt_path)  # each rank reads the part it holds, whatever wrote it
    set_state_dict(raw_model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'])
    loader.load_state_dict(checkpoint['loader'])
    torch.set_rng_state(checkpoint['rng_cpu'])
    if device_type == 'cuda' and 'rng_cuda' in checkpoint:
        torch.cuda.set_rng_state(checkpoint['rng_cuda'])
    checkpoint = state = None  # free the memory

if compile:
    model = torch.compile(model)
    if teacher is not None:
        teacher = torch.compile(teacher)
if distributed and parallelism == 'ddp':
    # gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy beside them
    model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None,
                gradient_as_bucket_view=True)


def lr_at(step):
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, lr_decay_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def loss_on(x, y, w):
    """(loss, ce, kl) of the student on one micro-batch. In stage 1 the teacher's hidden states and LM head go
    into the student's forward, which computes the loss (the KL term only when w > 0)."""
    with autocast:
        soft_labels = None
        if w > 0:
            with torch.no_grad():
                soft_labels = teacher(x, return_hidden=True), teacher.lm_head.weight
        return model(x, y, teacher=soft_labels, kd_weight=w, temperature=teacher_temperature)


def gradient_sync(on):
    """Gradients are averaged across ranks on a step's last micro-batch only."""
    if parallelism == 'fsdp':
        raw_model.set_requires_gradient_sync(on)
    return model.no_sync() if distributed and parallelism == 'ddp' and not on else nullcontext()


@torch.no_grad()
def evaluate_val():
    """(mean next-token CE, its standard error over the sequences, {data subset: its mean CE}) over the val
    sequences val_ids: the same ones every time, for any number of ranks (which share them). Every rank runs
    as many forwards, as fsdp gathers weights in each: a rank short of batches repeats one, uncounted."""
    raw_model.eval()
    # per subset: the sequences' CE sums, their mean CE squared, and their count
    sums = torch.zeros(3, max(1, len(subset_names)), dtype=torch.float64, device=device)
    starts = range(0, len(val_ids), batch_size)
    mine = starts[rank::world_size]
    for i in range(-(-len(starts) // world_size)):
        first = mine[i] if i < len(mine) else starts[0]
        seqs = val_data.get(val_ids[first:first + batch_size]).to(device)
        with autocast:
            ce, _ = raw_model(seqs[:, :-1], seqs[:, 1:], reduction='none')
        if i < len(mine):
            subsets = torch.as_tensor(val_subsets[first:first + batch_size], device=device)
            per_sequence = ce.double().mean(dim=1)
            for row, values in enumerate((per_sequence, per_sequence ** 2, torch.ones_like(per_sequence))):
                sums[row].index_add_(0, subsets, values)
    if distributed:
        dist.all_reduce(sums)
    raw_model.train()
    mean, mean_square, n = sums[0].sum() / sums[2].sum(), sums[1].sum() / sums[2].sum(), sums[2].sum()
    standard_error = ((mean_square - mean ** 2).clamp(min=0) / n).sqrt()  # the sequences have equal lengths
    per_subset = {name: (sums[0, i] / sums[2, i]).item() for i, name in enumerate(subset_names) if sums[2, i] > 0}
    return mean.item(), standard_error.item(), per_subset


def evaluation():
    """The metrics of an evaluation: val loss, overall and per data subset, and the few-shot tasks' scores."""
    val_loss, standard_error, per_subset = evaluate_val()
    record = dict(val_loss=val_loss, val_loss_se=standard_error)
    if per_subset:
        record['val_loss_subsets'] = per_subset
    results = evaluate.evaluate_tasks(raw_model, tasks, shots=eval_shots, batch_size=batch_size, rank=rank,
                                      world_size=world_size, autocast=autocast) if tasks else {}
    for task, scores in results.items():
        record.update({f"{task}/{metric}": value for metric, value in scores.items()
                       if metric not in ('chance', 'examples', 'truncated')})
    return record


# ----------------------------------------------------------------------------------------------------------
# logging: metrics.jsonl opens with the config, the code version and the device, so any number in it can
# be traced back to what produced it
metrics_path = os.path.join(out_dir, 'metrics.jsonl')


def open_metrics():
    """Start metrics.jsonl, or on resume keep only the records up to the checkpoint's step (a killed job
    may have logged steps after its last checkpoint, which are about to be trained again, and may have left
    half a line)."""
    kept = []
    if step > 0 and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            kept = [line for line in f if line.endswith('\n') and json.loads(line).get('step', 0) <= step]
    val_tokens = np.bincount(val_subsets, minlength=len(subset_names)) * block_size
    header = dict(type='header', run_id=run_id, resumed_at=step, config=config, git_commit=git_commit(),
                  device=torch.cuda.get_device_name() if device_type == 'cuda' else 'cpu', torch=torch.__version__,
                  world_size=world_size, n_params=raw_model.num_params(), time=time.strftime('%Y-%m-%d %H:%M:%S'),
                  val_tokens=int(len(val_ids) * block_size),
                  val_tokens_subsets={name: int(n) for name, n in zip(subset_names, val_tokens) if n})
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
    """Every rank writes its part of ckpt.tmp (DCP fsyncs its files), rank 0 adds meta.pt, then moves ckpt to
    ckpt.prev and ckpt.tmp to ckpt. A kill at any moment leaves at least one complete checkpoint
    (latest_good_checkpoint looks at both). meta.pt holds only tensors and plain values, so
    torch.load(weights_only=True) reads it."""
    newest, previous = CHECKPOINTS
    tmp = newest + '.tmp'
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)  # a killed run's
    if distributed:
        dist.barrier()
    model_state, optimizer_state = get_state_dict(raw_model, optimizer)
    dcp.save({'model': model_state, 'optimizer': optimizer_state}, checkpoint_id=tmp)
    if master:
        meta = dict(model_args=model_args(model_config), step=step, run_id=run_id, world_size=world_size,
                    loader=loader.state_dict(), config=config, rng_cpu=torch.get_rng_state(),
                    nonfinite_skipped=nonfinite_skipped, tokenizer=tokenizer, inputs=inputs,
                    elapsed_s=elapsed_before + time.time() - t_start)
        if device_type == 'cuda':
            meta['rng_cuda'] = torch.cuda.get_rng_state()
        buffer = io.BytesIO()
        torch.save(meta, buffer)
        atomic_write(os.path.join(tmp, 'meta.pt'), [buffer.getvalue()])
        if os.path.exists(previous):
            shutil.rmtree(previous)
        if os.path.exists(newest):
            os.replace(newest, previous)
        os.replace(tmp, newest)
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


def throughput(tokens_per_s, w):
    """tokens/s, and MFU on CUDA: the student's training FLOPs alone ('mfu', what the run gets done), and with
    the teacher's forward in stage 1 ('mfu_with_teacher', how busy the GPUs are), over the trained length."""
    record = dict(tokens_per_s=tokens_per_s)
    if device_type == 'cuda':
        peak = peak_flops * world_size
        record['mfu'] = model_config.flops_per_token(block_size) * tokens_per_s / peak
        if w > 0:
            record['mfu_with_teacher'] = record['mfu'] + teacher_config.flops_per_token(block_size, backward=False) \
                * tokens_per_s / peak
    return record


def to_device(batch):
    """Host -> device without a sync: from pinned memory, asynchronously."""
    return [t.pin_memory().to(device, non_blocking=True) if device_type == 'cuda' else t for t in batch]


def check_finite(parts, grad_norm):
    """The one host-device sync of a step: skip a step whose loss or gradient is not finite, or stop."""
    global nonfinite_skipped
    if torch.isfinite(torch.stack([parts[0], grad_norm])).all():
        return True
    optimizer.zero_grad(set_to_none=True)
    nonfinite_skipped += 1
    if nonfinite_skipped > skip_nonfinite:
        raise SystemExit(f"step {step + 1}: loss {parts[0].item()}, gradient norm {grad_norm.item()}: not finite, "
                         f"stopping. The last good checkpoint is {last_good or 'none (none was written yet)'}. "
                         f"Lower learning_rate, or set skip_nonfinite=N to skip up to N such batches.")
    if master:
        print(f"step {step + 1}: non-finite loss or gradient, batch skipped ({nonfinite_skipped}/{skip_nonfinite})")
    return False


# ----------------------------------------------------------------------------------------------------------
# the loop
t_start, step_at_start = time.time(), step
if step == 0:
    first_eval = evaluation()  # every rank takes part in the all-reduces
    if master:
        log(dict(step=0, **first_eval))
# tokens/s leaves out evaluation and checkpoint time, and the first step of this process and of stage 2:
# torch.compile compiles (again) there
t_last, step_at_last, not_training_s, warming_up = time.time(), step, 0.0, True
while step < max_steps:
    w = salt.kd_weight_at(step, kd_steps, kd_weight, kd_schedule) if teacher is not None else 0.0
    lr = lr_at(step)
    for group in optimizer.param_groups:
        group['lr'] = lr
    parts = torch.zeros(3, device=device)
    for micro in range(grad_accum_steps):
        x, y = to_device(loader.next_batch())
        with gradient_sync(micro == grad_accum_steps - 1):
            loss, ce, kl = loss_on(x, y, w)
            (loss / grad_accum_steps).backward()
        parts += torch.stack([loss.detach(), ce, kl]) / grad_accum_steps
    # clip_grad_norm_ also gives the norm for the check below (max_norm=inf: measure, don't clip)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # fsdp: the global norm
    if distributed:
        dist.all_reduce(parts, op=dist.ReduceOp.AVG)  # every rank takes the same decision below
    if not check_finite(parts, grad_norm):
        continue
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    if warming_up:
        t_last, step_at_last, not_training_s, warming_up = time.time(), step, 0.0, False

    if teacher_ckpt and step == kd_steps:  # stage 1 -> stage 2: drop the teacher, read all the data
        teacher, warming_up = None, True
        if device_type == 'cuda':
            torch.cuda.empty_cache()
        loader = make_loader(step)
    do_eval = step % eval_interval == 0 or step == max_steps
    t_eval = time.time()
    metrics = evaluation() if do_eval else {}
    not_training_s += time.time() - t_eval
    if master and (step % log_interval == 0 or do_eval):
        now = time.time()
        loss_v, ce_v, kl_v = parts.tolist()
        record = dict(step=step, loss=loss_v, ce=ce_v, kl=kl_v, kd_weight=w, lr=lr, grad_norm=grad_norm.item(),
                      elapsed_s=elapsed_before + now - t_start)
        if step > step_at_last:  # else this interval was all warm-up
            record.update(throughput((step - step_at_last) * tokens_per_step / (now - t_last - not_training_s), w))
            t_last, step_at_last, not_training_s = now, step, 0.0
        log(dict(record, **metrics))
        eta = (max_steps - step) * (now - t_start) / (step - step_at_start)
        print(f"step {step}/{max_steps} | loss {loss_v:.4f} (ce {ce_v:.4f} kl {kl_v:.4f} w {w:.3f}) | lr {lr:.2e}" +
              (f" | {record['tokens_per_s']:,.0f} tok/s" if 'tokens_per_s' in record else '') +
              (f" | mfu {record['mfu']:.1%}" if 'mfu' in record else '') +
              (f" | val {metrics['val_loss']:.4f}" if metrics else '') + f" | eta {eta / 60:.1f} min", flush=True)
    if step % ckpt_interval == 0 or step == max_steps:
        t_save = time.time()
        last_good = save_checkpoint()  # every rank writes its part
        not_training_s += time.time() - t_save

if master:
    metrics_file.close()
if distributed:
    dist.barrier()  # leave together, or gloo may abort a rank still at work
    dist.destroy_process_group()
