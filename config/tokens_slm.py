# The tokens study's SLM: a Llama-style 3x48, 126K parameters, 0.48x the student's (config/tokens_student.py), in the
# same BPE. `experiment.py --design tokens` trains it once, on as many tokens as the longest budget's student reads
# (its steps, warmup and evaluations in proportion), before any student; every budget's SALT runs learn from it.
out_dir = 'out/tokens/slm'
role = 'slm'               # its data order is its own, not a student's
data_dir = 'data/stdlib_bpe1024'
model_size = 'llama-demo-student'
n_layer = 3
n_embd = 48
block_size = 128
batch_size = 16
max_steps = 2052
train_sequences = 0        # the whole train split, in an order of its own, for as many steps as the design sets
learning_rate = 3e-3
min_lr = 3e-4
warmup_steps = 82
lr_schedule = 'cosine'
eval_interval = 256
eval_batches = 16
ckpt_interval = 2052
