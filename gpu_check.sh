#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests, the fused loss against eager PyTorch, torch.compile and
# Liger-Kernel, and the speed (tokens/s, MFU) of train.py's steps, plain and in the KD stage. Every step's
# output goes to OUT/<step>.log, and the tables to OUT/summary.md, with the device and the versions.
#
#   bash gpu_check.sh results/gpu_check          # one GPU: at most 10 minutes (the steps' limits: 575 s)
#   GPU_CHECK_TINY=1 bash gpu_check.sh OUT       # every step at toy sizes, on a CPU (a test runs this)
#
# It installs nothing: the machine's own PyTorch and Triton are what it measures. On a machine without network,
# TIKTOKEN_CACHE_DIR names a folder with the GPT-2 BPE file, and WHEELS=DIR puts the wheels in DIR (e.g.
# liger-kernel's, for the comparison) on the path of this run only. A step that fails or runs out of its time
# is said so in the summary, and the next one runs.
set -uo pipefail
cd "$(dirname "$0")"
out=$(realpath -m "${1:-results/gpu_check}")
mkdir -p "$out"
summary=$out/summary.md
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --target "$out/site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -n "${GPU_CHECK_TINY:-}" ]; then
    grid=(--n 256 512 --h 64 --v 1000 --reps 1 --warmup 0)
    one_size=(--n 512 --h 64 --v 1000 --reps 1 --warmup 0)
    steps=(--pairs demo-student:demo-slm --block_size 64 --batch_size 4 --steps 8 --compile both
           --data_dir "$out/data" --work_dir "$out/runs")
    experiment_steps=(--pairs demo-student:demo-slm --block_size 32 --batch_size 4 --steps 6 --compile off
                      --data_dir "$out/data" --work_dir "$out/runs")
else
    grid=(--n 1024 4096 16384 32768 --h 2048)
    one_size=(--n 16384 --h 2048)
    steps=()
    # config/gpu_student.py's model, sequences, batch and compile setting: what sizes gpu_experiment.sh
    experiment_steps=(--pairs gpu-student:gpu-slm --block_size 512 --batch_size 64 --compile off)
fi

step() {  # step NAME SECONDS WHAT-TO-KEEP COMMAND...: run it, keep its table lines, pytest's outcome lines or
          # its last lines
    local name=$1 limit=$2 keep=$3
    shift 3
    local started=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    {
        echo "## $name"
        echo
        echo "\`$*\`: exit status $status$([ $status = 124 ] && echo " (stopped after $limit s)"), $((SECONDS - started)) s"
        echo
        case $keep in
            table) grep '^|' "$out/$name.log" | awk '!seen[$0]++' ;;
            outcome) grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|skipped|error)' "$out/$name.log" ;;
            *) tail -n "$keep" "$out/$name.log" ;;
        esac
        echo
    } >> "$summary"
}

{
    echo "# GPU check"
    echo
    python3 - <<'EOF'
import importlib.metadata, platform, torch
from data import git_commit
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'
device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (CPU)'
print(f"- device: {device}" + (f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if torch.cuda.is_available() else ''))
print(f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {version('triton')}, liger-kernel {version('liger-kernel')}, tiktoken {version('tiktoken')}")
print(f"- git commit {git_commit()}")
EOF
    echo
} > "$summary"
# -v: a test stopped by the time limit is named in the log; --durations: what to size the next check by
step cuda_tests 150 outcome python3 -m pytest -m cuda test_salt.py -v -rfE --durations=15 -p no:cacheprovider
step loss_grid 90 table python3 bench.py "${grid[@]}" --impls eager fused liger gemm --out "$out/loss_grid.jsonl"
step loss_compiled 70 table python3 bench.py "${one_size[@]}" --impls eager compiled fused --out "$out/loss_compiled.jsonl"
step train_steps 220 table python3 bench_train.py "${steps[@]}" --out "$out/train_steps.jsonl"
step experiment_steps 45 table python3 bench_train.py "${experiment_steps[@]}" --out "$out/experiment_steps.jsonl"
cat "$summary"
