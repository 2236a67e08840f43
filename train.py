"""
One training loop for the small LM, the baseline and the SALT students.

  python train.py config/demo_slm.py                                   # one process, CPU or one GPU
  python train.py config/demo_student.py --teacher_ckpt=out/demo/slm/ckpt --kd_steps=100      # SALT
  torchrun --standalone --nproc_per_node=8 train.py config/pile_student.py                    # one node
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 --rdzv_id=JOB \
      train.py config/pile_student.py                            # the same command on each of two nodes

A config file sets any of the globals below and `--key=value` overrides them (configurator.py). The run is
SALT as soon as `teacher_ckpt` is set: for the first `kd_steps` steps the loss is (1-w) CE + w KD(teacher ||
student) (losses.py), then plain CE (salt.Schedule says what each step does); with `score_file` too it is
SALT_DS, stage 1 reading only the SLM-selected sequences. parallelism='fsdp' shards the student over the GPUs
where 'ddp' keeps a replica on each (the memory plan printed at start tells). A run continues from the
checkpoint in its out_dir (checkpoint_manager.py), and holds out_dir/run.lock while it lives: a second job on the
same out_dir is refused. A rank whose launcher dies stops within a second (common.end_with_parent).
"""
import gc
import json
import math
import os
import sys
import time
import uuid
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint_manager
import configurator
import evaluation
import losses
import salt
import tokenizer
from common import InputError, compute_init, end_job, fsdp_shard, git_commit, lock_for_the_job, report_input_errors
from data import ORDER_VERSION, BatchLoader, TokenSequences
from memory import memory_plan, memory_table, start_memory
from model import GPT, GPT2_NAMES, GPTConfig, compiled, model_args

report_input_errors()  # bad input (a file, a key, a value) ends in one line naming it, not a traceback
# ----------------------------------------------------------------------------------------------------------
# config: defaults, overridden by config/*.py and --key=value
out_dir = 'out/run'          # checkpoints and metrics.jsonl go here
init_from = 'scratch'        # a new run starts from 'scratch' or a GPT-2 name ('gpt2', ...); whatever it says,
                             # a run whose out_dir holds a checkpoint continues from it ('resume' requires one)
seed = 1337                  # model init and data order
role = 'student'             # the data order's random stream ('slm' in the SLMs' configs): runs of one seed and role
                             # read one order; another role's order is independent of it, whatever the seeds
# data
data_dir = 'data/stdlib'     # made by `python prepare.py ...`
train_sequences = 0          # train on the first N sequences only (0 = all), e.g. a small demo pool
block_size = 128             # tokens per sequence
batch_size = 8               # sequences per micro-batch per process
grad_accum_steps = 1         # micro-batches per optimizer step per process
# model: a preset's shape and architecture (model.PRESETS), any key below that is set (not None) overriding it
model_size = 'demo-student'  # a preset of model.PRESETS
architecture = ''            # 'gpt2' or 'llama' (model.ARCHITECTURES): the switches below together; '' = model_size's
n_layer = None               # the shape: blocks, attention heads, width
n_head = None
n_embd = None
n_kv_head = None             # grouped-query attention: key and value heads, a divisor of n_head
positions = None             # 'learned' or 'rope'
rope_theta = None            # rope's base (10000.0)
norm = None                  # 'layernorm' or 'rmsnorm'
mlp = None                   # 'gelu' or 'swiglu'
mlp_hidden = None            # the MLP's inner width (4 n_embd for gelu, ~8/3 n_embd for swiglu)
bias = None                  # biases in every Linear and LayerNorm
tie_embeddings = None        # one matrix embeds tokens and scores them
dropout = 0.0
# optimizer: AdamW, linear warmup then a decay to min_lr (salt.lr_at)
max_steps = 600              # this job stops after this many steps
lr_schedule = 'cosine'       # 'cosine', or 'wsd': constant after the warmup, then a linear decay over the last
decay_fraction = 0.2         # decay_fraction of the steps (wsd only)
lr_decay_steps = 0           # the schedule ends here (0 = max_steps); set it to stop a job early and resume
learning_rate = 1e-3
min_lr = 1e-4
warmup_steps = 50
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0              # clip the global gradient norm (0 = off)
skip_nonfinite = 0           # skip up to this many steps whose loss or gradient is inf/NaN (0 = stop at the first)
# SALT (the paper's w and tau)
teacher_ckpt = ''            # the SLM: a checkpoint of this script, a transformers model's directory (Pythia,
                             # SmolLM2, Qwen, ...: the data's tokenizer) or a GPT-2 name; '' = baseline
kd_steps = 0                 # stage 1 length in steps (paper: 36K of ~208K, 17%)
kd_weight = 0.667            # w: loss = (1-w) CE + w KD during stage 1
teacher_temperature = 1.0    # tau: the teacher's soft labels are softmax(z_teacher / tau)
kd_schedule = 'constant'     # w over stage 1: 'constant' (the paper's hard switch) or 'linear' decay to 0
kd_end = 'steps'             # stage 1 ends after kd_steps ('steps'), or once the student's val CE is at or below the
                             # teacher's ('teacher'; kd_steps the limit): salt.Schedule
kd_loss = 'forward_kl'       # KD: KL(teacher || student), the paper's; or 'reverse_kl', 'jsd', 'jsd:beta=0.3' ...
                             # (losses.DIVERGENCES, their parameters after the colon)
kd_token_weight = 'constant' # w per token: 'constant' (the paper's), or w times the teacher's 'confidence' or its
                             # probability of the true token, 'on_target' (losses.TOKEN_WEIGHTS)
score_file = ''              # SALT_DS: the SLM's scores (python salt.py score); '' = no selection
select_fraction = 0.0        # SALT_DS selects the top kd_steps x global batch sequences by score, what stage 1 reads
                             # (0, the paper's), or this fraction of the pool (stage 1 reads a seeded part of it)
# evaluation and logging
eval_interval = 50           # steps between val-loss evaluations (also at step 0 and at the end)
eval_batches = 20            # val batches of batch_size sequences per evaluation, shared by the ranks
eval_compiled = True         # with compile: evaluations run the compiled model; False: eager, no graph of their own,
                             # so that every compilation falls in a stage's first step (benchmarks: bench_train.py)
log_interval = 10
log_ids = False              # append the ids of the sequences each step reads to out_dir/ids_rank<R>.jsonl (R: the rank)
ckpt_interval = 200          # steps between checkpoints (also at the end; 0 = none, e.g. a benchmark)
branch_steps = ''            # '300,420': also keep the checkpoints of these steps (out_dir/ckpt_stepN), to branch from
branch_from = ''             # 'DIR@N': a new run starts as the run in DIR at its kept step N, to decay to this max_steps
                             # (lr_schedule='wsd'; the learning rates before N must agree: checkpoint_manager.py)
wandb_log = False
wandb_project = 'salt'
eval_tasks = ''              # few-shot tasks run at each evaluation too: 'hellaswag:PATH,lambada:PATH' (evaluation.py)
eval_shots = 0               # with eval_tasks: solved examples before each one, from eval_fewshot_files
eval_fewshot_files = ''      # 'hellaswag:PATH,lambada:PATH': where the shots come from (another split)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype ('float32' = no autocast)
compile = False              # torch.compile the student (and the teacher)
compile_scope = 'blocks'     # 'blocks': each transformer block apart, in place (identical blocks share one compiled
                             # graph; the loss runs uncompiled); 'model': the whole forward, the loss included
parallelism = 'ddp'          # under torchrun: 'ddp' (a replica per GPU) or 'fsdp' (parameters, gradients and
                             # optimizer state sharded over the GPUs)
shard_teacher = False        # fsdp: shard the teacher's blocks too (default: a frozen replica per GPU)
activation_checkpointing = False  # recompute each block's activations in the backward: less memory, ~1/3 more compute
ddp_timeout = 600            # seconds a rank waits for the others in a collective before the job fails
peak_flops = 989e12          # per-GPU dense bf16 peak for MFU (H100/H200 SXM)
config = configurator.configure(globals(), sys.argv[1:])  # and checked: nonsense is refused, naming the key
globals().update(config)

# ----------------------------------------------------------------------------------------------------------
# processes: one per device under torchrun; rank 0 logs
distributed, rank, world_size, device = compute_init(device, ddp_timeout)
if parallelism == 'fsdp' and not distributed:
    raise InputError("parallelism='fsdp' shards over the processes of torchrun: start this run with torchrun")
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
lock_for_the_job(os.path.join(out_dir, 'run.lock'), f"out_dir {out_dir}")  # one job per out_dir, or two writers

# ----------------------------------------------------------------------------------------------------------
# data
train_data = TokenSequences(data_dir, 'train', block_size, max_sequences=train_sequences or None)
data_tokenizer = tokenizer.data_record(data_dir)  # meta.json's (nanoGPT-style data: GPT-2's): the student's vocabulary
val_data = TokenSequences(data_dir, 'val', block_size)
train_fingerprint = train_data.fingerprint()  # reads both ends of every shard: once
ckpt_path, checkpoint = checkpoint_manager.latest(out_dir)  # the newest intact checkpoint, or None: a new run
branching = checkpoint is None and bool(branch_from)  # a new branch: as if its parent's run resumed here
if branching:
    ckpt_path, checkpoint = checkpoint_manager.branch_point(branch_from)
# the teacher by its content; a resumed run's at the path it had is the one it trained with, and is not read
# again (stage 2 may have deleted it)
teacher_identity = checkpoint_manager.teacher_identity(config, checkpoint, salt.teacher_id)
selected_ids = None
if score_file:
    scores = salt.load_scores(score_file, expected=dict(  # the most telling difference first
        block_size=block_size, n_sequences=len(train_data), teacher=teacher_identity,
        data_fingerprint=train_fingerprint))
    stage1_sequences = kd_steps * batch_size * grad_accum_steps * world_size  # what stage 1 reads, at most
    selected_ids = salt.select_top(scores, salt.selection_size(len(scores), select_fraction, stage1_sequences))
    if master:
        print(salt.selection_summary(scores, selected_ids))
val_set = evaluation.val_set(val_data, eval_batches * batch_size)  # the same sequences every time
tasks = evaluation.read_tasks(eval_tasks, eval_fewshot_files) if eval_tasks else []
text_tokenizer = tokenizer.of_data(data_dir) if tasks else None  # the tasks' text into the data's tokens


# what each step does and when stage 1 ends (salt.Schedule); a baseline, with no teacher, is in stage 2 throughout
schedule = salt.Schedule(kd_steps if teacher_ckpt else 0, kd_weight, kd_schedule, kd_end)


def make_loader(step):
    """What the run reads from `step` on, all of it said here. The baseline and SALT read every sequence in one
    order from the first step to the last: SALT changes the loss only, so at every step it reads the baseline's
    batch (the same seed's). SALT_DS's stage 1 reads the selected sequences, in an order of their own; its stage 2
    goes on with the baseline's order, leaving out of the epoch in progress what stage 1 read, so that one pass
    reads every sequence of the pool once (later epochs: the whole pool)."""
    def loader(part, **reads):
        return BatchLoader(train_data, batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
                           accumulation=grad_accum_steps, stream=f'{role}/{part}', **reads)
    if selected_ids is None:
        return loader('pool')
    stage1 = loader('selection', ids=selected_ids)
    return stage1 if schedule.at(step).selection else loader('pool', skip=stage1.read_ids(schedule.end))


# ----------------------------------------------------------------------------------------------------------
# model and teacher: from out_dir's checkpoint if there is one. Under ddp the student is built whole on every rank
# (the same init from the same seed). Under fsdp no rank ever holds it whole: it is built on the meta device
# (shapes only) and sharded, then each rank makes its shards and draws them (GPT.init_weights: the whole build's
# weights, bit for bit) or, resuming, has checkpoint_manager.restore load them
data_fingerprint = f"{train_fingerprint}/{val_data.fingerprint()}"
fingerprints = checkpoint_manager.fingerprints(data_fingerprint, selected_ids, teacher_identity)  # by content
pretrained = init_from in GPT2_NAMES and not checkpoint  # OpenAI's weights: loaded whole, even under fsdp (1.5B)
if pretrained and not tokenizer.same_vocabulary(data_tokenizer, tokenizer.GPT2_RECORD):
    raise InputError(f"init_from={init_from!r} has GPT-2's vocabulary, but {data_dir} was made with tokenizer "
                     f"{tokenizer.describe(data_tokenizer)}")
if checkpoint:
    checkpoint_manager.check_resumable(checkpoint, config, fingerprints, world_size, branch=branching)
    checkpoint_manager.check_learning_rates(checkpoint, config, salt.lr_at, branch=branching)
    model_config = GPTConfig(**checkpoint['model_args'])
elif init_from == 'resume':
    raise InputError(f"init_from=resume but {out_dir} holds no checkpoint")
elif not pretrained:
    model_config = configurator.student_config(config, vocab_size=train_data.vocab_size)
if pretrained:
    model = GPT.from_pretrained(init_from).to(device)
else:  # fsdp: shapes only, for now; ddp and one process: built on the device, its weights drawn on the CPU
    model = GPT(model_config, device='meta' if parallelism == 'fsdp' else device)
model_config = model.config
model.activation_checkpointing = activation_checkpointing
raw_model = model  # the GPT itself (under fsdp, sharded in place): weights, checkpoints, evaluation
bf16 = device_type == 'cuda' and dtype == 'bfloat16'  # fsdp's compute dtype (gradients reduced in fp32)
if parallelism == 'fsdp':
    fsdp_shard(model, bf16)
    if not pretrained:
        model.to_empty(device=device)  # this rank's shards, undefined until drawn or loaded
        if not checkpoint:
            model.init_weights()

# ----------------------------------------------------------------------------------------------------------
# optimizer: AdamW, weight decay on matrices only (not on biases and LayerNorm gains)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(
    [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
     {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
    lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
if checkpoint:  # one that does not load, though it passed its checks, gives way to the previous one
    ckpt_path, checkpoint = checkpoint_manager.restore(os.path.dirname(ckpt_path), ckpt_path, checkpoint, raw_model,
                                                       optimizer)
    schedule.load_state_dict(checkpoint.get('schedule', schedule.state_dict()))  # (older checkpoints: kd_steps')
    if master:
        print(f"resuming from {ckpt_path} at step {checkpoint['step']}")
step = checkpoint['step'] if checkpoint else 0
run_id = checkpoint['run_id'] if checkpoint and not branching else uuid.uuid4().hex[:12]  # a branch: a run of its own
last_good = f"{ckpt_path} (step {step})" if checkpoint else None  # for the message if the loss goes non-finite
nonfinite_skipped = checkpoint['nonfinite_skipped'] if checkpoint else 0
# a resumed run's wall-clock goes on, and a branch's counts its parent's up to the branch point
elapsed_before = checkpoint.get('elapsed_s', 0.0) if checkpoint else 0.0

teacher = None
if schedule.at(step).teacher:  # frozen, in the compute dtype: no fp32 master copy of its weights (half the memory)
    teacher = salt.load_teacher(teacher_ckpt, device, data_tokenizer, block_size,
                                dtype=None if dtype == 'float32' else getattr(torch, dtype))
    teacher_flops = teacher.forward_flops_per_token(block_size)  # for mfu_with_teacher
    if schedule.needs_teacher_val_ce(step):  # kd_end='teacher': its val CE on the student's val set, measured once
        schedule.teacher_val_ce = evaluation.val_loss(teacher, val_data, val_set, batch_size=batch_size, rank=rank,
                                                    world_size=world_size, autocast=autocast)['val_loss']
        teacher.eval()  # val_loss leaves a model in train mode
        if master:
            print(f"the teacher's val CE: {schedule.teacher_val_ce:.4f} (stage 1 ends when the student's is as low, "
                  f"by step {kd_steps} at the latest)")
# what this run should need per device, under ddp and fsdp (an estimate: memory.py), beside the peak in the metrics
plan = memory_plan(model_config, teacher, tokens=batch_size * block_size, world_size=world_size,
                   compute_bytes=2 if dtype == 'bfloat16' else 4, checkpointing=activation_checkpointing,
                   shard_teacher=shard_teacher, device_type=device_type, grad_accum_steps=grad_accum_steps)
if master:
    print(memory_table(plan, world_size, torch.cuda.get_device_properties(device).total_memory
                       if device_type == 'cuda' else None, at_start=start_memory(model_config, world_size)))
if teacher is not None and shard_teacher:  # (fsdp only) the root stays whole: its head feeds the student's loss
    fsdp_shard(teacher, bf16, blocks_only=True)
# the weights were drawn alike on every rank; from here on each rank draws its own dropout masks (a resumed
# run then takes each rank's RNG state from the checkpoint)
torch.manual_seed(seed + rank)
upcoming = schedule.at(step)  # the stage of the next step, which the loop asks the schedule after each step
loader = make_loader(step)
if checkpoint:
    checkpoint_manager.restore_progress(checkpoint, loader)
    checkpoint = None  # free the memory
autocast_dtype = None if dtype == 'float32' else getattr(torch, dtype)
# checked on this device in this dtype, before anything is compiled (TF32, set above, does not change the choice)
loss_choice = losses.choice(device, kd_loss, kd_token_weight, autocast_dtype)
if master:
    print(loss_choice)
compile_choice = None  # what torch.compile does to the loss, decided once here and logged
if compile:
    compile_choice = "salt_loss runs uncompiled, after the compiled blocks" if compile_scope == 'blocks' else \
        losses.compile_loss_or_not(device, kd_loss, autocast_dtype, kd_token_weight=kd_token_weight)
    if master:
        print(f"torch.compile per {'block' if compile_scope == 'blocks' else 'model'}: {compile_choice}")
    model = compiled(model, compile_scope)
    if teacher is not None:
        teacher = compiled(teacher, compile_scope)
if distributed and parallelism == 'ddp':
    # gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy beside them
    model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None,
                gradient_as_bucket_view=True)


def loss_on(x, y, current, kd_weight_now):
    """(loss, ce, kd) of the student on one micro-batch at stage `current`, whose w is kd_weight_now (on the
    device). In stage 1 the teacher's final hidden states and LM head go into the student's forward, which
    computes the loss."""
    with autocast:
        teacher_output = {}
        if current.teacher:
            with torch.no_grad():
                teacher_output = dict(teacher_hidden=teacher(x, return_hidden=True),
                                      teacher_weight=teacher.lm_head.weight)
        return model(x, y, **teacher_output, kd_weight=kd_weight_now, temperature=teacher_temperature,
                     kd_loss=kd_loss, kd_token_weight=kd_token_weight)


def gradient_sync(on):
    """Gradients are averaged across ranks on a step's last micro-batch only."""
    if parallelism == 'fsdp':
        raw_model.set_requires_gradient_sync(on)
    return model.no_sync() if distributed and parallelism == 'ddp' and not on else nullcontext()


def evaluate():
    """The metrics of an evaluation: val loss, overall and per data subset, the two in-context learning scores
    (evaluation.py), and the few-shot tasks' scores."""
    ranks = dict(batch_size=batch_size, rank=rank, world_size=world_size, autocast=autocast)
    with nullcontext() if eval_compiled else torch.compiler.set_stance('force_eager'):
        record = evaluation.val_loss(raw_model, val_data, val_set, **ranks)
        # every rank the same sequences (under fsdp each takes part in every forward)
        record.update(evaluation.induction_losses(raw_model, model_config.vocab_size, batch_size=batch_size,
                                                  autocast=autocast))
        results = evaluation.evaluate_tasks(raw_model, tasks, text_tokenizer, shots=eval_shots, **ranks) if tasks else {}
    return dict(record, **{f"{task}/{metric}": value for task, scores in results.items()
                           for metric, value in scores.items()
                           if metric not in ('chance', 'examples', 'truncated')})


tokenizer_files = os.path.join(data_dir, 'tokenizer') if data_tokenizer['kind'] == 'transformers' else None


def save_checkpoint():
    """Every rank writes its part; meta.pt holds what it takes to go on exactly, and the data's tokenizer files go
    beside them (tokenizer.py). Returns its name."""
    return checkpoint_manager.save(
        out_dir, raw_model, optimizer, master, distributed, model_args=model_args(model_config), step=step,
        schedule=schedule.state_dict(),
        run_id=run_id, world_size=world_size, loader=loader.state_dict(), config=config,
        nonfinite_skipped=nonfinite_skipped, tokenizer=data_tokenizer, inputs=fingerprints,
        elapsed_s=elapsed_before + time.time() - t_start, files_from=tokenizer_files)


# ----------------------------------------------------------------------------------------------------------
# logging: metrics.jsonl opens with the config, the code version and the device
if master:
    val_ids, val_subsets, subset_names = val_set
    val_tokens = np.bincount(val_subsets, minlength=len(subset_names)) * block_size
    metrics = checkpoint_manager.Metrics(out_dir, step, dict(
        type='header', run_id=run_id, resumed_at=step, config=config, git_commit=git_commit(),
        data_order=ORDER_VERSION,
        device=torch.cuda.get_device_name() if device_type == 'cuda' else 'cpu', torch=torch.__version__,
        world_size=world_size, n_params=raw_model.num_params(), model_args=model_args(model_config),
        time=time.strftime('%Y-%m-%d %H:%M:%S'),
        compile_choice=compile_choice, loss_impl=loss_choice, teacher_val_ce=schedule.teacher_val_ce,
        memory_plan=dict(zip(('ddp', 'fsdp'), plan['total'])),
        val_tokens=int(len(val_ids) * block_size),
        val_tokens_subsets={name: int(n) for name, n in zip(subset_names, val_tokens) if n}),
        wandb_project=wandb_project if wandb_log else '',
        history=os.path.join(os.path.dirname(ckpt_path), 'metrics.jsonl') if branching else None)
    print(f"model {model_size}: {raw_model.num_params() / 1e6:.2f}M parameters (without position embeddings); "
          f"{'SALT_DS' if score_file else 'SALT' if teacher_ckpt else 'baseline'} run, steps {step}..{max_steps}")


def throughput(tokens_per_s, current):
    """tokens/s, and MFU on CUDA: the student's training FLOPs alone ('mfu', what the run gets done), and with
    the teacher's forward in stage 1 ('mfu_with_teacher', how busy the GPUs are), over the trained length."""
    record = dict(tokens_per_s=tokens_per_s)
    if device_type == 'cuda':
        peak = peak_flops * world_size
        record['mfu'] = model_config.flops_per_token(block_size) * tokens_per_s / peak
        if current.teacher:
            record['mfu_with_teacher'] = record['mfu'] + teacher_flops * tokens_per_s / peak
    return record


# ----------------------------------------------------------------------------------------------------------
# the loop
t_start, step_at_start = time.time(), step
ids_log = open(os.path.join(out_dir, f'ids_rank{rank}.jsonl'), 'a', buffering=1) if log_ids else None
kept_steps = configurator.branch_steps(config)  # the checkpoints kept for branches, besides every ckpt_interval
if step == 0:
    first_eval = evaluate()  # every rank takes part in the all-reduces
    if master:
        metrics.log(dict(step=0, **first_eval))
# tokens/s leaves out evaluation and checkpoint time, and the first step of this process and of stage 2:
# torch.compile compiles (again) there
t_last, step_at_last, not_training_s, warming_up = time.time(), step, 0.0, True
unchecked = []  # (step, [non-finite, loss, gradient norm]) on the device, read at the next log or checkpoint
compile_s = None  # with compile: the seconds of that first step, compilation included, until logged
while step < max_steps:
    current = upcoming
    t_step = time.time()
    lr = salt.lr_at(step, config)
    for group in optimizer.param_groups:
        group['lr'] = lr
    step_losses = torch.zeros(3, device=device)  # the step's loss and its CE and KD terms, over its micro-batches
    step_ids = []  # the sequences it reads, for log_ids
    # w as a tensor: a float that changes by the step (kd_schedule='linear') would recompile a compiled model;
    # filled on the device (torch.tensor(w, device=...) would be a blocking copy, the CPU waiting for the GPU)
    kd_weight_now = torch.full((), current.kd_weight, device=device)
    for micro in range(grad_accum_steps):
        x, y = loader.next_batch()
        if ids_log:
            step_ids += loader.last_ids.tolist()
        with gradient_sync(micro == grad_accum_steps - 1):
            loss, ce, kd = loss_on(x, y, current, kd_weight_now)
            (loss / grad_accum_steps).backward()
        step_losses += torch.stack([loss.detach(), ce, kd]) / grad_accum_steps
    # clip_grad_norm_ also gives the norm for the check below (max_norm=inf: measure, don't clip)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # fsdp: the global norm
    if distributed:
        dist.all_reduce(step_losses, op=dist.ReduceOp.AVG)  # every rank takes the same decision below
    # a non-finite loss or gradient norm drops the step's update on the device, without a host sync; the host
    # reads which steps did, and counts them, where it waits for the device anyway (checkpoint_manager.nonfinite)
    nonfinite = (~torch.isfinite(torch.stack([step_losses[0], grad_norm]))).any().float()
    unchecked.append((step + 1, torch.stack([nonfinite, step_losses[0].float(), grad_norm.float()])))
    checkpoint_manager.step_unless(optimizer, nonfinite)
    optimizer.zero_grad(set_to_none=True)
    step += 1
    if ids_log:  # a resumed run writes its steps after the checkpoint again: the last line of a step is the one
        ids_log.write(json.dumps(dict(step=step, ids=step_ids)) + '\n')
    if warming_up:
        compile_s = time.time() - t_step if compile else None
        t_last, step_at_last, not_training_s, warming_up = time.time(), step, 0.0, False

    do_eval = step % eval_interval == 0 or step == max_steps
    kept = step in kept_steps
    saving = kept or ckpt_interval and (step % ckpt_interval == 0 or step == max_steps)
    if step % log_interval == 0 or do_eval or saving:  # before a checkpoint: last_good is good
        nonfinite_skipped = checkpoint_manager.nonfinite(unchecked, nonfinite_skipped, skip_nonfinite, last_good,
                                                         master)
    t_eval = time.time()
    evaluated = evaluate() if do_eval else {}
    not_training_s += time.time() - t_eval
    if evaluated and schedule.evaluated(step, evaluated['val_loss']) and master:
        print(f"step {step}: the student's val CE {evaluated['val_loss']:.4f} is at or below the teacher's "
              f"{schedule.teacher_val_ce:.4f}: stage 1 ends here (kd_end='teacher')")
    upcoming = schedule.at(step)  # the one place the loop asks what comes next
    if teacher is not None and not upcoming.teacher:  # stage 2: the teacher's memory goes back
        teacher, warming_up = None, True
        gc.collect()  # compiled blocks and FSDP's hooks hold it in reference cycles: gone only once collected
        if device_type == 'cuda':
            torch.cuda.empty_cache()
    if selected_ids is not None and upcoming.selection != current.selection:  # SALT_DS's stage 2: make_loader
        loader = make_loader(step)
    if master and (step % log_interval == 0 or do_eval):
        now = time.time()
        loss_v, ce_v, kd_v = step_losses.tolist()
        record = dict(step=step, loss=loss_v, ce=ce_v, kd=kd_v, kd_weight=current.kd_weight, lr=lr,
                      grad_norm=grad_norm.item(), elapsed_s=elapsed_before + now - t_start)
        if step > step_at_last:  # else this interval was all warm-up
            tokens_per_s = (step - step_at_last) * tokens_per_step / (now - t_last - not_training_s)
            record.update(throughput(tokens_per_s, current))
            t_last, step_at_last, not_training_s = now, step, 0.0
        if device_type == 'cuda':  # against the plan's total in the header
            record['peak_memory'] = torch.cuda.max_memory_allocated(device)
        if compile:  # a run that recompiles shows it here: more graphs than the stages' few, slow steps
            record['compiled_graphs'] = torch._dynamo.utils.counters['stats']['unique_graphs']
            record['graph_breaks'] = sum(torch._dynamo.utils.counters['graph_break'].values())
            if compile_s is not None:
                record['compile_s'], compile_s = compile_s, None
        metrics.log(dict(record, **evaluated))
        eta = (max_steps - step) * (now - t_start) / (step - step_at_start)
        print(f"step {step}/{max_steps} | loss {loss_v:.4f} (ce {ce_v:.4f} kd {kd_v:.4f} w "
              f"{current.kd_weight:.3f}) | lr {lr:.2e}" +
              (f" | {record['tokens_per_s']:,.0f} tok/s" if 'tokens_per_s' in record else '') +
              (f" | mfu {record['mfu']:.1%}" if 'mfu' in record else '') +
              (f" | val {evaluated['val_loss']:.4f}" if evaluated else '') + f" | eta {eta / 60:.1f} min",
              flush=True)
    if saving:
        t_save = time.time()
        last_good = save_checkpoint()  # every rank writes its part
        if kept and master:
            checkpoint_manager.keep(out_dir, step)
        not_training_s += time.time() - t_save

if master:
    metrics.close()
end_job(distributed)
