#!/usr/bin/env bash
# The GPU check in one command of at most 8 minutes: the machine (preflight), the MFU of a compiled gpt2-medium
# step, plain and in the KD stage, the fused loss against eager PyTorch, the bare GEMMs, Liger-Kernel and
# torch.compile, the CUDA tests, the tokens/s that sizes gpu_experiment.sh, and an FSDP step's peak memory against
# the memory plan. Everything lands in OUT in at most 8 files: summary.md (the targets, met or missed, each training
# run's loss path, compiled graphs and peak memory, then every step's table), each benchmark's JSON lines, and
# logs.tar.gz (every step's log, every training run's train.log and metrics.jsonl).
#
#   bash gpu_check.sh --prepare                  # on a machine with network, in the checkout: .cache/ (below)
#   bash gpu_check.sh OUT                        # on the GPU machine, in the checkout with its .cache/
#   GPU_CHECK_TINY=1 bash gpu_check.sh OUT       # every step at toy sizes, on a CPU (a test runs this)
#
# --prepare writes what travels with the checkout to a GPU machine without network: the GPT-2 BPE file in
# .cache/tiktoken (TIKTOKEN_CACHE_DIR, unless set), liger-kernel's wheel in .cache/wheels (WHEELS, unless set) and
# the commit in .cache/git_commit (.git need not travel; SALT_GIT_COMMIT overrides it). The check measures the
# machine's own PyTorch and Triton and installs nothing, but for the wheels in WHEELS: on the path of this run only;
# wheels that do not install, or no pip, are a line of the summary, and the check goes on without them. Each step
# has its time limit (GPU_CHECK_BUDGET seconds in all, 470 by default; 4x both at toy sizes); a step that fails or
# runs out of time is said so in the summary, keeps the rows it measured, and the next step runs.
set -uo pipefail
cd "$(dirname "$0")"

prepare() {  # --prepare: .cache/ for a GPU machine without network
    mkdir -p .cache/tiktoken .cache/wheels
    # GPT-2's BPE file (tiktoken_ext.openai_public's r50k_base) from tiktoken's own cache where it is there, else
    # downloaded, into .cache/tiktoken under the name tiktoken looks for in TIKTOKEN_CACHE_DIR
    python3 - <<'EOF' || exit 1
import hashlib
from tiktoken.load import read_file_cached
url = 'https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken'
with open(f'.cache/tiktoken/{hashlib.sha1(url.encode()).hexdigest()}', 'wb') as f:
    f.write(read_file_cached(url))
EOF
    echo "${SALT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > .cache/git_commit
    python3 -m pip download -q --no-deps --only-binary=:all: -d .cache/wheels liger-kernel ||
        echo "no liger-kernel wheel: the check will compare the loss without Liger-Kernel"
    echo "wrote $(find .cache/tiktoken .cache/wheels .cache/git_commit -type f | tr '\n' ' ')"
}
if [ "${1:-}" = --prepare ]; then
    prepare
    exit
fi

out=$(realpath -m "${1:-results/gpu_check}")
mkdir -p "$out"
rm -f "$out"/summary.md "$out"/*.jsonl "$out"/logs.tar.gz
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # logs, runs, data and wheels: never more than 8 files in OUT
export PYTHONUNBUFFERED=1
export SALT_GIT_COMMIT=${SALT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || cat .cache/git_commit 2>/dev/null ||
    echo unknown)}
slack=1
[ -n "${GPU_CHECK_TINY:-}" ] && slack=4  # toy sizes on a CPU, maybe a shared one: each limit 4x the GPU one
budget=${GPU_CHECK_BUDGET:-$((470 * slack))}
ends_at=$((SECONDS + budget))
# what --prepare put in .cache/, unless told otherwise: the check must not stop for a variable not set by hand
[ -d .cache/tiktoken ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.cache/tiktoken}
wheels=${WHEELS:-.cache/wheels}
if ! compgen -G "$wheels/*.whl" > /dev/null; then  # an optional wheel missing is a line, never the end of the check
    wheels_note="no wheels in $wheels: the loss is compared without Liger-Kernel"
elif python3 -m pip install -q --no-index --no-deps --target "$work/site" "$wheels"/*.whl > "$work/wheels.log" 2>&1; then
    wheels_note="installed for this run from $wheels: $(cd "$wheels" && echo *.whl)"
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
else
    wheels_note="the wheels in $wheels did not install ($(grep -v '^\s*$' "$work/wheels.log" | tail -n 1 | cut -c1-200)): the check goes on without them"
fi
data=(--data_dir "$work/data" --work_dir "$work/runs")
if [ -n "${GPU_CHECK_TINY:-}" ]; then
    grid=(--n 256 512 --h 64 --v 1000 --reps 1 --warmup 0)
    one_size=(--n 512 --h 64 --v 1000 --reps 1 --warmup 0)
    mfu=(--pairs demo-student:demo-slm --block_size 64 --batch_size 4 --steps 8 --compile blocks "${data[@]}")
    more=(--pairs demo-student:demo-slm --block_size 64 --batch_size 4 --steps 8 --compile off "${data[@]}")
    sizing=(--pairs demo-student:demo-slm --block_size 32 --batch_size 4 --steps 6 --compile off "${data[@]}")
    teachers=(--pairs demo-student:demo-slm --block_size 64 --batch_size 4 "${data[@]}")
    fsdp=(--pairs demo-student:demo-slm --block_size 32 --batch_size 4 --steps 6 --compile off --fsdp "${data[@]}")
    target_n=512 target_h=64
else
    grid=(--n 1024 4096 16384 32768 --h 2048)
    one_size=(--n 16384 --h 2048)
    # the MFU target per block (train.py's default compile_scope), alone: its row first, whatever comes after
    mfu=(--pairs gpt2-medium:gpt2-medium-half --compile blocks "${data[@]}")
    # the whole model compiled (speed and compile time), then uncompiled: after the headline rows
    more=(--pairs gpt2-medium:gpt2-medium-half --compile model off "${data[@]}")
    # config/gpu_student.py's model, sequences, batch and compile setting: what sizes gpu_experiment.sh
    sizing=(--pairs gpu-student:gpu-slm --block_size 512 --batch_size 64 --compile off "${data[@]}")
    # every step's teacher, made before the steps' limits (at the longest block size: a teacher may be longer)
    teachers=(--pairs gpt2-medium:gpt2-medium-half gpu-student:gpu-slm "${data[@]}")
    # a few FSDP steps in one process, with the prepared teacher: the peak memory against the plan's fsdp total
    fsdp=(--pairs gpt2-medium:gpt2-medium-half --batch_size 8 --steps 6 --compile off --fsdp "${data[@]}")
    target_n=16384 target_h=2048
fi

step() {  # step NAME SECONDS WHAT-TO-KEEP COMMAND...: run it within its limit and what is left of the budget,
          # then add its section to the summary and pack the logs
    local name=$1 limit=$(($2 * slack)) keep=$3
    shift 3
    local left=$((ends_at - SECONDS - 5)) started=$SECONDS
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        printf '## %s\n\nnot run: the budget of %s s was spent\n\n' "$name" "$budget" >> "$work/sections.md"
        write_summary
        return
    fi
    timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
    local status=$?
    {
        echo "## $name"
        echo
        echo "\`$*\`: exit status $status$([ $status = 124 ] || [ $status = 137 ] && echo " (stopped after $limit s)"), $((SECONDS - started)) s"
        echo
        case $keep in
            table) grep '^|' "$work/$name.log" | awk '!seen[$0]++' ;;
            tests) grep -E '::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|^(FAILED|ERROR) |^=+ .*(passed|failed|skipped|error|deselected)|^[0-9.]+s (call|setup|teardown) ' "$work/$name.log"
                   tail -n 1 "$work/$name.log" | grep -E '^test_salt.py::\S+ *$' | sed 's/$/ (running when stopped)/' ;;
            *) tail -n "$keep" "$work/$name.log" ;;
        esac
        echo
    } >> "$work/sections.md"
    write_summary
}

write_summary() {  # summary.md = the machine, the targets from the JSON lines so far, every finished step
    { cat "$work/preflight.md"; python3 - "$out" "$target_n" "$target_h" <<'EOF'; cat "$work/sections.md"; } > "$out/summary.md.tmp"
import json, os, sys
out, n, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rows(name):
    path = os.path.join(out, name)
    return [json.loads(line) for line in open(path) if line.endswith('\n')] if os.path.isfile(path) else []
grid = rows('loss_grid.jsonl')
loss = {(r['n'], r['impl']): r for r in grid if r.get('type') == 'result' and r['h'] == h}
def ratio(a, b, key, at=n):
    return loss[(at, a)][key] / loss[(at, b)][key] if (at, a) in loss and (at, b) in loss and loss[(at, b)][key] else None
def line(what, value, form, ok, why=''):
    measured, verdict = ('-', f'not measured{why}') if value is None else (form.format(value), 'met' if ok(value) else 'missed')
    print(f"target: {what} | measured: {measured} | {verdict}")
print('## Targets\n')
line(f'fused KD loss fwd+bwd <= 1.15x the bare GEMMs (N={n}, H={h})', ratio('fused', 'gemm', 'ms'), '{:.2f}x', lambda r: r <= 1.15)
line(f'fused >= 1.5x faster than eager PyTorch (N={n})', ratio('eager', 'fused', 'ms'), '{:.2f}x', lambda r: r >= 1.5)
line(f"fused <= 1/20 of eager's extra memory (N={n})", ratio('fused', 'eager', 'peak_extra_mib'), '{:.3f}x', lambda r: r <= 0.05)
liger = {m: ratio('fused', 'liger', 'ms', m) for m in sorted({m for m, impl in loss if impl == 'liger'})}
failed = [r['error'] for r in grid if r.get('type') == 'failed' and r['impl'] == 'liger']
why = f': liger failed: {failed[0]}' if failed else ': Liger not installed' if grid and grid[0].get('liger_kernel') is None else ''
line('fused faster than Liger-Kernel at every N (fused/liger time)', ', '.join(f'{r:.2f}x at N={m}' for m, r in liger.items()) or None,
     '{}', lambda _: all(r is not None and r < 1 for r in liger.values()), why)
medians = next((r['medians'] for r in rows('train_mfu.jsonl') if r.get('compile') == 'blocks'), {})
plain, kd = medians.get('plain', {}), medians.get('kd', {})
line('gpt2-medium compiled step MFU >= 45%', plain.get('mfu'), '{:.1%}', lambda m: m >= 0.45,
     '' if plain.get('mfu') or not plain else ': no MFU on a CPU')
predicted = next((r['predicted'] for r in rows('train_mfu.jsonl') if 'predicted' in r), None)
cost = plain['tokens_per_s'] / kd['tokens_per_s'] if 'tokens_per_s' in plain and 'tokens_per_s' in kd else None
line('KD step / plain step within 5 points of the FLOP prediction', cost, f'{{:.3f}} (predicted {predicted or 0:.3f})',
     lambda c: abs(c - predicted) <= 0.05)
def gib(n):
    return f'{n / 2**30:.1f} GiB'
fsdp = next((r['run'] for r in rows('fsdp_step.jsonl') if 'run' in r), {})
peak, plan = fsdp.get('peak_memory'), (fsdp.get('memory_plan') or {}).get('fsdp')
line("an FSDP step's peak memory <= the memory plan's fsdp total (peak / plan)", peak / plan if peak and plan else None,
     f'{{:.2f}}x ({gib(peak or 0)} of {gib(plan or 0)})', lambda r: r <= 1,
     ' (no CUDA)' if fsdp and peak is None else ': no memory_plan in the header' if fsdp and not plan else '')
print('\n## Training runs\n')  # what the first GPU run must show besides speed (bench_train.run_facts)
for name in ('train_mfu', 'experiment_steps', 'fsdp_step', 'train_more'):
    for r in rows(f'{name}.jsonl'):
        if 'run' not in r:
            continue
        facts, kind = r['run'], 'fsdp' if r.get('fsdp') else 'ddp'
        graphs, breaks = facts.get('compiled_graphs'), facts.get('graph_breaks')
        compiled = (f"{graphs[-1]} compiled graphs, {graphs[-1] - graphs[0]} of them after the first logged step "
                    f"(recompiles), graph breaks: {'-' if breaks is None else breaks}") if graphs else 'not compiled'
        plans = facts.get('memory_plan') or {}
        memory = 'not measured (no CUDA)' if facts.get('peak_memory') is None else gib(facts['peak_memory'])
        memory += f" against the plan's {gib(plans[kind])} ({kind})" if kind in plans else ', no memory_plan logged'
        print(f"run: {name} {r['student']} ({r['compile']}{', fsdp' if r.get('fsdp') else ''}) | loss: "
              f"{facts.get('loss_impl') or '-'} | {compiled} | peak memory: {memory}")
if any('plain' in r.get('medians', {}) and 'kd' in r['medians'] for r in rows('experiment_steps.jsonl')):
    import experiment  # the sizing of gpu_experiment.sh by this rate, as it will size itself (experiment.fit)
    student, slm = (experiment.read_config(f'config/gpu_{name}.py') for name in ('student', 'slm'))
    fitted, fitted_slm, rate = experiment.fit(student, slm, os.path.join(out, 'experiment_steps.jsonl'), 420, 0,
                                              [0.5, 0.7, 1.0])  # gpu_experiment.sh's branches, no second short run
    print(f"\nsizing: at {rate:,.0f} tokens/s, gpu_experiment.sh's study fits its 420 s with 30% slack at "
          f"max_steps={fitted['max_steps']} (config/gpu_student.py: {student['max_steps']})")
print()
EOF
    mv "$out/summary.md.tmp" "$out/summary.md"
    # the heavy files (data, checkpoints, wheels) stay behind
    tar -czf "$out/logs.tar.gz.tmp" -C "$work" --exclude=./data --exclude=./site --exclude='ckpt*' . &&
        mv "$out/logs.tar.gz.tmp" "$out/logs.tar.gz"
}

# preflight, seconds: no GPU or no tokenizer ends the check at once, with one line
timeout -k 5 60 python3 - "${GPU_CHECK_TINY:-}" "$work/peak_flops" "$wheels_note" > "$work/preflight.md" <<'EOF' || { cat "$work/preflight.md"; exit 1; }
import importlib.metadata, os, platform, shutil, subprocess, sys, sysconfig
import torch
tiny = bool(sys.argv[1])
if not torch.cuda.is_available() and not tiny:
    sys.exit("no CUDA GPU: torch.cuda.is_available() is False (GPU_CHECK_TINY=1 runs the check's toy sizes on a CPU)")
# offline for this check alone, through a proxy that refuses: without its file, tiktoken would download it
# (with no timeout, where a GPU machine has no network); the runs need it from TIKTOKEN_CACHE_DIR
os.environ.update(HTTPS_PROXY='http://127.0.0.1:9', HTTP_PROXY='http://127.0.0.1:9', NO_PROXY='', no_proxy='')
try:
    import tiktoken
    tiktoken.get_encoding('r50k_base')
except Exception as error:
    sys.exit(f"the GPT-2 BPE file does not load ({type(error).__name__}): set TIKTOKEN_CACHE_DIR to a folder "
             f"holding it (docs/gpu.md); TIKTOKEN_CACHE_DIR={os.environ.get('TIKTOKEN_CACHE_DIR', 'unset')}")
from common import git_commit
import losses
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'
print('# GPU check\n')
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"- device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    smi = subprocess.run(['nvidia-smi', '--query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,'
                          'power.max_limit,temperature.gpu', '--format=csv'], capture_output=True, text=True)
    print(f"- nvidia-smi: {' / '.join(smi.stdout.strip().splitlines()) or smi.stderr.strip()}")
else:
    print('- device: no GPU (CPU)')
print(f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), " + ', '.join(
    f"{name} {version(name)}" for name in ('triton', 'liger-kernel', 'tiktoken', 'transformers', 'pyarrow',
                                           'matplotlib', 'pytest', 'pytest-timeout')))
# what Triton needs to build a kernel's launcher the first time (triton/runtime/build.py): a C compiler and Python.h
compiler = os.environ.get('CC') or shutil.which('gcc') or shutil.which('clang')
header = os.path.join(sysconfig.get_paths()['include'], 'Python.h')
print(f"- Triton's launcher build: C compiler {compiler or 'none (set CC): Triton cannot build its launcher'}, "
      f"{header if os.path.isfile(header) else f'no {header}: Triton cannot build its launcher'}")
print(f"- wheels: {sys.argv[3]}")
print(f"- git commit {git_commit()}")
device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
print(f"- the loss's choices here: {losses.describe_choices(device)}")
# the run's own check (bf16 autocast on a GPU), with the reason for any path it refused (else on stderr alone)
print(f"- the loss's check here: {losses.choice(device, autocast_dtype=torch.bfloat16 if device.type == 'cuda' else None)}")
# MFU's denominator, dense bf16 by the datasheets: the SXM parts 989 TFLOP/s, the PCIe H100 756, the NVL parts 835
name = torch.cuda.get_device_name() if torch.cuda.is_available() else ''
peak = os.environ.get('PEAK_FLOPS') or ('756e12' if 'PCIe' in name else '835e12' if 'NVL' in name else '989e12')
known = 'PEAK_FLOPS' in os.environ or 'H100' in name or 'H200' in name or not name  # no GPU: no MFU
print(f"- peak_flops for MFU: {peak}" + ('' if known else ' (not an H100 or H200: set PEAK_FLOPS for this part)') + '\n')
with open(sys.argv[2], 'w') as f:
    f.write(peak)
EOF
touch "$work/sections.md"
peak=(--peak_flops "$(cat "$work/peak_flops")")
# -p timeout where pytest-timeout is installed: a hung test stops alone; -v names each test's outcome as it ends
per_test=()
python3 -c 'import pytest_timeout' 2>/dev/null && per_test=(-p timeout --timeout 60)
# the MFU target first and alone, then the loss, the tests, and the rest
# every step's data and teacher first (gpt2-medium's a 2.4 GB checkpoint), outside the measuring steps' limits
step prepare 60 3 python3 bench_train.py "${teachers[@]}" --prepare
step train_mfu 120 table python3 bench_train.py "${mfu[@]}" "${peak[@]}" --out "$out/train_mfu.jsonl"
step loss_grid 65 table python3 bench.py "${grid[@]}" --impls eager fused liger gemm --out "$out/loss_grid.jsonl"
step cuda_tests 80 tests python3 -m pytest -m cuda test_salt.py -v -rfE --durations=10 -p no:cacheprovider "${per_test[@]}"
step experiment_steps 30 table python3 bench_train.py "${sizing[@]}" "${peak[@]}" --out "$out/experiment_steps.jsonl"
step fsdp_step 30 table python3 bench_train.py "${fsdp[@]}" "${peak[@]}" --out "$out/fsdp_step.jsonl"
step loss_compiled 20 table python3 bench.py "${one_size[@]}" --impls eager compiled fused --out "$out/loss_compiled.jsonl"
step train_more 65 table python3 bench_train.py "${more[@]}" "${peak[@]}" --out "$out/train_more.jsonl"
rm -rf "$work"
grep -v ' PASSED' "$out/summary.md"   # the tail a terminal shows: targets, tables, any test that did not pass
