# SALT at a GPU scale, on one GPU: the small LM (SLM), teacher and scorer for config/gpu_student.py. A 30M GPT,
# about half its student's parameters, trained on the same pool for as many steps (gpu_experiment.sh scales both
# to fit its time): 16.4M tokens, ~20 s on an H100 at an assumed 15% MFU (194 MFLOP a token; not measured yet).
out_dir = 'out/gpu/slm'
role = 'slm'               # its data order: a stream of its own, independent of every student's
data_dir = 'data/python'
train_sequences = 65536
block_size = 512
batch_size = 64
model_size = 'gpu-slm'
max_steps = 500
learning_rate = 2e-3
min_lr = 2e-4
warmup_steps = 50
eval_interval = 100
eval_batches = 8
ckpt_interval = 500
compile = False
