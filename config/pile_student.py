# The paper's student: a ~2.8B GPT on the Pile, ~208K steps (the paper's KD stage: the first 36K).
#   baseline: torchrun --standalone --nproc_per_node=8 train.py config/pile_student.py
#   SALT:     ... train.py config/pile_student.py --teacher_ckpt=out/pile/slm/ckpt --out_dir=out/pile/salt
#   SALT_DS:  torchrun --standalone --nproc_per_node=8 salt.py score --ckpt out/pile/slm/ckpt \
#                 --data_dir data/pile --block_size 2048 --out out/pile/scores.npy
#             ... train.py config/pile_student.py --teacher_ckpt=out/pile/slm/ckpt \
#                 --score_file=out/pile/scores.npy --out_dir=out/pile/salt_ds
# kd_weight and teacher_temperature are the paper's suggestions (it does not confirm them). SALT_DS selects the top
# 36K x 512 = 18.4M sequences by score, what stage 1 reads, each once (train.py's select_fraction = 0).
# Memory (python memory.py --student salt-2.8b --teacher gpt2-xl --batch_size 8 --block_size 2048 --world_size 8
# --grad_accum_steps 8): under ddp each GPU would hold the whole student, its gradients and AdamW's moments, ~71 GiB
# per 80 GB GPU at batch_size 4 with the teacher; fsdp shards them 8 ways: ~65 GiB at batch_size 8, half the
# accumulation steps, 9.9 GiB of it the gradients FSDP keeps whole in fp32 between micro-batches (docs/training.md).
out_dir = 'out/pile/baseline'
data_dir = 'data/pile'
model_size = 'salt-2.8b'
block_size = 2048
parallelism = 'fsdp'
batch_size = 8               # per GPU; 8 GPUs x 8 x 2048 x grad_accum 8 = 1M tokens per step
grad_accum_steps = 8
max_steps = 208_000
learning_rate = 1.6e-4
min_lr = 1.6e-5
warmup_steps = 2000
kd_steps = 36_000
kd_weight = 0.667
teacher_temperature = 1.0
eval_interval = 1000
eval_batches = 50
ckpt_interval = 1000
compile = True
