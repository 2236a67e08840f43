"""
The student's loss: its definition in plain PyTorch, and the fast implementation that training runs.

SALT (arXiv 2410.18779) trains the student for the first kd_steps steps on, token by token,
    (1 - w) * CE(softmax(z_s), next token) + w * D(softmax(z_t / tau), softmax(z_s))        (`mix`)
with D = KL(teacher || student) in the paper, and on the CE alone afterwards. `salt_loss_reference` is that
definition on full logits; D is `kd_loss`, a plain function of a chunk's log-probabilities: the paper's
forward KL, the reverse KL and a Jensen-Shannon divergence below, or yours, its parameters given in the name
('jsd:beta=0.3'). w may vary by the token, w * g(teacher, target) (`kd_token_weight`: TOKEN_WEIGHTS).

`salt_loss` computes the same loss and its gradients without ever holding the (tokens x vocab) logits, which
dominate memory at V = 50257: per chunk of tokens it computes the logits (the LM head GEMM), each row's loss
and d(loss)/d(logits), and turns them at once into grad_hidden[chunk] and a contribution to grad_weight. The
gradients are computed in the forward; the backward only scales them by grad_output. The per-row step exists
three ways (`impl`), each tested against the reference:
- 'autograd': any divergence and token weight, its gradient by autograd on one chunk's logits;
- 'torch': the forward KL, its gradient derived by hand (below) and computed in place (the CPU's default);
- 'triton': the same as a Triton kernel with an online softmax (the GPU's default).
The two derived by hand are checked against the definition once per process and autocast dtype, on small inputs on
the device, the first time they would be chosen (`disagreement`): one that disagrees there (an edited divergence,
a kernel that misbehaves on that GPU or that Triton) is not used, and a line says so.
"""

import ast
import contextlib
import functools
import inspect
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths work without triton
    triton = None

# ----------------------------------------------------------------------------------------------------------
# The definition. A divergence is a function of one chunk's log-probabilities, the student's log_softmax(z_s)
# and the teacher's log_softmax(z_t / tau), (rows, V) each, and the targets (rows,); it returns one value a
# row. Log-probabilities rather than raw logits, so that the CE and the KD term share one log_softmax.


def forward_kl(log_p, log_q, targets):
    """KL(q || p), q the teacher's distribution, p the student's: the paper's KD term, mass-covering."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def reverse_kl(log_p, log_q, targets):
    """KL(p || q): mode-seeking, the student puts its mass where the teacher's is (MiniLLM, Gu et al.)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def jsd(log_p, log_q, targets, beta=0.5):
    """The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), 0 < beta < 1:
    beta KL(q || m) + (1 - beta) KL(p || m) with m = beta q + (1 - beta) p; bounded by log 2 at beta = 0.5."""
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1 - beta))
    return beta * forward_kl(log_m, log_q, targets) + (1 - beta) * reverse_kl(log_p, log_m, targets)


DIVERGENCES = {'forward_kl': forward_kl, 'reverse_kl': reverse_kl, 'jsd': jsd}  # kd_loss names one of these


def divergence(kd_loss):
    """The divergence of a kd_loss: its name in DIVERGENCES, then its keyword arguments if it has any, 'jsd:beta=0.3'
    (numbers as Python literals). A ValueError names what is wrong."""
    name, _, arguments = kd_loss.partition(':')
    if name not in DIVERGENCES:
        raise ValueError(f"kd_loss={kd_loss!r}: the divergences are {', '.join(DIVERGENCES)} (losses.DIVERGENCES)")
    settable = list(inspect.signature(DIVERGENCES[name]).parameters)[3:]  # after log_p, log_q, targets
    values = {}
    for item in filter(None, arguments.split(',')):
        key, _, text = item.partition('=')
        if key not in settable:
            raise ValueError(f"kd_loss={kd_loss!r}: {name} takes {', '.join(settable) or 'no arguments'}, not {key!r}")
        try:
            values[key] = ast.literal_eval(text)
        except (SyntaxError, ValueError) as error:
            raise ValueError(f"kd_loss={kd_loss!r}: {key}={text!r} is not a number") from error
    return functools.partial(DIVERGENCES[name], **values)


# A token's share of KD, w_t = w * g(log_q, targets), g a function of the teacher's log-probabilities (at tau) and
# the targets, in [0, 1], no gradient: the paper's theory trades the soft labels' bias (where the teacher is
# wrong) against their variance; these use them more where the teacher is sure, or right. kd_token_weight names one.
def teacher_confidence(log_q, targets):
    """The teacher's probability of its own first choice."""
    return log_q.amax(-1).exp()


def teacher_on_target(log_q, targets):
    """The teacher's probability of the true next token: exp(-its CE)."""
    return log_q.gather(-1, targets.clamp(min=0)[:, None])[:, 0].exp()


TOKEN_WEIGHTS = {'constant': None, 'confidence': teacher_confidence, 'on_target': teacher_on_target}


def mix(ce, kd, w):
    """A token's loss from its two terms, the one definition every implementation computes: (1 - w) CE + w D (the
    gradients derived by hand below are its derivative)."""
    return (1 - w) * ce + w * kd


def token_weights(kd_weight, kd_token_weight, log_q, targets):
    """w, or w * g per row for a kd_token_weight other than 'constant' (TOKEN_WEIGHTS)."""
    g = TOKEN_WEIGHTS[kd_token_weight]
    return kd_weight if g is None else kd_weight * g(log_q, targets).detach()


def salt_loss_reference(student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None, *,
                        kd_weight=0.0, temperature=1.0, vocab_size=None, ignore_index=-1,
                        kd_loss='forward_kl', kd_token_weight='constant'):
    """(loss, ce, kd): the mean over the counted positions (target != ignore_index) of (1 - w) CE + w D (`mix`),
    and of its two terms, detached. Full (tokens, V) logits and autograd: what salt_loss must equal."""
    hidden, targets = student_hidden.reshape(-1, student_hidden.shape[-1]), targets.reshape(-1)
    vocab = vocab_size or student_weight.shape[0]  # the weights' rows beyond it only pad the vocabulary
    softmax_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, whatever the GEMM's
    log_p = F.log_softmax((hidden @ student_weight.T)[:, :vocab].to(softmax_dtype), dim=-1)
    ce = F.nll_loss(log_p, targets, ignore_index=ignore_index, reduction='none')
    kd, w = torch.zeros_like(ce), kd_weight
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher_logits = (teacher_hidden.reshape(len(targets), -1) @ teacher_weight.T)[:, :vocab]
            log_q = F.log_softmax(teacher_logits.to(log_p.dtype) / temperature, dim=-1)
        kd = divergence(kd_loss)(log_p, log_q, targets)
        w = token_weights(kd_weight, kd_token_weight, log_q, targets)
    valid = targets != ignore_index
    n_counted = valid.sum().clamp(min=1)
    loss = (mix(ce, kd, w) * valid).sum() / n_counted
    return loss, ((ce * valid).sum() / n_counted).detach(), ((kd * valid).sum() / n_counted).detach()


# ----------------------------------------------------------------------------------------------------------
# The fast path: chunks of tokens


def salt_loss(student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None, *,
              kd_weight=0.0, temperature=1.0, vocab_size=None, ignore_index=-1, kd_loss='forward_kl',
              kd_token_weight='constant', chunk_size=None, impl=None, reduction='mean'):
    """salt_loss_reference's (loss, ce, kd), chunk_size tokens at a time. student_hidden (N, H) or (B, T, H),
    student_weight (V_padded, H), targets (N,) or (B, T); the teacher's (N, H_t) and (V_padded_t, H_t) get no
    gradients, and with them the KD term is computed (and returned) even if kd_weight is 0. impl: None (the
    first of 'triton' on CUDA and 'torch' that agrees with the definition on this device, for the forward KL at
    a constant w; else 'autograd'), 'torch', 'triton' or 'autograd'. reduction='none' (evaluation, no
    gradients): per position (ce, kd) shaped like targets, 0 where ignored."""
    if torch.compiler.is_compiling() and student_hidden.device.type in _LOSS_OUTSIDE_COMPILE:
        return _LOSS_OUTSIDE_COMPILE[student_hidden.device.type](  # compile_loss_or_not found it cannot compile
            student_hidden, student_weight, targets, teacher_hidden, teacher_weight, kd_weight=kd_weight,
            temperature=temperature, vocab_size=vocab_size, ignore_index=ignore_index, kd_loss=kd_loss,
            kd_token_weight=kd_token_weight, chunk_size=chunk_size, impl=impl, reduction=reduction)
    _check_arguments(student_hidden, student_weight, targets, teacher_hidden, teacher_weight, kd_weight,
                     temperature, vocab_size, kd_loss, kd_token_weight, reduction)
    hidden, positions = student_hidden.reshape(-1, student_hidden.shape[-1]), targets.shape
    targets = targets.reshape(-1).long()
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.detach().reshape(len(targets), -1)
        teacher_weight = teacher_weight.detach()
    device, padded_vocab = hidden.device, student_weight.shape[0]
    # w reaches the arithmetic as a tensor: under torch.compile a Python float that changes every step (the
    # linear schedule) would be a guard, and each new value a recompilation of the whole forward. A number is
    # filled on the device: torch.as_tensor(w, device='cuda') would be a blocking copy, the CPU waiting for the GPU
    kd_weight = kd_weight.to(device, torch.float32) if isinstance(kd_weight, torch.Tensor) else \
        torch.full((), kd_weight, dtype=torch.float32, device=device)
    autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    config = _LossConfig(
        temperature=float(temperature), vocab_size=vocab_size or padded_vocab, ignore_index=ignore_index,
        kd_loss=kd_loss, kd_token_weight=kd_token_weight,
        impl=_pick_impl(impl, kd_loss, kd_token_weight, device, autocast_dtype),
        chunk_size=chunk_size or default_chunk_size(len(hidden), hidden.shape[1], padded_vocab, device.type),
        autocast_dtype=autocast_dtype)
    if reduction == 'none':
        per_row = [torch.zeros(len(hidden), dtype=torch.float32, device=device) for _ in range(2)]
        with torch.no_grad():
            _fused_forward(hidden, student_weight, targets, teacher_hidden, teacher_weight, kd_weight, config,
                           need_grad_hidden=False, need_grad_weight=False, per_row=per_row)
        return tuple(rows.view(positions) for rows in per_row)
    if torch.is_grad_enabled() and (hidden.requires_grad or student_weight.requires_grad):
        return _SaltLossFunction.apply(hidden, student_weight, targets, teacher_hidden, teacher_weight,
                                       kd_weight, config)
    # evaluation: skip the backward GEMMs (autograd.Function would not tell us)
    return _fused_forward(hidden, student_weight, targets, teacher_hidden, teacher_weight, kd_weight, config,
                          need_grad_hidden=False, need_grad_weight=False)[:3]


_LOSS_OUTSIDE_COMPILE = {}  # device type -> salt_loss under torch.compiler.disable, where it could not be compiled


def compile_loss_or_not(device, kd_loss='forward_kl', autocast_dtype=None, backend='inductor',
                        kd_token_weight='constant'):
    """Whether a whole-model torch.compile may compile salt_loss on `device`, decided once at start-up by
    compiling it (forward and backward, with a teacher, under the run's autocast) on a tiny input, where a
    failure costs seconds rather than the run: inductor has never seen some of what it holds (the Triton launch,
    out_dtype GEMMs) on every PyTorch version. If it fails, salt_loss runs outside every compiled graph from
    then on (torch.compiler.disable: the model around it stays compiled). Returns the choice in words."""
    device = torch.device(device)
    _LOSS_OUTSIDE_COMPILE.pop(device.type, None)
    generator = torch.Generator().manual_seed(0)
    hidden, weight, teacher_hidden, teacher_weight = (
        torch.randn(shape, generator=generator).to(device) for shape in ((64, 32), (128, 32), (64, 16), (128, 16)))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    targets = torch.randint(0, 100, (64,), generator=generator).to(device)
    if autocast_dtype is not None:  # a frozen teacher is kept in the compute dtype (train.py)
        teacher_hidden, teacher_weight = teacher_hidden.to(autocast_dtype), teacher_weight.to(autocast_dtype)

    def loss(*inputs):
        return salt_loss(*inputs, kd_weight=torch.tensor(0.5, device=device), vocab_size=100, kd_loss=kd_loss,
                         kd_token_weight=kd_token_weight)[0]
    try:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            torch.compile(loss, backend=backend)(hidden, weight, targets, teacher_hidden, teacher_weight).backward()
    except Exception as error:  # whatever inductor raises: the run goes on with the loss uncompiled
        error = getattr(error, 'inner_exception', None) or error  # dynamo's wrapper says only which backend
        _LOSS_OUTSIDE_COMPILE[device.type] = torch.compiler.disable(salt_loss)  # a graph break: runs as in eager
        reason = f"{type(error).__name__}: {error}".split('\n')[0][:200]
        return f"salt_loss runs outside the compiled graph (compiling it failed: {reason})"
    return "salt_loss is compiled with the model"


def choice(device, kd_loss='forward_kl', kd_token_weight='constant', autocast_dtype=None):
    """What salt_loss runs on `device` for this loss under the run's autocast dtype (None: fp32), in words, each
    hand-derived path that would be chosen checked first (disagreement): the line a run prints at start and keeps
    in its metrics header. Called before anything is compiled, it also probes the out_dtype GEMMs, so that a
    compiled graph reads the answer rather than assuming there are none (out_dtype_gemm)."""
    device = torch.device(device)
    out_dtype_gemm(device)
    impl = _pick_impl(None, kd_loss, kd_token_weight, device, autocast_dtype)
    refused = [f"impl={path!r} is not used: {reason}" for (path, device_type, dtype), reason in _DISAGREEMENTS.items()
               if reason and device_type == device.type and dtype == autocast_dtype]
    return '; '.join([f"salt_loss runs impl={impl!r} for kd_loss={kd_loss!r}, kd_token_weight={kd_token_weight!r}",
                      *refused])


def describe_choices(device):
    """What salt_loss runs on `device` unless told otherwise, in words (for a benchmark's record)."""
    impl = _pick_impl(None, 'forward_kl', 'constant', device)
    version = f" (triton {triton.__version__})" if impl == 'triton' else ''
    gemm = ('16-bit GEMMs accumulate into fp32 (out_dtype)' if out_dtype_gemm(device)
            else '16-bit GEMMs round, then convert to fp32 (no out_dtype GEMM here)')
    chunks = f"{default_chunk_size(1, 1, 50304, 'cuda')} rows at V = 50,304" if device.type == 'cuda' else \
        '64 to 2048 rows'
    return f"forward_kl by impl={impl!r}{version}, other divergences by 'autograd', chunks of {chunks}; {gemm}"


_OUT_DTYPE_GEMM = {}  # 'cuda:N' -> whether mm/addmm take out_dtype there: probed once, then a constant


def out_dtype_gemm(device):
    """Whether this PyTorch build's mm and addmm take out_dtype=float32 for bf16 operands on `device` (CUDA,
    PyTorch 2.10 or later). Probed by a tiny call the first time, outside any compiled region (describe_choices
    at start-up): a compiled graph only reads the answer; one that finds none takes the fp32 product path."""
    device = torch.device(device)
    if device.type != 'cuda':
        return False
    # one key per GPU: 'cuda' (a run's setting) and 'cuda:0' (a tensor's device, all a compiled graph sees) are one
    key = f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    if key not in _OUT_DTYPE_GEMM and not torch.compiler.is_compiling():
        _OUT_DTYPE_GEMM[key] = _probe_out_dtype_gemm(device)
    return _OUT_DTYPE_GEMM.get(key, False)


def _probe_out_dtype_gemm(device):
    """Whether the out_dtype GEMMs exist and compute what _accumulate_matmul needs: addmm adds the product into an
    fp32 output of ones (an output of zeros could not tell a GEMM that overwrites it: grad_weight would hold the
    last chunk's share alone, in every path, the autograd fallback's too), and mm's product is fp32."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        out = torch.ones(2, 2, device=device)
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        product = torch.mm(a, a, out_dtype=torch.float32)
        return product.dtype == torch.float32 and bool((out == 3).all()) and bool((product == 2).all())
    except (RuntimeError, TypeError, NotImplementedError):  # an older build, or one without the kernels
        return False


CUDA_CHUNK_BYTES = 2 ** 31  # a chunk's buffers on a GPU: the fp32 logits and teacher logits, the 16-bit gradient


def default_chunk_size(n_rows, hidden_size, padded_vocab, device_type):
    """
    Token rows per chunk. On a GPU, as many as keep a chunk's buffers (10 bytes a logit) within CUDA_CHUNK_BYTES
    (2 GiB, a few percent of an 80 GB GPU), a power of two from 256 to 16,384: 4,096 at V = 50,304. Every chunk
    rereads the weights in its GEMMs and adds its share into the fp32 grad_weight, read and written whole (824 MB
    at V = 50,304, H = 2,048): fewer, longer chunks move fewer bytes (bench.py models them). On a CPU, where the
    fallback is about memory: enough that one chunk of logits is about as large as the hidden states, 64 to 2048
    rows (~13 MiB per fp32 buffer at V = 50k).
    """
    if device_type == 'cuda':
        rows = CUDA_CHUNK_BYTES // (10 * padded_vocab)
        return max(256, min(16384, 1 << (max(rows, 1).bit_length() - 1)))
    rows = -(-n_rows * hidden_size // padded_vocab)
    return max(64, min(2048, 1 << (rows - 1).bit_length()))


@dataclass(frozen=True)
class _LossConfig:  # what stays the same for a whole run (kd_weight changes by the step: a tensor apart)
    temperature: float
    vocab_size: int
    ignore_index: int
    kd_loss: str
    kd_token_weight: str
    chunk_size: int
    impl: str
    autocast_dtype: torch.dtype | None  # GEMM dtype forced by an enclosing autocast region


def _check_arguments(student_hidden, student_weight, targets, teacher_hidden, teacher_weight, kd_weight,
                     temperature, vocab_size, kd_loss, kd_token_weight, reduction):
    """A ValueError naming the argument that makes no sense. A tensor kd_weight (training, where it changes
    by the step) is the caller's to check: reading its value would sync and break a compiled graph."""
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("pass both teacher_hidden and teacher_weight, or neither")
    if isinstance(kd_weight, torch.Tensor):
        kd_weight = 0.0 if teacher_hidden is None else 0.5  # stands for "some valid weight" below
    if teacher_hidden is None and kd_weight != 0:
        raise ValueError(f"kd_weight={kd_weight} needs a teacher: pass teacher_hidden and teacher_weight")
    if targets.numel() * student_hidden.shape[-1] != student_hidden.numel():
        raise ValueError(f"targets has {targets.numel()} positions, student_hidden "
                         f"{tuple(student_hidden.shape)}")
    for name, weight in (('student_weight', student_weight), ('teacher_weight', teacher_weight)):
        if weight is not None and (vocab_size or 0) > weight.shape[0]:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {weight.shape[0]} rows of {name}")
    for name, value, ok, expected in [
            ('kd_weight', kd_weight, 0.0 <= kd_weight <= 1.0, 'in [0, 1]'),
            ('temperature', temperature, temperature > 0, 'positive'),
            ('kd_token_weight', kd_token_weight, kd_token_weight in TOKEN_WEIGHTS,
             f"one of {', '.join(TOKEN_WEIGHTS)}"),
            ('reduction', reduction, reduction in ('mean', 'none'), "'mean' or 'none'")]:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {value!r}")
    divergence(kd_loss)  # a ValueError for a divergence or an argument that does not exist


def _pick_impl(impl, kd_loss, kd_token_weight, device, autocast_dtype=None):
    """The row step: impl, checked; or, for impl=None, the first fast path that computes this loss and agrees with
    the definition on this device under this autocast dtype (disagreement), else autograd, the definition's own
    derivative."""
    by_hand = kd_loss == 'forward_kl' and kd_token_weight == 'constant'  # what the torch and triton paths compute
    if impl is None:
        fast = (['triton'] if device.type == 'cuda' and triton is not None else []) + ['torch']
        return next((path for path in fast if by_hand and disagreement(path, device, autocast_dtype) is None),
                    'autograd')
    if impl not in ('torch', 'triton', 'autograd'):
        raise ValueError(f"impl must be None, 'torch', 'triton' or 'autograd', got {impl!r}")
    if impl != 'autograd' and not by_hand:
        raise ValueError(f"impl={impl!r} computes the forward KL at a constant w only: kd_loss={kd_loss!r} with "
                         f"kd_token_weight={kd_token_weight!r} takes impl='autograd'")
    if impl == 'triton' and triton is None:
        raise ValueError("impl='triton' but triton is not installed")
    return impl


_DISAGREEMENTS = {}  # (impl, device type, autocast dtype) -> None where the path computes the definition, else why not


def disagreement(impl, device, autocast_dtype=None):
    """Why the hand-derived path `impl` does not compute the definition on `device` (None: it does), found once per
    process and autocast dtype (None: fp32), the first time it would be chosen, on the two inputs of CHECKS against
    salt_loss_reference in float64. A path that disagrees, or raises, is said to in one line on stderr and not
    chosen. Under torch.compile, where nothing can be tried, the answer found before is used (train.py asks before
    it compiles), or the path is trusted."""
    key = (impl, torch.device(device).type, autocast_dtype)
    if key not in _DISAGREEMENTS:
        if torch.compiler.is_compiling():
            return None
        # wherever the first call comes from: an evaluation under no_grad or inference_mode, an autocast region
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
            _DISAGREEMENTS[key] = next(filter(None, (_compare_with_the_definition(impl, torch.device(device), check)
                                                     for check in _checks(device, autocast_dtype))), None)
        if _DISAGREEMENTS[key]:
            print(f"salt_loss: impl={impl!r} is not used on {key[1]}: {_DISAGREEMENTS[key]}", file=sys.stderr)
    return _DISAGREEMENTS[key]


@dataclass(frozen=True)
class _Check:
    """One input a fast path is checked on, and how close to float64 it must come."""
    name: str
    rows: int
    hidden: int
    vocab: int
    padded_vocab: int
    chunk_size: int
    dtype: torch.dtype | None  # the autocast dtype (None: fp32)
    exact_fp32_gemms: bool  # TF32 off: the GEMMs' own rounding (~1e-3 with TF32) kept out of a check of a formula
    tolerance: float  # of the loss and of each gradient, relative to its largest entry


def _checks(device, autocast_dtype):
    """The formula: a vocabulary of three Triton blocks (TRITON_BLOCK_V = 4096, the last one partial), so that the
    online softmax's rescaling from block to block is exercised, in chunks with a partial last one, fp32 GEMMs in
    full precision, within fp32's rounding of ten thousand terms (~1e-6 measured; a wrong formula is off by ~1, a
    kernel that drops one rescaling by ~0.1). The variant that trains: the same vocabulary at its width and
    warps under the run's autocast and GEMM settings, within their rounding. Where 16-bit GEMMs hand over fp32
    (out_dtype_gemm) and in fp32 runs, d(loss)/d(logits) rounded to 16 bits, and the 16-bit gradient (2^-9 each)
    summed over a vocabulary of terms whose absolute sum is a few times the largest entry (~4e-3 measured on a
    GPU); TF32 GEMMs in fp32 runs round their inputs to 2^-11 (~2e-3 measured): 0.02 allowed. Where the logits
    are rounded to 16 bits too (no out_dtype GEMM: a CPU, an older PyTorch), three roundings: ~2^-5 (0.014
    measured on a CPU), 0.1 allowed."""
    rounded_logits = autocast_dtype in _HALF_DTYPES and not out_dtype_gemm(device)
    return (_Check('the formula', 96, 16, 10_000, 10_048, 32, None, True, 1e-4),
            _Check('the variant that trains', 80, 32, 10_000, 10_048, 64, autocast_dtype, False,
                   0.1 if rounded_logits else 0.02))


@contextlib.contextmanager
def _fp32_gemms(exact):
    """fp32 GEMMs without TF32 while exact is set (train.py turns TF32 on for CUDA)."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed and not exact
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def _compare_with_the_definition(impl, device, check):
    """Why `impl` is off the definition on `check` (None: it is within the check's tolerance): the loss, its CE and
    KD terms and the student's gradients, each apart, with a teacher, ignored targets, w = 0.6 and tau = 1.5, against
    float64 on the same operands (rounded to the autocast dtype first, as the run's GEMMs see them)."""
    generator = torch.Generator().manual_seed(0)
    shapes = dict(student_hidden=(check.rows, check.hidden), student_weight=(check.padded_vocab, check.hidden),
                  teacher_hidden=(check.rows, check.hidden // 2), teacher_weight=(check.padded_vocab, check.hidden // 2))
    inputs = {name: torch.randn(shape, generator=generator).to(check.dtype or torch.float32).double()
              for name, shape in shapes.items()}
    targets = torch.randint(0, check.vocab, (check.rows,), generator=generator)
    targets[::7] = -1
    settings = dict(vocab_size=check.vocab, temperature=1.5, kd_weight=0.6)
    results = []
    for dtype, run_on, loss_fn in ((torch.float64, 'cpu', salt_loss_reference), (torch.float32, device, salt_loss)):
        x = {name: t.to(run_on, dtype, copy=True).requires_grad_(name.startswith('student'))
             for name, t in inputs.items()}
        extra = dict(impl=impl, chunk_size=check.chunk_size, kd_weight=torch.tensor(0.6, device=run_on)) \
            if loss_fn is salt_loss else {}
        try:
            with _fp32_gemms(check.exact_fp32_gemms), torch.autocast(
                    torch.device(run_on).type, dtype=check.dtype, enabled=check.dtype is not None and loss_fn is salt_loss):
                loss, ce, kd = loss_fn(**x, targets=targets.to(run_on), **{**settings, **extra})
            loss.backward()
        except Exception as error:  # a kernel that does not compile or launch here: the reason, in a line
            return f"it raised {type(error).__name__} on {check.name}: {str(error).strip().splitlines()[0][:200]}"
        results.append([t.detach().double().cpu() for t in (loss, ce, kd, x['student_hidden'].grad,
                                                             x['student_weight'].grad)])
    # each term apart: a fault in the KD term alone is diluted in the loss by its weight
    names = ('loss', 'CE', 'KD term', 'gradient of the hidden states', 'gradient of the weights')
    errors = {name: ((ours - want).abs().max() / want.abs().max()).item() for name, want, ours in zip(names, *results)}
    name, worst = max(errors.items(), key=lambda item: math.inf if math.isnan(item[1]) else item[1])
    if not worst <= check.tolerance:
        return f"its {name} is off the definition's (losses.salt_loss_reference) by {worst:.2g} of its size on " \
               f"{check.name}, where {check.tolerance:g} is allowed"
    return None


class _SaltLossFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, teacher_weight, kd_weight, config):
        loss, ce_mean, kd_mean, grad_hidden, grad_weight = _fused_forward(
            hidden, weight, targets, teacher_hidden, teacher_weight, kd_weight, config,
            need_grad_hidden=ctx.needs_input_grad[0], need_grad_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.backward_done = False
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return loss, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss, grad_ce_unused, grad_kd_unused):
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
        return grad_hidden, grad_weight, None, None, None, None, None


def _fused_forward(hidden, weight, targets, teacher_hidden, teacher_weight, kd_weight, config, need_grad_hidden,
                   need_grad_weight, per_row=None):
    """Loop over token chunks; returns the loss, its two terms and the (not yet grad_output-scaled) grads, and
    writes each row's CE and KD term into per_row = [ce, kd] when given."""
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
        kd_sum = torch.zeros((), dtype=row_dtype, device=hidden.device)
        mixed_sum = torch.zeros((), dtype=row_dtype, device=hidden.device)  # per-token weights: the loss itself
        grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=row_dtype, device=weight.device) if need_grad_weight else None
        chunk_rows = dict(torch=_rows_torch, triton=_rows_triton, autograd=_rows_autograd)[config.impl]

        for start in range(0, hidden.shape[0], config.chunk_size):
            rows = slice(start, start + config.chunk_size)
            # GEMMs over the full padded weights (multiple-of-64 shapes are the fast ones);
            # the row math below only looks at the first vocab_size columns.
            logits = _matmul(hidden_c[rows], weight_c.T, row_dtype)
            teacher_logits = None
            if teacher_hidden is not None:
                teacher_logits = _matmul(teacher_hidden[rows], teacher_weight.T, row_dtype)
            ce, kd, w_rows, grad_logits = chunk_rows(logits, teacher_logits, targets[rows], grad_scale, kd_weight,
                                                     config, student_dtype)
            ce_sum += ce.sum()
            kd_sum += kd.sum()
            if w_rows is not None:
                mixed_sum += mix(ce, kd, w_rows).sum()
            if per_row is not None:
                per_row[0][rows], per_row[1][rows] = ce, kd
            del teacher_logits  # free before the backward GEMMs allocate

            if need_grad_hidden:
                grad_hidden[rows] = grad_logits @ weight_c
            if need_grad_weight:
                _accumulate_matmul(grad_weight, grad_logits.T, hidden_c[rows])
            # On CUDA, free this chunk's (chunk, V) buffers before the next chunk allocates its own: the
            # caching allocator hands the same blocks back, and the names would otherwise hold 1.5 logits
            # buffers more at the peak. Not on a CPU: there a freed buffer goes back to the OS and the next
            # one would fault its pages in again.
            if logits.is_cuda:
                del logits, grad_logits

        constant = config.kd_token_weight == 'constant' or teacher_hidden is None
        loss = (mix(ce_sum, kd_sum, kd_weight.to(row_dtype)) if constant else mixed_sum) * grad_scale
        return loss, ce_sum * grad_scale, kd_sum * grad_scale, grad_hidden, grad_weight


def _matmul(a, b, out_dtype):
    """a @ b with the result in out_dtype. On CUDA a 16-bit GEMM hands over its fp32
    accumulator directly, rather than rounding the logits to 16 bits and converting back."""
    if a.is_cuda and a.dtype in _HALF_DTYPES and out_dtype == torch.float32 and out_dtype_gemm(a.device):
        return torch.mm(a, b, out_dtype=out_dtype)
    return (a @ b).to(out_dtype)


def _accumulate_matmul(out, a, b):
    """out += a @ b, out being grad_weight (fp32, or fp64) and a, b the chunk's GEMM operands.

    The sum happens inside the GEMM (cuBLAS beta = 1), so no (V, H) product is allocated per chunk.
    16-bit operands on CUDA take addmm's out_dtype overload (16-bit product, fp32 accumulator and
    result, written over `out`), whose fp32 `self` needs PyTorch 2.10 or later (out_dtype_gemm). CPUs have no
    out_dtype GEMMs, and 16-bit training on a CPU is not what this is for: there the product stays
    a temporary."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif a.is_cuda and a.dtype in _HALF_DTYPES and out.dtype == torch.float32 and out_dtype_gemm(a.device):
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out += _matmul(a, b, out.dtype)


_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _gemm_dtype(hidden, weight, config):
    """The enclosing autocast's dtype; else 16 bits if either operand has them (bf16 activations
    from an autocast region with fp32 master weights); else the operands' common dtype."""
    if config.autocast_dtype is not None:
        return config.autocast_dtype
    for dtype in (hidden.dtype, weight.dtype):
        if dtype in _HALF_DTYPES:
            return dtype
    return torch.promote_types(hidden.dtype, weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# One chunk's rows: each returns the rows' CE and KD term (zero on ignored rows), their w (None: the constant one)
# and d(loss)/d(logits) / n_counted in grad_dtype (the backward GEMMs' operand), zero in the padded columns, written
# over `logits` where grad_dtype is theirs.


def _rows_autograd(logits, teacher_logits, targets, grad_scale, kd_weight, config, grad_dtype):
    """Any divergence: the rows' loss as salt_loss_reference defines it, differentiated by autograd; only this
    chunk's (rows, V) tensors are ever alive."""
    vocab, w, w_rows = config.vocab_size, kd_weight.to(logits.dtype), None
    valid = targets != config.ignore_index
    z = logits[:, :vocab].detach().requires_grad_()
    with torch.enable_grad():
        log_p = F.log_softmax(z, dim=-1)
        ce = F.nll_loss(log_p, torch.where(valid, targets, 0), reduction='none')
        kd = torch.zeros_like(ce)
        if teacher_logits is not None:
            log_q = F.log_softmax(teacher_logits[:, :vocab].div_(config.temperature), dim=-1)
            kd = divergence(config.kd_loss)(log_p, log_q, targets)
            if config.kd_token_weight != 'constant':
                w = w_rows = token_weights(w, config.kd_token_weight, log_q, targets)
        grad, = torch.autograd.grad(mix(ce, kd, w), z, torch.where(valid, grad_scale, 0.0))
    logits[:, :vocab] = grad
    logits[:, vocab:].zero_()
    return torch.where(valid, ce.detach(), 0.0), torch.where(valid, kd.detach(), 0.0), w_rows, logits.to(grad_dtype)


def _rows_torch(logits, teacher_logits, targets, grad_scale, kd_weight, config, grad_dtype):
    """The forward KL, its gradient by hand (see the comment above _salt_rows_kernel for the
    derivation): d(loss)/d(logits) = (p - (1-w) onehot(y) - w q) / n_counted."""
    vocab, w = config.vocab_size, kd_weight.to(logits.dtype)
    z = logits[:, :vocab]
    valid = targets != config.ignore_index
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)  # ignored rows: any column, masked below
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    ce = lse.squeeze(1) - z.gather(1, safe_targets).squeeze(1)

    q = None
    kl = torch.zeros_like(ce)
    if teacher_logits is not None:
        # log q = log_softmax(z_t / tau), then q (log q - z), in place in the teacher's buffer, summed:
        # KL(q || p) = sum_j q_j (log q_j - z_j) + lse_s. The only extra (chunk, V) buffer is q itself, and the
        # sum is elementwise fp32 (a batched dot product would be a TF32 GEMM on CUDA, on nearly equal terms).
        log_q = teacher_logits[:, :vocab].div_(config.temperature)
        log_q.sub_(torch.logsumexp(log_q, dim=1, keepdim=True))
        q = log_q.exp()
        kl = log_q.sub_(z).mul_(q).sum(dim=1) + lse.squeeze(1)

    grad = z.sub_(lse).exp_()  # p = softmax(z_s), written over the logits
    if q is not None:
        grad.addcmul_(q, w, value=-1.0)  # w a tensor: sub_'s alpha takes numbers only; no (chunk, V) temporary
    grad.scatter_add_(1, safe_targets, (w - 1.0).expand_as(lse))
    grad.mul_(torch.where(valid, grad_scale, 0.0).unsqueeze(1))
    logits[:, vocab:].zero_()
    return torch.where(valid, ce, 0.0), torch.where(valid, kl, 0.0), None, logits.to(grad_dtype)


def _rows_triton(logits, teacher_logits, targets, grad_scale, kd_weight, config, grad_dtype):
    """The forward KL in a Triton kernel, one program per row. It writes the gradient in grad_dtype itself: a
    16-bit one in a buffer of its own, as the GEMMs read it, rather than over the fp32 logits and then converted,
    which would pass over the fp32 logits twice more."""
    n_rows, padded_width = logits.shape
    ce = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    kl = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad = logits if grad_dtype == logits.dtype else torch.empty(logits.shape, dtype=grad_dtype, device=logits.device)
    has_teacher = teacher_logits is not None
    teacher = teacher_logits if has_teacher else logits  # never read without a teacher
    block_v = min(TRITON_BLOCK_V, triton.next_power_of_2(config.vocab_size))
    # Triton launches on the current CUDA device, which need not be the tensors' (a run on cuda:1)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        _salt_rows_kernel[(n_rows,)](
            logits, logits.stride(0), teacher, teacher.stride(0), grad, grad.stride(0), targets, ce, kl, grad_scale,
            config.vocab_size, padded_width, config.ignore_index, kd_weight, 1.0 / config.temperature,
            HAS_TEACHER=has_teacher, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )
    return ce, kl, None, grad


# Vocabulary block walked by one Triton program step. A module attribute so tests can shrink it
# and exercise the online softmax over many blocks with a tiny vocabulary.
TRITON_BLOCK_V = 4096

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
# teacher and student agree. Pass 2 rereads the row and writes the gradient, in the GEMMs' dtype (over the
# logits where that is theirs).
if triton is not None:

    @triton.jit
    def _salt_rows_kernel(logits_ptr, logits_stride, teacher_ptr, teacher_stride, grad_ptr, grad_stride, targets_ptr,
                          ce_ptr, kl_ptr, grad_scale_ptr, vocab_size, padded_width, ignore_index, kd_weight_ptr,
                          inv_temperature, HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kd_weight = tl.load(kd_weight_ptr)  # a pointer, not a number: w changes by the step without a host sync
        logits_ptr += row * logits_stride
        teacher_ptr += row * teacher_stride
        grad_ptr += row * grad_stride
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
            tl.store(grad_ptr + cols, (grad * row_scale).to(grad_ptr.dtype.element_ty), mask=cols < padded_width)
