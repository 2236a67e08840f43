"""
Benchmark the fused SALT loss (LM head GEMM + CE + KL from a teacher), forward + backward.

    python bench.py                          # CUDA grid (bf16) if a GPU is present, else a small CPU grid (fp32)
    python bench.py --n 1024 4096 --h 256    # pick the grid

Implementations: eager PyTorch with full logits, torch.compile of the same, our salt_loss,
Liger-Kernel's LigerFusedLinearJSD with beta=0 (forward KL only, no CE; CUDA and only when
liger_kernel imports), and the bare GEMMs (student logits, teacher logits, the two backward
GEMMs): the time floor. Reports the median time and the peak memory beyond the inputs. On CUDA
memory is torch.cuda.max_memory_allocated; on CPU every measurement runs in a fresh subprocess
and reports peak RSS (ru_maxrss) minus the RSS once the inputs exist.
"""

import argparse
import ctypes
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kernels import salt_loss

IMPLS = ["eager", "compiled", "fused", "liger", "gemm"]


def eager_salt_loss(student_hidden, student_weight, targets, teacher_hidden, teacher_weight, *,
                    kd_weight, temperature, vocab_size, ignore_index=-1):
    """What salt_loss computes, written the obvious way: full (N, V) logits and autograd."""
    log_p = F.log_softmax((student_hidden @ student_weight.T)[:, :vocab_size].float(), dim=-1)
    with torch.no_grad():
        log_q = F.log_softmax((teacher_hidden @ teacher_weight.T)[:, :vocab_size].float() / temperature, dim=-1)
    valid = targets != ignore_index
    n_counted = valid.sum().clamp(min=1)
    ce = F.nll_loss(log_p, targets, ignore_index=ignore_index, reduction="sum") / n_counted
    kl = ((log_q.exp() * (log_q - log_p)).sum(-1) * valid).sum() / n_counted
    return (1 - kd_weight) * ce + kd_weight * kl


def make_inputs(args, n, h, device, dtype):
    generator = torch.Generator(device=device).manual_seed(0)
    padded_vocab = -(-args.v // 64) * 64
    teacher_h = args.teacher_h or h // 2

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator) * scale

    return dict(
        student_hidden=randn(n, h).requires_grad_(),
        student_weight=randn(padded_vocab, h, scale=h ** -0.5).requires_grad_(),
        targets=torch.randint(0, args.v, (n,), device=device, generator=generator),
        teacher_hidden=randn(n, teacher_h),
        teacher_weight=randn(padded_vocab, teacher_h, scale=teacher_h ** -0.5),
    )


def make_step(impl, x, args):
    """A closure running one forward + backward of `impl` on inputs x, or None if unavailable here."""
    loss_args = dict(kd_weight=args.kd_weight, temperature=args.temperature, vocab_size=args.v)
    if impl == "eager":
        loss_fn = lambda: eager_salt_loss(**x, **loss_args)
    elif impl == "compiled":
        compiled = torch.compile(eager_salt_loss)
        loss_fn = lambda: compiled(**x, **loss_args)
    elif impl == "fused":
        loss_fn = lambda: salt_loss(**x, **loss_args)
    elif impl == "liger":
        if x["student_hidden"].device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
            return None
        from liger_kernel.transformers import LigerFusedLinearJSD
        try:
            jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-1, temperature=args.temperature)
        except (AssertionError, TypeError) as error:  # older releases: 0 < beta < 1, no ignore_index
            print(f"skipping liger: {error}", file=sys.stderr)
            return None
        vocab = args.v  # Liger has no notion of padded vocab rows: give it the real ones
        loss_fn = lambda: jsd(x["student_hidden"], x["student_weight"][:vocab], x["teacher_hidden"], x["teacher_weight"][:vocab], x["targets"])
    elif impl == "gemm":
        return lambda: gemm_floor(**x)
    else:
        raise ValueError(f"unknown impl {impl}")

    def step():
        loss_fn().backward()
    return step


def gemm_floor(student_hidden, student_weight, targets, teacher_hidden, teacher_weight):
    """Only the matrix multiplies any implementation must do, with the logits standing in for dlogits."""
    with torch.no_grad():
        logits = student_hidden @ student_weight.T
        teacher_hidden @ teacher_weight.T
        logits @ student_weight
        logits.T @ student_hidden


def fused_vs_eager_error(inputs, args):
    """Largest relative difference of salt_loss from the eager loss (value, grad of hidden, grad of weight):
    on a GPU this is the compiled Triton kernel's correctness check at the benchmark's sizes."""
    loss_args = dict(kd_weight=args.kd_weight, temperature=args.temperature, vocab_size=args.v)
    results = []
    for loss_fn in (eager_salt_loss, salt_loss):
        loss = loss_fn(**inputs, **loss_args)
        loss.backward()
        results.append([loss.detach().float(), inputs["student_hidden"].grad.float(), inputs["student_weight"].grad.float()])
        clear_grads(inputs)
    return max(((got - want).abs().max() / want.abs().max()).item() for want, got in zip(*results))


def clear_grads(inputs):
    for tensor in inputs.values():
        tensor.grad = None


def measure_cuda(impl, inputs, args):
    """(median ms, peak extra MiB) in this process; memory stats are exact and resettable on CUDA."""
    step = make_step(impl, inputs, args)
    if step is None:
        return None
    for _ in range(args.warmup):
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
    inputs = make_inputs(args, args.n[0], args.h[0], "cpu", torch.float32)
    step = make_step(args.worker, inputs, args)
    if step is None:
        print(json.dumps(None))
        return
    for _ in range(args.warmup):
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
    command = [sys.executable, __file__, "--worker", impl, "--n", str(n), "--h", str(h), "--v", str(args.v),
               "--kd-weight", str(args.kd_weight), "--temperature", str(args.temperature),
               "--warmup", str(args.warmup), "--reps", str(args.reps)]
    if args.teacher_h:
        command += ["--teacher-h", str(args.teacher_h)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", help="tokens per step (default: 1K 4K 16K 32K on CUDA, 1K 4K on CPU)")
    parser.add_argument("--h", type=int, nargs="+", help="student hidden size (default: 768 2048 on CUDA, 256 on CPU)")
    parser.add_argument("--teacher-h", type=int, default=None, help="teacher hidden size (default: H / 2)")
    parser.add_argument("--v", type=int, default=50257, help="vocabulary size (weights padded to a multiple of 64)")
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default: 10 on CUDA, 3 on CPU)")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = parser.parse_args()
    on_cuda = torch.cuda.is_available()
    args.n = args.n or ([1024, 4096, 16384, 32768] if on_cuda else [1024, 4096])
    args.h = args.h or ([768, 2048] if on_cuda else [256])
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    args.reps = args.reps or (10 if on_cuda else 3)
    if args.worker:
        worker(args)
        return

    device_name = torch.cuda.get_device_name() if on_cuda else "CPU"
    dtype_name = "bf16" if on_cuda else "fp32"
    print(f"SALT loss fwd+bwd on {device_name}, {dtype_name}, V={args.v}, kd_weight={args.kd_weight}, "
          f"temperature={args.temperature}, teacher H={args.teacher_h or 'H/2'}; median of {args.reps}\n")
    print("| N | H | impl | time (ms) | vs eager | peak extra (MiB) | vs eager |")
    print("|---|---|---|---|---|---|---|")
    for h in args.h:
        for n in args.n:
            inputs = make_inputs(args, n, h, "cuda", torch.bfloat16) if on_cuda else None
            if on_cuda:
                print(f"| {n} | {h} | fused vs eager: max relative error {fused_vs_eager_error(inputs, args):.1e} | | | | |")
            eager = None
            for impl in args.impls:
                try:
                    result = measure_cuda(impl, inputs, args) if on_cuda else measure_cpu_subprocess(impl, n, h, args)
                except (torch.OutOfMemoryError, subprocess.CalledProcessError) as error:
                    print(f"| {n} | {h} | {impl} | failed: {type(error).__name__} | | | |", flush=True)
                    if on_cuda:
                        clear_grads(inputs)
                        torch.cuda.empty_cache()
                    continue
                if result is None:
                    continue  # not available on this machine
                ms, mib = result
                if impl == "eager":
                    eager = result
                vs_time = f"{ms / eager[0]:.2f}x" if eager else ""
                vs_mem = f"{mib / eager[1]:.3f}x" if eager else ""
                print(f"| {n} | {h} | {impl} | {ms:.1f} | {vs_time} | {mib:.0f} | {vs_mem} |", flush=True)
            del inputs
            if on_cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
