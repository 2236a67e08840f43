# The CPU demo's student in the llama family: model.PRESETS['llama-demo-student'] (rotary positions, RMSNorm, a
# SwiGLU MLP, no biases, 2 key/value heads for 4 query heads, tied embeddings as this family's small models have),
# as wide and deep as demo-student and as large in its blocks; all else config/demo_student.py's.
#   python experiment.py --design demo --name demo_llama --student_config config/demo_student_llama.py
from config.demo_student import *  # noqa: F401,F403
model_size = 'llama-demo-student'
