# The CPU ablation study's student: config/demo_student.py at half the steps (300 of 512 tokens each), to
# keep 2 seeds x 14 runs affordable on a CPU (about 55 minutes). Every ablated key is set here, to the paper's
# values: the run with these values is the study's main SALT / SALT_DS run, and each ablated value equal to
# it reuses that run. Results and the defaults they chose: docs/cpu_studies.md, "Choosing the defaults".
#   python experiment.py --design demo --name ablations --student_config config/ablate_student.py --seeds 1337 1338 \
#       --ablate kd_weight=0.5,0.667,0.9 --ablate teacher_temperature=0.25,1.0,2.0 \
#       --ablate kd_steps=30,51,90 --ablate kd_schedule=constant,linear \
#       --ablate top_k=1,10,100 --ablate select_fraction=0.25,0.5,0.75
out_dir = 'out/ablations/baseline'
data_dir = 'data/stdlib'
train_sequences = 8192
block_size = 64
batch_size = 8
model_size = 'demo-student'
max_steps = 300
learning_rate = 1e-3
min_lr = 1e-4
warmup_steps = 20
kd_steps = 51                # 17% of the steps, the paper's 36K of ~208K
kd_weight = 0.667
teacher_temperature = 1.0
kd_schedule = 'constant'
select_fraction = 0.5
eval_interval = 15
eval_batches = 16
ckpt_interval = 300
