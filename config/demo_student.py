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
# SALT: the paper's w and tau, KD for the first 20% of the steps (the paper: 36K of ~208K, 17%); SALT_DS selects the
# SLM's top 960 sequences, what stage 1 reads (train.py's select_fraction = 0)
kd_steps = 120
kd_weight = 0.667
teacher_temperature = 1.0
eval_interval = 30         # 20 evaluations: enough to read off "steps to reach the baseline's loss"
eval_batches = 16
ckpt_interval = 600
