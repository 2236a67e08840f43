"""
Benchmark the fused SALT loss (LM head GEMM + CE + KL from a teacher), forward + backward.

    python bench.py                          # CUDA grid if a GPU is present, else a small CPU grid
    python bench.py --n 1024 4096 --h 256    # pick the grid
    python bench.py --out bench.jsonl        # also write every row as a JSON line, after a header record

On CUDA every implementation runs the way train.py trains: fp32 master weights and fp32 hidden states
(LayerNorm's output under autocast), the loss inside torch.autocast('cuda', dtype=torch.bfloat16), backward
outside it. On CPU everything is fp32.

Implementations: eager PyTorch with full logits (losses.salt_loss_reference), torch.compile of the same
(compiled for each size, the compilation left out of the time), our salt_loss (fused_reverse_kl and fused_jsd:
with those divergences, whose gradient autograd takes chunk by chunk), Liger-Kernel's LigerFusedLinearJSD
(CUDA only, when liger_kernel imports) and the bare GEMMs (student logits, teacher logits, the two backward
GEMMs): the time floor. Liger runs with jsd_beta=0, i.e. the forward KL alone, no CE, and divides the
student's logits by the temperature too; it gets bf16 copies of the inputs (made inside its timed step), as
autocast would hand them to its matmuls.

Beside the fused loss's and the GEMMs' rows, the bytes and FLOPs a model of their kernels says they must move and
compute (modelled_traffic): the GPU's time for each can be read against its model, and the fused loss's ratio to
the GEMMs against the ratio of their bytes.

Reports the median time and the peak memory beyond the inputs. On CUDA memory is
torch.cuda.max_memory_allocated; on CPU every measurement runs in a fresh subprocess and reports peak RSS
(ru_maxrss) minus the RSS once the inputs exist. On CUDA the fused loss and its gradients are first
checked against the eager ones.
"""

import argparse
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import re
import resource
import statistics
import subprocess
import sys
import time

import torch

from common import InputError, git_commit, report_input_errors
from losses import default_chunk_size, salt_loss, salt_loss_reference

IMPLS = ["eager", "compiled", "fused", "fused_reverse_kl", "fused_jsd", "liger", "gemm"]


def make_inputs(args, n, h, device):
    """fp32 inputs, as train.py has them: the hidden states are LayerNorm's output, which autocast keeps in fp32."""
    generator = torch.Generator(device=device).manual_seed(0)
    padded_vocab = -(-args.v // 64) * 64
    teacher_h = args.teacher_h or max(1, h // 2)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, generator=generator) * scale

    return dict(
        student_hidden=randn(n, h).requires_grad_(),
        student_weight=randn(padded_vocab, h, scale=h ** -0.5).requires_grad_(),
        targets=torch.randint(0, args.v, (n,), device=device, generator=generator),
        teacher_hidden=randn(n, teacher_h),
        teacher_weight=randn(padded_vocab, teacher_h, scale=teacher_h ** -0.5),
    )


def precision(device):
    """The region every loss runs in: bf16 autocast on CUDA (as train.py), plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def loss_fn_of(impl, x, args):
    """A closure computing `impl`'s loss on inputs x, or None if `impl` is not available here."""
    loss_args = dict(kd_weight=args.kd_weight, temperature=args.temperature, vocab_size=args.v)
    if impl == "eager":
        return lambda: salt_loss_reference(**x, **loss_args)[0]
    if impl == "compiled":
        # one compilation per size: after a reset and with static shapes, no recompiling for dynamic shapes
        torch._dynamo.reset()
        compiled = torch.compile(salt_loss_reference, dynamic=False)
        return lambda: compiled(**x, **loss_args)[0]
    if impl.startswith("fused"):  # fused_reverse_kl, fused_jsd: another divergence, by autograd per chunk
        return lambda: salt_loss(**x, **loss_args, kd_loss=impl[len("fused_"):] or "forward_kl")[0]
    if impl == "liger":
        return liger_loss_fn(x, args)
    raise ValueError(f"unknown impl {impl}")


def liger_loss_fn(x, args):
    if x["student_hidden"].device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        return None
    # a release that fails to import or refuses these arguments (older ones: 0 < beta < 1, no ignore_index)
    # raises here, and bench_size makes that its "failed" row
    from liger_kernel.transformers import LigerFusedLinearJSD
    jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-1, temperature=args.temperature)
    vocab = args.v  # Liger has no notion of padded vocabulary rows: give it the real ones

    def loss_fn():
        # bf16 copies, as autocast would hand a matmul; the casts are part of the step, as they are in eager's
        return jsd(x["student_hidden"].bfloat16(), x["student_weight"][:vocab].bfloat16(),
                   x["teacher_hidden"].bfloat16(), x["teacher_weight"][:vocab].bfloat16(), x["targets"])
    return loss_fn


def make_step(impl, x, args):
    """A closure running one forward + backward of `impl` on inputs x, or None if unavailable here."""
    if impl == "gemm":
        return lambda: gemm_floor(**x)
    loss_fn = loss_fn_of(impl, x, args)
    if loss_fn is None:
        return None

    def step():
        with precision(x["student_hidden"].device):
            loss = loss_fn()
        loss.backward()
    return step


def gemm_floor(student_hidden, student_weight, targets, teacher_hidden, teacher_weight):
    """Only the matrix multiplies any implementation must do, with the logits standing in for dlogits."""
    with torch.no_grad(), precision(student_hidden.device):
        logits = student_hidden @ student_weight.T
        teacher_hidden @ teacher_weight.T
        logits @ student_weight
        logits.T @ student_hidden


def modelled_traffic(impl, n, h, args, device_type):
    """(bytes, FLOPs) of one fwd+bwd of 'fused' (salt_loss's Triton path) or 'gemm' (gemm_floor) at (n, h), by a
    model of their kernels, each reading and writing its operands once from memory (none stays in a cache), on
    CUDA under bf16 autocast over fp32 inputs, elsewhere in fp32; None for the other implementations. The FLOPs
    are the GEMMs' alone (the row math adds ~1%)."""
    if impl not in ('fused', 'gemm'):
        return None
    v, t = -(-args.v // 64) * 64, args.teacher_h or max(1, h // 2)
    e = 2 if device_type == 'cuda' else 4  # the GEMMs' operands; fp32 inputs are cast once (read 4, write 2)
    flops = 2 * n * v * (3 * h + t)  # the logits, the teacher's, grad_hidden, grad_weight
    casts = 6 * (v * h + n * h + v * t + n * t) if e == 2 else 0
    if impl == 'gemm':  # four GEMMs, each reading its operands and writing its product in the compute dtype
        return casts + e * (4 * n * v + 3 * v * h + 3 * n * h + n * t + v * t), flops
    chunks = -(-n // default_chunk_size(n, h, v, device_type))
    # per chunk the GEMMs reread the weights, and addmm reads and writes the whole fp32 grad_weight
    per_chunk = e * (v * h + v * t + v * h) + 8 * v * h
    # per logit: the fp32 logits and teacher logits written by their GEMMs, read twice by the kernel; the
    # gradient written in the compute dtype and read by the two backward GEMMs
    per_logit = 4 * 2 + 4 * 2 * 2 + 3 * e
    # per hidden row: the GEMMs' row operands, and grad_hidden's rows, written by their GEMM, then copied into fp32
    per_row = e * (2 * h + t) + (2 * e + 4) * h
    scaling = 8 * (n * h + v * h)  # backward: both gradients scaled by grad_output in place
    return casts + chunks * per_chunk + n * v * per_logit + n * per_row + scaling, flops


def fused_vs_eager_error(inputs, args):
    """Largest relative difference of salt_loss from the eager loss (value, grad of hidden, grad of weight):
    on a GPU this is the compiled Triton kernel's correctness check at the benchmark's sizes."""
    loss_args = dict(kd_weight=args.kd_weight, temperature=args.temperature, vocab_size=args.v)
    results = []
    for loss_fn in (salt_loss_reference, salt_loss):
        with precision(inputs["student_hidden"].device):
            loss = loss_fn(**inputs, **loss_args)[0]
        loss.backward()
        results.append([loss.detach().float(), inputs["student_hidden"].grad.float(), inputs["student_weight"].grad.float()])
        clear_grads(inputs)
    return max(((got - want).abs().max() / want.abs().max()).item() for want, got in zip(*results))


def clear_grads(inputs):
    for tensor in inputs.values():
        tensor.grad = None


def warmup_runs(impl, args):
    """Untimed runs first: at least one where the first call compiles (torch.compile; Triton on CUDA)."""
    return max(args.warmup, 1) if impl == "compiled" or impl.startswith("fused") else args.warmup


def measure_cuda(impl, inputs, args):
    """(median ms, peak extra MiB) in this process; memory stats are exact and resettable on CUDA."""
    step = make_step(impl, inputs, args)
    if step is None:
        return None
    for _ in range(warmup_runs(impl, args)):
        step()
        clear_grads(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        clear_grads(inputs)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def current_rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2 ** 20


def reset_peak_rss():
    """Reset ru_maxrss to the current RSS (Linux, glibc), so warmup and torch.compile don't count.
    malloc_trim first hands memory freed during warmup back to the OS; otherwise later runs
    reuse it without raising the RSS and their peak would read as ~0."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def worker(args):
    """One CPU measurement in a fresh process; prints (ms, MiB) as JSON."""
    torch.manual_seed(0)
    inputs = make_inputs(args, args.n[0], args.h[0], torch.device("cpu"))
    step = make_step(args.worker, inputs, args)
    if step is None:
        print(json.dumps(None))
        return
    for _ in range(warmup_runs(args.worker, args)):
        step()
        clear_grads(inputs)
    reset_peak_rss()
    base = current_rss_mib()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
        clear_grads(inputs)
    print(json.dumps([statistics.median(times), peak_rss_mib() - base]))


def measure_cpu_subprocess(impl, n, h, args):
    if impl == "liger":
        return None  # CUDA only: not worth a process
    command = [sys.executable, __file__, "--worker", impl, "--n", str(n), "--h", str(h), "--v", str(args.v),
               "--kd-weight", str(args.kd_weight), "--temperature", str(args.temperature),
               "--warmup", str(args.warmup), "--reps", str(args.reps)]
    if args.teacher_h:
        command += ["--teacher-h", str(args.teacher_h)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"worker exit status {result.returncode}: {last_error_line(result.stderr)}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# the grid, the table and the --out file


def last_error_line(output):
    """The line of a failed program's output that says what went wrong: its exception's, else its last."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)]
    return (errors or lines or ["no output"])[-1]


def failure(error):
    """A failed measurement's reason, on one table cell."""
    return f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")[:300]


def bench_size(n, h, args, on_cuda, out):
    """Every implementation at one (N, H). Any failure (out of memory, a compiler error, a crashed worker, a
    missing package) is that implementation's row, not the end of the grid; CUDA memory is released after the
    except block, once no traceback holds the frames."""
    inputs = make_inputs(args, n, h, torch.device("cuda")) if on_cuda else None
    if on_cuda:
        try:
            emit(dict(type="check", n=n, h=h, max_relative_error=fused_vs_eager_error(inputs, args)), out)
        except Exception as error:
            emit(dict(type="check", n=n, h=h, error=failure(error)), out)
        clear_grads(inputs)
        torch.cuda.empty_cache()
    eager = None
    for impl in args.impls:
        try:
            result = measure_cuda(impl, inputs, args) if on_cuda else measure_cpu_subprocess(impl, n, h, args)
        except Exception as error:
            result = failure(error)
        if on_cuda:
            clear_grads(inputs)
            torch.cuda.empty_cache()
        if isinstance(result, str):
            emit(dict(type="failed", n=n, h=h, impl=impl, error=result), out)
        elif result is not None:  # None: not available on this machine
            ms, mib = result
            eager = result if impl == "eager" else eager
            modelled = modelled_traffic(impl, n, h, args, "cuda" if on_cuda else "cpu") or (None, None)
            emit(dict(type="result", n=n, h=h, impl=impl, ms=ms, peak_extra_mib=mib,
                      time_vs_eager=ms / eager[0] if eager else None,
                      memory_vs_eager=mib / eager[1] if eager and eager[1] > 0 else None,
                      modelled_bytes=modelled[0], modelled_flops=modelled[1]), out)


def emit(row, out):
    """One row: to the markdown table on stdout and, with --out, as a JSON line."""
    n, h = row["n"], row["h"]
    if row["type"] == "check":
        what = f"failed: {row['error']}" if "error" in row else f"max relative error {row['max_relative_error']:.1e}"
        print(f"| {n} | {h} | fused vs eager: {what} | | | | |", flush=True)
    elif row["type"] == "failed":
        print(f"| {n} | {h} | {row['impl']} | failed: {row['error']} | | | |", flush=True)
    else:
        vs_time = "" if row["time_vs_eager"] is None else f"{row['time_vs_eager']:.2f}x"
        vs_mem = "" if row["memory_vs_eager"] is None else f"{row['memory_vs_eager']:.3f}x"
        impl = "liger (KL only, no CE)" if row["impl"] == "liger" else row["impl"]
        model = "" if row["modelled_bytes"] is None else \
            f" {row['modelled_bytes'] / 1e9:.2f} | {row['modelled_flops'] / 1e12:.3f} |"
        print(f"| {n} | {h} | {impl} | {row['ms']:.1f} | {vs_time} | {row['peak_extra_mib']:.0f} | {vs_mem} |{model}",
              flush=True)
    if out is not None:
        out.write(json.dumps(row) + "\n")
        out.flush()


def header(args, on_cuda):
    """What the numbers were measured on and with: the first line of --out."""
    config = {key: value for key, value in vars(args).items() if key not in ("worker", "out")}
    return dict(type="header", config=config, git_commit=git_commit(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                device=torch.cuda.get_device_name() if on_cuda else "cpu",
                precision="fp32 weights and hidden states, bf16 autocast" if on_cuda else "fp32",
                torch=torch.__version__, triton=package_version("triton"), liger_kernel=package_version("liger-kernel"))


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", help="tokens per step (default: 1K 4K 16K 32K on CUDA, 1K 4K on CPU)")
    parser.add_argument("--h", type=int, nargs="+", help="student hidden size (default: 768 2048 on CUDA, 256 on CPU)")
    parser.add_argument("--teacher-h", type=int, default=None, help="teacher hidden size (default: H / 2)")
    parser.add_argument("--v", type=int, default=50257, help="vocabulary size (weights padded to a multiple of 64)")
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs (default: 3 on CUDA, 1 on CPU; compiled and fused get at least 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default: 10 on CUDA, 3 on CPU)")
    parser.add_argument("--out", help="also write the results to this file as JSON lines, a header record first")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = parser.parse_args(argv)
    check_args(args)
    on_cuda = torch.cuda.is_available()
    args.n = args.n or ([1024, 4096, 16384, 32768] if on_cuda else [1024, 4096])
    args.h = args.h or ([768, 2048] if on_cuda else [256])
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    args.reps = args.reps if args.reps is not None else (10 if on_cuda else 3)
    return args


def check_args(args):
    """Values nothing can be measured with: one-line errors naming the flag."""
    for flag, value, minimum in [("--n", args.n, 1), ("--h", args.h, 1), ("--teacher-h", args.teacher_h, 1),
                                 ("--v", args.v, 2), ("--warmup", args.warmup, 0), ("--reps", args.reps, 1)]:
        for number in value if isinstance(value, list) else [] if value is None else [value]:
            if number < minimum:
                raise InputError(f"{flag} must be at least {minimum}, got {number}")
    if not 0.0 <= args.kd_weight <= 1.0:
        raise InputError(f"--kd-weight must be in [0, 1], got {args.kd_weight}")
    if not 0 < args.temperature < float("inf"):
        raise InputError(f"--temperature must be positive and finite, got {args.temperature}")


def main():
    args = parse_args()
    if args.worker:
        worker(args)
        return
    on_cuda = torch.cuda.is_available()
    try:
        out = open(args.out, "w") if args.out else None
    except OSError as error:
        raise InputError(f"--out {args.out}: {error.strerror}") from error
    run = header(args, on_cuda)
    if out is not None:
        out.write(json.dumps(run) + "\n")
    print(f"SALT loss fwd+bwd on {run['device']}, {run['precision']}, V={args.v}, kd_weight={args.kd_weight}, "
          f"temperature={args.temperature}, teacher H={args.teacher_h or 'H/2'}; median of {args.reps}")
    if on_cuda and "liger" in args.impls:
        print("liger: LigerFusedLinearJSD, jsd_beta=0: the forward KL alone (no CE), on bf16 copies of the inputs")
    print("\n| N | H | impl | time (ms) | vs eager | peak extra (MiB) | vs eager | modelled GB | modelled TFLOP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for h in args.h:
        for n in args.n:
            bench_size(n, h, args, on_cuda, out)
    if out is not None:
        out.close()


if __name__ == "__main__":
    report_input_errors()
    main()
