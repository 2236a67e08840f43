#!/usr/bin/env bash
# SALT at a GPU scale, on one GPU, in one command: tokenize the machine's own Python installation (its stdlib and
# every installed package's .py/.md/.rst/.txt files), train the 30M SLM, score the pool with it, train the 64M
# student as the baseline, SALT and SALT_DS, and SALT and SALT_DS again on 70% of the steps, then write
# results/gpu/table.md, val_loss.png and the selection report. About 7 minutes on one H100 (config/gpu_*.py say
# how that was sized); run in the repository or any folder (out/, data/ and results/ go there).
#
#   bash gpu_experiment.sh                               # the study, seed 1337
#   bash gpu_experiment.sh --ablate top_k=10,100         # then SALT_DS with the SLM's top-100: trains only what is new
#   GPU_CHECK_TINY=1 NAME=toy bash gpu_experiment.sh     # every step at toy sizes on a small tree, on a CPU (a test)
#
# Arguments go to experiment.py. On a machine without network, TIKTOKEN_CACHE_DIR names a folder with the GPT-2
# BPE file; nothing is installed.
set -euo pipefail
here=$(dirname "$(realpath "$0")")
name=${NAME:-gpu}
data=data/python
block_size=512
tree="tree --python --include *.py *.md *.rst *.txt"
slm_sizes=()
student_sizes=()
if [ -n "${GPU_CHECK_TINY:-}" ]; then
    data=out/$name/data
    block_size=32
    stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    tree="tree $stdlib/json $stdlib/email --include *.py --val_fraction 0.2"
    tiny=(data_dir=$data block_size=$block_size batch_size=4 train_sequences=256 warmup_steps=2 eval_batches=2)
    slm_sizes=(--slm_set "${tiny[@]}" model_size=demo-slm max_steps=6 eval_interval=3)
    student_sizes=(--set "${tiny[@]}" model_size=demo-student max_steps=10 kd_steps=2 eval_interval=2)
fi
python3 "$here/experiment.py" --name "$name" --slm_config "$here/config/gpu_slm.py" \
    --student_config "$here/config/gpu_student.py" --seeds 1337 --tokenize "$tree" \
    "${slm_sizes[@]}" "${student_sizes[@]}" "$@"
python3 "$here/salt.py" report --scores "out/$name/scores_top10.npy" --data_dir "$data" --block_size $block_size \
    --select_fraction 0.25 --out_dir "results/$name/selection" > /dev/null
echo "wrote results/$name/selection/selection.md"
