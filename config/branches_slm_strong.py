# The branches study's strong SLM: config/branches_slm.py's model trained on 3x the student's tokens (7.4M, most of
# the 9.0M-token train split), so that its val loss stays below the student's through stage 1 and beyond.
from config.branches_slm import *  # noqa: F401,F403
out_dir = 'out/branches/slm_strong'
max_steps = 3600
train_sequences = 57600
ckpt_interval = 3600
