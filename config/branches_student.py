# The branches study's student (docs/cpu_studies.md, "The branches design"): a Llama-style 4x192 (2.4M parameters
# in a 4,096-token BPE trained on the corpus, 2/3 of them in the blocks), one pass over its pool of 19,200
# sequences of 128 tokens (2.5M tokens), warmup-stable-decay so that one run and a short decay per fraction give
# every shorter budget (train.py's branch_steps and branch_from). Sized from the measured tokens/s (the docs).
out_dir = 'out/branches/baseline'
data_dir = 'data/stdlib_bpe4096'
model_size = 'llama-demo-student'
n_embd = 192
block_size = 128
batch_size = 16
max_steps = 1200
train_sequences = 19200    # max_steps x batch_size: each sequence seen once
learning_rate = 2e-3
min_lr = 2e-4
warmup_steps = 50
lr_schedule = 'wsd'
decay_fraction = 0.2
kd_steps = 200             # 17% of the steps, the paper's share (36K of ~208K); SALT_DS selects the top 3,200
kd_weight = 0.667
teacher_temperature = 1.0
eval_interval = 60
eval_batches = 16
ckpt_interval = 600
