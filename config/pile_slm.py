# The paper's teacher: a ~1.5B GPT (gpt2-xl shape) on the Pile. 8 GPUs:
#   python prepare.py pile /path/to/pile/train/*.jsonl.zst --out_dir data/pile
#   torchrun --standalone --nproc_per_node=8 train.py config/pile_slm.py
# Alternatively a pretrained GPT-2 XL can be the SLM: teacher_ckpt='gpt2-xl' in the student config
# (needs `pip install transformers` and the hub).
# Batch and schedule are ours, not the paper's (it does not publish them all): tune before trusting them.
out_dir = 'out/pile/slm'
role = 'slm'               # its data order: a stream of its own, independent of every student's
data_dir = 'data/pile'
# Memory (python memory.py --student gpt2-xl --batch_size 4 --block_size 2048): ~50 GiB per GPU under ddp
model_size = 'gpt2-xl'
block_size = 2048
batch_size = 4               # per GPU; 8 GPUs x 4 x 2048 x grad_accum 16 = 1M tokens per step
grad_accum_steps = 16
max_steps = 100_000
learning_rate = 2e-4
min_lr = 2e-5
warmup_steps = 2000
eval_interval = 1000
eval_batches = 50
ckpt_interval = 1000
compile = True
