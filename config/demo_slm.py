# The embedded demo's small LM (SLM): a 2-layer, 64-wide GPT trained on the Python standard library.
# It serves as the SALT teacher and the SALT_DS scorer for config/demo_student.py. CPU: a few minutes.
out_dir = 'out/demo/slm'
role = 'slm'               # its data order: a stream of its own, independent of every student's
data_dir = 'data/stdlib'
train_sequences = 8192     # a 0.5M-token pool keeps scoring and training within the demo's CPU budget
block_size = 64
batch_size = 8
model_size = 'demo-slm'
max_steps = 600
learning_rate = 2e-3
min_lr = 2e-4
warmup_steps = 20
eval_interval = 100
eval_batches = 16
ckpt_interval = 600
