# The paper's setting on the paper's data, as far as public models allow: Pythia-1.4B (deduped), a ~1.5B SLM that
# already exists and was trained on the Pile, teaches a 2.8B student the Pile in Pythia's tokenizer (GPT-NeoX-20B's
# BPE: 50,277 tokens). On a machine with network, once:
#   huggingface-cli download EleutherAI/pythia-1.4b-deduped --local-dir /models/pythia-1.4b-deduped
#   huggingface-cli download EleutherAI/pile-deduped-pythia-preshuffled --repo-type dataset --local-dir /data/pythia_pile
# then, 8 GPUs, on the Pile as Pythia-deduped was trained on it, read in place (no re-tokenizing: block_size 2048
# reads exactly its 2049-token sequences, in its order; the raw Pile's .jsonl.zst is `prepare.py pile` instead):
#   python prepare.py megatron /data/pythia_pile/document --tokenizer /models/pythia-1.4b-deduped \
#       --out_dir data/pile_neox
#   baseline: torchrun --standalone --nproc_per_node=8 train.py config/pile_pythia.py --teacher_ckpt= \
#                 --out_dir=out/pile_pythia/baseline
#   SALT:     torchrun --standalone --nproc_per_node=8 train.py config/pile_pythia.py
#   SALT_DS:  torchrun --standalone --nproc_per_node=8 salt.py score --ckpt /models/pythia-1.4b-deduped \
#                 --data_dir data/pile_neox --block_size 2048 --out out/pile_pythia/scores.npy
#             torchrun --standalone --nproc_per_node=8 train.py config/pile_pythia.py \
#                 --score_file=out/pile_pythia/scores.npy --out_dir=out/pile_pythia/salt_ds
# The student, its batch and schedule are config/pile_student.py's (KD for the paper's 36K of 208K steps).
# Memory (python memory.py --student salt-2.8b --vocab_size 50277 --teacher /models/pythia-1.4b-deduped
# --batch_size 8 --block_size 2048 --world_size 8 --grad_accum_steps 8): 64.9 GiB per 80 GB GPU under fsdp, of which
# the frozen teacher (1.41B parameters in bf16) is 2.6 GiB and the gradients kept whole between micro-batches 9.9;
# under ddp 93.5 GiB, which does not fit.
from config.pile_student import *  # noqa: F401,F403
out_dir = 'out/pile_pythia/salt'
data_dir = 'data/pile_neox'
teacher_ckpt = '/models/pythia-1.4b-deduped'
block_size = 2048            # Pythia's context: a longer block_size is refused (its max_position_embeddings)
