# The embedded demo's student: a 4-layer, 128-wide GPT, about twice the SLM's parameters.
# As is, the baseline; experiment.py adds --teacher_ckpt (SALT) and --score_file (SALT_DS).
out_dir = 'out/demo/baseline'
data_dir = 'data/stdlib'
train_sequences = 8192
block_size = 64
batch_size = 8
model_size = 'demo-student'
max_steps = 600
learning_rate = 1e-3
min_lr = 1e-4
warmup_steps = 20
# SALT: the values our CPU ablation study chose (README, "Choosing the defaults"; the paper's suggestions,
# w = 0.667, tau = 1, 17% of the steps, half the data, were its centre point)
kd_steps = 180               # stage 1: the first 30% of the steps (the paper: 36K of ~208K, 17%)
kd_weight = 0.9
teacher_temperature = 0.25
select_fraction = 0.25       # SALT_DS: stage 1 on the SLM's top quarter of the pool
eval_interval = 30         # 20 evaluations: enough to read off "steps to reach the baseline's loss"
eval_batches = 16
ckpt_interval = 600
