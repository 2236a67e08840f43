# The branches study's SLMs: a Llama-style 3x128 (1.1M parameters, 0.46x the student) in the student's tokens.
# This file is the weak one, trained on the student's own 2.5M tokens (the student passes it within its run: SALT's
# regime); config/branches_slm_strong.py trains the same model on 3x as many, so that it stays ahead.
out_dir = 'out/branches/slm'
role = 'slm'               # its data order: a stream of its own, independent of every student's
data_dir = 'data/stdlib_bpe4096'
model_size = 'llama-demo-student'
n_layer = 3
n_embd = 128
block_size = 128
batch_size = 16
max_steps = 1200
train_sequences = 19200
learning_rate = 3e-3
min_lr = 3e-4
warmup_steps = 50
eval_interval = 200
eval_batches = 16
ckpt_interval = 1200
