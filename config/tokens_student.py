# The tokens study's student (docs/cpu_studies.md, "The tokens design"): a Llama-style 4x64, 263K parameters in a
# 1,024-token BPE trained on the corpus (75% of them in the blocks), warmup-stable-decay. `experiment.py --design
# tokens` trains it at several budgets of tokens per parameter: each budget takes the steps, pool, KD stage, warmup
# and evaluations below in proportion (experiment.budget_settings); as written here, the 16-token budget.
out_dir = 'out/tokens/baseline'
data_dir = 'data/stdlib_bpe1024'
model_size = 'llama-demo-student'
n_embd = 64
block_size = 128
batch_size = 16
max_steps = 2052           # 16 tokens a parameter: 4.2M tokens
train_sequences = 32832    # max_steps x batch_size: each sequence seen once
learning_rate = 2e-3
min_lr = 2e-4
warmup_steps = 82          # 4% of the steps
lr_schedule = 'wsd'
decay_fraction = 0.2
kd_steps = 349             # 17% of the steps, the paper's share (36K of ~208K)
kd_weight = 0.667
teacher_temperature = 1.0
eval_interval = 128        # 16 evaluations a run
eval_batches = 16
ckpt_interval = 2052
