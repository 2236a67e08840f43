"""
Fused linear + SALT loss: the LM head GEMM, cross-entropy and the distillation KL from a
teacher, without ever materializing the (N, V) logits.

SALT (arXiv 2410.18779) trains the large student for the first kd_steps on
    (1 - w) * CE(softmax(z_s), y) + w * KL(softmax(z_t / tau) || softmax(z_s))
and on plain next-token CE afterwards. With V = 50257 the logits dominate memory, so we walk
the tokens in chunks: per chunk compute the logits, the per-row losses and d(loss)/d(logits),
and immediately turn that into grad_hidden[chunk] and a contribution to grad_weight. The
gradients are therefore computed in the forward; backward only scales them by grad_output.

The per-row math exists twice: in PyTorch (default on CPU) and as a Triton kernel with an
online softmax (default on CUDA). Force one with salt_loss(..., impl='torch' | 'triton').
"""

import contextlib
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path works without triton
    triton = None

_HALF_DTYPES = (torch.bfloat16, torch.float16)

# Vocabulary block walked by one Triton program step. A module attribute so tests can shrink it
# and exercise the online softmax over many blocks with a tiny vocabulary.
TRITON_BLOCK_V = 4096


def salt_loss(student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None, *,
              kd_weight=0.0, temperature=1.0, vocab_size=None, ignore_index=-1, chunk_size=None,
              return_parts=False, impl=None, reduction='mean'):
    """
    Mean over non-ignored positions of (1-w) * CE + w * KL(teacher || student), w = kd_weight.

    student_hidden (N, H) or (B, T, H); student_weight (V_padded, H); targets (N,) or (B, T).
    teacher_hidden (N, H_t), teacher_weight (V_padded_t, H_t): optional, never get gradients;
    when given, the KL is computed (and reported by return_parts) even if kd_weight is 0.
    Only the first vocab_size rows of each weight are real tokens; the rest are excluded from
    both softmaxes. impl: None (Triton on CUDA when available, else PyTorch), 'torch', 'triton'.
    Returns loss, or (loss, ce_mean, kl_mean) with the parts detached if return_parts; with
    reduction='none' (evaluation: no gradients), per position (ce, kl), shaped like targets, 0 where
    ignored.
    """
    has_teacher = teacher_hidden is not None or teacher_weight is not None
    if has_teacher and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("pass both teacher_hidden and teacher_weight, or neither")
    if not has_teacher and kd_weight != 0:
        raise ValueError(f"kd_weight={kd_weight} needs a teacher: pass teacher_hidden and teacher_weight")
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    positions = targets.shape
    targets = targets.reshape(-1).long()
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} positions, student_hidden has {hidden.shape[0]}")
    vocab_size = student_weight.shape[0] if vocab_size is None else vocab_size
    if vocab_size > student_weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} exceeds the {student_weight.shape[0]} rows of student_weight")
    if has_teacher:
        teacher_hidden = teacher_hidden.detach().reshape(hidden.shape[0], -1)
        teacher_weight = teacher_weight.detach()
        if vocab_size > teacher_weight.shape[0]:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {teacher_weight.shape[0]} rows of teacher_weight")

    device = hidden.device
    config = _LossConfig(
        kd_weight=float(kd_weight),
        temperature=float(temperature),
        vocab_size=vocab_size,
        ignore_index=ignore_index,
        chunk_size=chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], student_weight.shape[0], device.type),
        impl=_pick_impl(impl, device),
        autocast_dtype=torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None,
    )
    if reduction == "none":
        per_row = [torch.zeros(hidden.shape[0], dtype=torch.float32, device=device) for _ in range(2)]
        with torch.no_grad():
            _fused_forward(hidden, student_weight, targets, teacher_hidden, teacher_weight, config,
                           need_grad_hidden=False, need_grad_weight=False, per_row=per_row)
        return tuple(rows.view(positions) for rows in per_row)
    if torch.is_grad_enabled() and (hidden.requires_grad or student_weight.requires_grad):
        loss, ce_mean, kl_mean = _SaltLossFunction.apply(hidden, student_weight, targets, teacher_hidden, teacher_weight, config)
    else:  # evaluation: skip the backward GEMMs (autograd.Function would not tell us)
        loss, ce_mean, kl_mean, _, _ = _fused_forward(hidden, student_weight, targets, teacher_hidden, teacher_weight, config,
                                                      need_grad_hidden=False, need_grad_weight=False)
    return (loss, ce_mean, kl_mean) if return_parts else loss


def default_chunk_size(n_rows, hidden_size, padded_vocab, device_type):
    """
    Token rows per chunk: enough that one chunk of logits is about as large as the hidden
    states (the extra memory then stays comparable to the inputs), at most 2048, and at least
    256 on GPUs, where each chunk rereads the whole weight and short GEMMs are memory-bound,
    or 64 on CPU, where the fallback is about memory (~13 MiB per fp32 buffer at V=50k).
    """
    rows = -(-n_rows * hidden_size // padded_vocab)
    min_rows = 64 if device_type == "cpu" else 256
    return max(min_rows, min(2048, 1 << (rows - 1).bit_length()))


@dataclass(frozen=True)
class _LossConfig:
    kd_weight: float
    temperature: float
    vocab_size: int
    ignore_index: int
    chunk_size: int
    impl: str
    autocast_dtype: torch.dtype | None  # GEMM dtype forced by an enclosing autocast region


def _pick_impl(impl, device):
    if impl is None:
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be None, 'torch' or 'triton', got {impl!r}")
    if impl == "triton" and triton is None:
        raise ValueError("impl='triton' but triton is not installed")
    return impl


class _SaltLossFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, teacher_weight, config):
        loss, ce_mean, kl_mean, grad_hidden, grad_weight = _fused_forward(
            hidden, weight, targets, teacher_hidden, teacher_weight, config,
            need_grad_hidden=ctx.needs_input_grad[0], need_grad_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.backward_done = False
        ctx.mark_non_differentiable(ce_mean, kl_mean)
        return loss, ce_mean, kl_mean

    @staticmethod
    def backward(ctx, grad_loss, grad_ce_unused, grad_kl_unused):
        # The stored gradients are scaled in place, so there is never a second (V, H) copy;
        # hence a graph kept with retain_graph=True must not be backpropagated twice.
        if ctx.backward_done:
            raise RuntimeError("salt_loss: backward through the same forward twice is not supported")
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _fused_forward(hidden, weight, targets, teacher_hidden, teacher_weight, config, need_grad_hidden, need_grad_weight,
                   per_row=None):
    """Loop over token chunks; returns the loss, its parts and the (not yet grad_output-scaled) grads, and
    writes each row's CE and KL into per_row = [ce, kl] when given."""
    # Dtypes are chosen explicitly below; autocast would also turn the KL's fp32 bmm into bf16.
    with torch.autocast(hidden.device.type, enabled=False):
        student_dtype = _gemm_dtype(hidden, weight, config)
        row_dtype = torch.float64 if student_dtype == torch.float64 else torch.float32  # softmax math dtype
        hidden_c, weight_c = hidden.to(student_dtype), weight.to(student_dtype)
        if teacher_hidden is not None:
            teacher_dtype = _gemm_dtype(teacher_hidden, teacher_weight, config)
            teacher_hidden, teacher_weight = teacher_hidden.to(teacher_dtype), teacher_weight.to(teacher_dtype)

        # Kept as tensors: no host sync, and zero counted tokens gives loss 0 instead of 0/0.
        n_counted = (targets != config.ignore_index).sum()
        grad_scale = 1.0 / n_counted.clamp(min=1).to(row_dtype)
        ce_sum = torch.zeros((), dtype=row_dtype, device=hidden.device)
        kl_sum = torch.zeros((), dtype=row_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=row_dtype, device=weight.device) if need_grad_weight else None
        chunk_rows = _rows_triton if config.impl == "triton" else _rows_torch

        for start in range(0, hidden.shape[0], config.chunk_size):
            rows = slice(start, start + config.chunk_size)
            # GEMMs over the full padded weights (multiple-of-64 shapes are the fast ones);
            # the row math below only looks at the first vocab_size columns.
            logits = _matmul(hidden_c[rows], weight_c.T, row_dtype)
            teacher_logits = None
            if teacher_hidden is not None:
                teacher_logits = _matmul(teacher_hidden[rows], teacher_weight.T, row_dtype)
            ce, kl = chunk_rows(logits, teacher_logits, targets[rows], grad_scale, config)  # logits := dloss/dlogits
            ce_sum += ce.sum()
            kl_sum += kl.sum()
            if per_row is not None:
                per_row[0][rows], per_row[1][rows] = ce, kl
            del teacher_logits  # free before the backward GEMMs allocate

            grad_logits = logits.to(student_dtype)
            if need_grad_hidden:
                grad_hidden[rows] = grad_logits @ weight_c
            if need_grad_weight:
                _accumulate_matmul(grad_weight, grad_logits.T, hidden_c[rows])
            # On CUDA, free this chunk's (chunk, V) buffers before the next chunk allocates its own: the
            # caching allocator hands the same blocks back, and the names would otherwise hold 1.5 logits
            # buffers more at the peak. Not on a CPU: there a freed buffer goes back to the OS and the next
            # one faults its pages in again, ~25% of the loss's time (demo SLM, 8 chunks of 64 rows).
            if logits.is_cuda:
                del logits, grad_logits

        w = config.kd_weight
        loss = ((1.0 - w) * ce_sum + w * kl_sum) * grad_scale
        return loss, ce_sum * grad_scale, kl_sum * grad_scale, grad_hidden, grad_weight


def _matmul(a, b, out_dtype):
    """a @ b with the result in out_dtype. On CUDA a 16-bit GEMM hands over its fp32
    accumulator directly, rather than rounding the logits to 16 bits and converting back."""
    if a.is_cuda and a.dtype in _HALF_DTYPES and out_dtype == torch.float32:
        return torch.mm(a, b, out_dtype=out_dtype)
    return (a @ b).to(out_dtype)


def _accumulate_matmul(out, a, b):
    """out += a @ b, out being grad_weight (fp32, or fp64) and a, b the chunk's GEMM operands.

    The sum happens inside the GEMM (cuBLAS beta = 1), so no (V, H) product is allocated: at
    V = 50304, H = 2048 that would be 393 MiB more memory and ~1.2 GB more traffic per chunk.
    16-bit operands on CUDA take addmm's out_dtype overload (16-bit product, fp32 accumulator
    and result, written over `out`); its fp32 `self` needs PyTorch 2.10 or later (the CUDA builds
    of 2.10, 2.11 and 2.13 check "self dtype must match either out_dtype or mat1 dtype"; earlier
    ones wanted a 16-bit `self`). CPUs have no out_dtype GEMMs, and 16-bit training on a CPU is
    not what this is for: there the product stays a temporary."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif a.is_cuda and a.dtype in _HALF_DTYPES and out.dtype == torch.float32:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out += _matmul(a, b, out.dtype)


def _gemm_dtype(hidden, weight, config):
    """The enclosing autocast's dtype; else 16 bits if either operand has them (bf16 activations
    from an autocast region with fp32 master weights); else the operands' common dtype."""
    if config.autocast_dtype is not None:
        return config.autocast_dtype
    for dtype in (hidden.dtype, weight.dtype):
        if dtype in _HALF_DTYPES:
            return dtype
    return torch.promote_types(hidden.dtype, weight.dtype)


def _rows_torch(logits, teacher_logits, targets, grad_scale, config):
    """
    Per-row CE and KL of one chunk (zero on ignored rows), and overwrite `logits` in place
    with d(loss)/d(logits) = (p - (1-w) onehot(y) - w q) / n_counted, zero in padded columns.
    See the comment above _salt_rows_kernel for the derivation.
    """
    vocab, w = config.vocab_size, config.kd_weight
    z = logits[:, :vocab]
    valid = targets != config.ignore_index
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)  # ignored rows: any column, masked below
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    ce = lse.squeeze(1) - z.gather(1, safe_targets).squeeze(1)

    q = None
    kl = torch.zeros_like(ce)
    if teacher_logits is not None:
        # log q = log_softmax(z_t / tau) and then log q - z, computed in place in the teacher's
        # buffer, and KL(q || p) = sum_j q_j (log q_j - z_j) + lse_s as a batched dot product:
        # the only extra (chunk, V) buffer is q itself.
        log_q = teacher_logits[:, :vocab].div_(config.temperature)
        log_q.sub_(torch.logsumexp(log_q, dim=1, keepdim=True))
        q = log_q.exp()
        log_q_minus_z = log_q.sub_(z)
        kl = (q.unsqueeze(1) @ log_q_minus_z.unsqueeze(2)).view(-1) + lse.squeeze(1)

    grad = z.sub_(lse).exp_()  # p = softmax(z_s), written over the logits
    if q is not None:
        grad.sub_(q, alpha=w)
    grad.scatter_add_(1, safe_targets, torch.full_like(lse, -(1.0 - w)))
    grad.mul_(torch.where(valid, grad_scale, 0.0).unsqueeze(1))
    logits[:, vocab:].zero_()
    return torch.where(valid, ce, 0.0), torch.where(valid, kl, 0.0)


def _rows_triton(logits, teacher_logits, targets, grad_scale, config):
    """Same contract as _rows_torch, one Triton program per row."""
    n_rows, padded_width = logits.shape
    ce = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    kl = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    has_teacher = teacher_logits is not None
    teacher = teacher_logits if has_teacher else logits  # never read without a teacher
    block_v = min(TRITON_BLOCK_V, triton.next_power_of_2(config.vocab_size))
    # Triton launches on the current CUDA device, which need not be the tensors' (a run on cuda:1)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        _salt_rows_kernel[(n_rows,)](
            logits, logits.stride(0), teacher, teacher.stride(0), targets, ce, kl, grad_scale,
            config.vocab_size, padded_width, config.ignore_index, config.kd_weight, 1.0 / config.temperature,
            HAS_TEACHER=has_teacher, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )
    return ce, kl


# Per-row math, with z = student logits row, p = softmax(z), z' = teacher logits / tau,
# q = softmax(z'), lse_s = logsumexp(z), lse_t = logsumexp(z'):
#   CE      = lse_s - z[y]
#   KL(q||p) = sum_j q_j (log q_j - log p_j) = sum_j q_j (z'_j - lse_t) - sum_j q_j (z_j - lse_s)
#            = sum_j q_j (z'_j - z_j) + lse_s - lse_t               (sum_j q_j = 1)
#   d/dz [(1-w) CE + w KL] = (1-w)(p - onehot(y)) + w (p - q) = p - (1-w) onehot(y) - w q
# and the loss is a mean, so the gradient is divided by the number of counted tokens.
# Pass 1 walks the vocabulary once with online softmaxes: running max m and running sum
# d = sum_j exp(x_j - m); when m grows, d is rescaled by exp(m_old - m_new). The KL needs
# sum_j q_j (z'_j - z_j) = a / d_t with a = sum_j exp(z'_j - m_t) (z'_j - z_j), rescaled like d_t.
# Keeping z' - z together (rather than two sums of magnitude |z|) avoids cancellation when the
# teacher and student agree. Pass 2 rereads the row and writes the gradient over it.
if triton is not None:

    @triton.jit
    def _salt_rows_kernel(logits_ptr, logits_stride, teacher_ptr, teacher_stride, targets_ptr, ce_ptr, kl_ptr,
                          grad_scale_ptr, vocab_size, padded_width, ignore_index, kd_weight, inv_temperature,
                          HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        logits_ptr += row * logits_stride
        teacher_ptr += row * teacher_stride
        target = tl.load(targets_ptr + row)

        # pass 1: online logsumexp of the student (and teacher), z[y], and the KL accumulator
        m_s = float("-inf")
        d_s = 0.0
        z_target = 0.0
        m_t = float("-inf")
        d_t = 0.0
        a_t = 0.0
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_vocab = cols < vocab_size
            z = tl.load(logits_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_s, tl.max(z, axis=0))  # finite: every block has a real column
            d_s = d_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m_s = m_new
            z_target += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
            if HAS_TEACHER:
                zt = tl.load(teacher_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_temperature
                mt_new = tl.maximum(m_t, tl.max(zt, axis=0))
                rescale = tl.exp(m_t - mt_new)
                e_t = tl.exp(zt - mt_new)
                d_t = d_t * rescale + tl.sum(e_t, axis=0)
                a_t = a_t * rescale + tl.sum(tl.where(in_vocab, e_t * (zt - z), 0.0), axis=0)
                m_t = mt_new

        lse_s = m_s + tl.log(d_s)
        valid = target != ignore_index
        ce = lse_s - z_target
        kl = 0.0
        lse_t = 0.0
        if HAS_TEACHER:
            lse_t = m_t + tl.log(d_t)
            kl = a_t / d_t + (m_s - m_t) + tl.log(d_s / d_t)  # = a/d_t + lse_s - lse_t, no large terms
        tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
        tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))

        # pass 2: gradient over the whole padded row (padded columns get exactly 0)
        row_scale = tl.where(valid, tl.load(grad_scale_ptr).to(tl.float32), 0.0)
        for start in range(0, padded_width, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_vocab = cols < vocab_size
            z = tl.load(logits_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
            grad = tl.exp(z - lse_s) - tl.where(cols == target, 1.0 - kd_weight, 0.0)
            if HAS_TEACHER:
                zt = tl.load(teacher_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32) * inv_temperature
                grad -= kd_weight * tl.exp(zt - lse_t)
            tl.store(logits_ptr + cols, (grad * row_scale).to(logits_ptr.dtype.element_ty), mask=cols < padded_width)
