# SALT at a GPU scale, on one GPU: the student. bash gpu_experiment.sh runs it all (docs/gpu.md, "SALT on one GPU").
# A 64M-parameter GPT, 59% of it in the transformer blocks, taught by config/gpu_slm.py's 30M SLM, on the text
# of the machine's own Python installation (its stdlib and every installed package's .py/.md/.rst/.txt).
# The most steps the study takes: gpu_experiment.sh fits it to its 420 s with 30% slack at the rate gpu_check.sh
# measured (experiment.study_seconds, docs/gpu.md), with fewer steps (kd_steps, eval_interval, ckpt_interval and
# the SLM's steps in proportion) where it would not fit. Warmup-stable-decay, so that each run and a short decay
# branched from it at 50% and 70% of the steps give the three budgets (experiment.py --fractions). Not measured
# yet: at an assumed 15% MFU (420 MFLOP a token, 360K tokens/s, a KD step 1.15x a plain one) the three runs of
# these sizes, their six decays, the SLM, scoring, evaluations and start-up come to ~392 s by that formula: 319
# steps fit with the slack.
out_dir = 'out/gpu/baseline'
data_dir = 'data/python'     # python prepare.py tree --python --include '*.py' '*.md' '*.rst' '*.txt' --out_dir data/python
train_sequences = 65536      # the pool: 33.5M tokens, which the SLM scores; a run reads half of it
block_size = 512
batch_size = 64              # 32K tokens a step
model_size = 'gpu-student'
max_steps = 500
learning_rate = 1.5e-3
min_lr = 1.5e-4
warmup_steps = 50
lr_schedule = 'wsd'
decay_fraction = 0.2         # the last 20% of a run's steps (of a branch's too) decay to min_lr
# SALT: the paper's w and tau, KD for 17% of the steps (36K of ~208K); SALT_DS selects what stage 1 reads
kd_steps = 85
kd_weight = 0.667
teacher_temperature = 1.0
# 21 evaluations (4% of the run apart) of 512 val sequences spread over the val split: 262K tokens, 32x the CPU
# demo's, so that "steps to the baseline's final val loss" is not the val set's noise (the report says how fine)
eval_interval = 25
eval_batches = 8
ckpt_interval = 500
compile = False              # runs of under a minute: torch.compile's warm-up would cost about what it saves
