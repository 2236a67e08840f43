#!/usr/bin/env bash
# SALT at a GPU scale, on one GPU, in one command of at most 9 minutes: tokenize 100 MB of the machine's own
# Python installation (its stdlib and installed packages' .py/.md/.rst/.txt files, in the tree's fixed order),
# train the 30M SLM, score the pool with it, train the 64M student as the baseline, SALT and SALT_DS (warmup-stable-
# decay), each with a short decay branched at 50% and 70% of its steps (experiment.py --fractions: the three budgets
# from one run), then write the report (config/gpu_*.py say how that was sized).
#
#   bash gpu_experiment.sh OUT                            # in the checkout with gpu_check.sh --prepare's .cache/
#   bash gpu_experiment.sh OUT --ablate top_k=10,100      # then SALT_DS with the SLM's top-100: trains only what is new
#   GPU_CHECK_TINY=1 bash gpu_experiment.sh OUT           # every step at toy sizes on a small tree, on a CPU (a test)
#
# Arguments after OUT go to experiment.py. The runs live in WORK (default: out/gpu_experiment; rerun with the same
# WORK, the study continues where it stopped); OUT receives at most 8 files: table.md, val_loss.png, fractions.png,
# selection.md, score_histogram.png and runs.tar.gz (every run's and branch's metrics.jsonl, the SLM's scores'
# metadata and the log).
# Each step has a time limit (tokenize 90 s, the study 420 s, the selection report 30 s). The study fits its limit
# with 30% slack at the rate gpu_check.sh measured (RATE_FILE, default results/gpu_check/experiment_steps.jsonl
# beside this script: fewer steps where the configs' would not fit, the branches counted); without it, the
# configs' size. table.md is rewritten after every run and when the limit stops the study; the selection report
# runs whenever the scores exist. On a machine without network the GPT-2 BPE file comes from .cache/tiktoken
# (gpu_check.sh --prepare), or TIKTOKEN_CACHE_DIR; nothing is installed.
set -uo pipefail
here=$(dirname "$(realpath "$0")")
out=$(realpath -m "${1:-results/gpu}")
shift $(($# > 0 ? 1 : 0))
work=$(realpath -m "${WORK:-out/gpu_experiment}")
mkdir -p "$out" "$work"
[ -d "$here/.cache/tiktoken" ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$here/.cache/tiktoken}
export PYTHONUNBUFFERED=1 SALT_GIT_COMMIT=${SALT_GIT_COMMIT:-$(git -C "$here" rev-parse HEAD 2>/dev/null ||
    cat "$here/.cache/git_commit" 2>/dev/null || echo unknown)}  # .cache/git_commit: gpu_check.sh --prepare's
name=gpu
data=$work/data/python
block_size=512
tree=(tree --python --include '*.py' '*.md' '*.rst' '*.txt' --max_bytes 100000000)  # ~44M tokens: the pool is 33.5M
limits=(90 420 30)
fractions=0.5,0.7,1.0
sizes=()
if [ -n "${GPU_CHECK_TINY:-}" ]; then
    block_size=32
    stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    tree=(tree "$stdlib/json" "$stdlib/email" --include '*.py' --val_fraction 0.2 --max_bytes 400000)
    limits=(60 500 30)
    fractions=0.6,1.0
    tiny=(data_dir=$data block_size=$block_size batch_size=4 train_sequences=256 warmup_steps=2 eval_batches=2)
    sizes=(--slm_set "${tiny[@]}" model_size=demo-slm max_steps=6 eval_interval=3
           --set "${tiny[@]}" model_size=demo-student max_steps=10 kd_steps=2 eval_interval=2)
else
    sizes=(--slm_set data_dir=$data --set data_dir=$data)
    rate=${RATE_FILE:-$here/results/gpu_check/experiment_steps.jsonl}
    if [ -f "$rate" ]; then
        sizes+=(--fit "${limits[1]}" --rate_file "$rate")
    else
        echo "no measured rate in $rate: the configs' size, sized at an assumed MFU (docs/gpu.md)"
    fi
fi

limited() {  # limited SECONDS COMMAND...: the command within its time limit, its output in the study's log too
    echo "\$ $*" | tee -a "$work/gpu_experiment.log"
    timeout -k 10 "$@" 2>&1 | tee -a "$work/gpu_experiment.log"
}

status=0
[ -f "$data/meta.json" ] || limited "${limits[0]}" python3 "$here/prepare.py" "${tree[@]}" --out_dir "$data" || status=$?
if [ $status = 0 ]; then
    (cd "$work" && limited "${limits[1]}" python3 "$here/experiment.py" --name $name --slm_config "$here/config/gpu_slm.py" \
        --student_config "$here/config/gpu_student.py" --seeds 1337 --corpus= --weak_slm_config= --jobs 1 \
        --no-selection_only \
        --fractions $fractions "${sizes[@]}" "$@") || status=$?
fi
if [ -f "$work/out/$name/seed1337/salt_ds/metrics.jsonl" ]; then  # also after a failure or a later run's time limit
    # the selection SALT_DS trained on, as its run's header records it (kd_steps x the global batch)
    selected=$(cd "$work" && python3 -c "import sys; sys.path.insert(0, '$here'); import experiment
print(len(experiment.selection_of(experiment.header_of('out/$name/seed1337/salt_ds'))[1]))")
    limited "${limits[2]}" python3 "$here/salt.py" report --scores "$work/out/$name/scores_top10.npy" --data_dir "$data" \
        --block_size $block_size --kd_sequences "$selected" --out_dir "$work/results/$name/selection" > /dev/null ||
        status=$((status ? status : $?))
fi
# whatever finished comes back, also after a failure or a time limit
for file in "$work/results/$name"/{table.md,val_loss.png,fractions.png} "$work/results/$name"/selection/{selection.md,score_histogram.png}; do
    [ -f "$file" ] && cp "$file" "$out/"
done
(cd "$work" && tar -czf "$out/runs.tar.gz" --exclude='ckpt*' --exclude='*.npy' gpu_experiment.log \
    $(cd "$work" && find out/$name data -name metrics.jsonl -o -name '*.json' 2>/dev/null | sort))
echo "exit status $status; wrote $(ls "$out" | tr '\n' ' ')in $out"
exit $status
