"""
The network: a GPT in the GPT-2 architecture (pre-LayerNorm blocks, learned positions, GELU MLP, tied
input/output embeddings), written to be read in one sitting.

Two things differ from a textbook GPT because of SALT:
- forward(idx, targets, **loss_args) returns the loss of losses.salt_loss, whose KD term takes the teacher's
  final hidden states and LM head (what forward(idx, return_hidden=True) gives) and which computes the LM head
  chunk by chunk, never holding (tokens x vocab) logits;
- the vocabulary is padded to a multiple of 64 for fast GEMMs, and the padded columns never take part in a
  loss or a sample (logits() slices them off; salt_loss masks them).

That interface is LM's: a GPT is one, and so is a transformers model brought as teacher or scorer (hf_model.py),
so that training, scoring, evaluation and sampling take either.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from common import InputError
from losses import salt_loss

# The architectures: the switches below that each sets, together. GPT-2 (2019): learned positions, LayerNorm and
# biases, a GELU MLP 4x wide, one matrix to embed and to score tokens. Llama (2023; Qwen, SmolLM2, Mistral alike):
# rotary positions, RMSNorm, no biases, a SwiGLU MLP about 8/3 wide, grouped-query attention, an untied head.
ARCHITECTURES = {
    'gpt2': dict(positions='learned', norm='layernorm', mlp='gelu', bias=True, tie_embeddings=True),
    'llama': dict(positions='rope', norm='rmsnorm', mlp='swiglu', bias=False, tie_embeddings=False),
}

# Presets by name, from a CPU demo to the paper's pair (a ~1.5B teacher and a ~2.8B student): a shape, and its
# architecture where it is not GPT-2's. The paper does not publish its exact shapes: these are GPT-2/Pythia-like,
# and Llama-like in the llama family.
PRESETS = {
    'demo-slm':     dict(n_layer=2, n_head=2, n_embd=64),     # the embedded demo's small LM
    'demo-student': dict(n_layer=4, n_head=4, n_embd=128),    # the embedded demo's student, ~2x the SLM's parameters
    'gpu-slm':      dict(n_layer=6, n_head=6, n_embd=384),    # 30M: the one-GPU experiment's SLM, ~half its student
    'gpu-student':  dict(n_layer=12, n_head=8, n_embd=512),   # 64M, 59% of it in the blocks: the one-GPU student
    'gpt2-half':    dict(n_layer=6, n_head=12, n_embd=768),   # 82M: half of gpt2's blocks, a teacher in benchmarks
    'gpt2':         dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    'gpt2-medium-half': dict(n_layer=12, n_head=16, n_embd=1024),  # 204M: half of gpt2-medium's blocks, likewise
    'gpt2-medium':  dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    'gpt2-large':   dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    'gpt2-xl':      dict(n_layer=48, n_head=25, n_embd=1600),  # 1.5B: the paper's teacher size
    'salt-2.8b':    dict(n_layer=32, n_head=32, n_embd=2560),  # 2.8B: the paper's student size
    # the llama family: the demo's student in it (as large as demo-student's), and the paper's pair
    # (tied, as this family's small models are: SmolLM2, Llama 3.2 1B and 3B, Qwen2.5 up to 3B)
    'llama-demo-student': dict(architecture='llama', n_layer=4, n_head=4, n_embd=128, n_kv_head=2,
                               tie_embeddings=True),
    'llama-1.5b':   dict(architecture='llama', n_layer=28, n_head=16, n_embd=2048, n_kv_head=4, mlp_hidden=5632),
    'llama-2.8b':   dict(architecture='llama', n_layer=36, n_head=20, n_embd=2560, n_kv_head=4, mlp_hidden=6912),
}


GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # OpenAI's GPT-2 weights, via transformers


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # the tokenizer's vocabulary; the embedding is padded beyond it
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm
    # the switches, GPT-2's by default (ARCHITECTURES sets them together)
    n_kv_head: int = 0               # grouped-query attention: heads of keys and values (0 = n_head: one per head)
    positions: str = 'learned'       # 'learned' (a table of block_size rows) or 'rope' (rotary, Su et al. 2021)
    rope_theta: float = 10000.0      # rope's base: the wavelengths of its frequencies
    norm: str = 'layernorm'          # 'layernorm' or 'rmsnorm' (Zhang & Sennrich 2019)
    mlp: str = 'gelu'                # 'gelu' (GPT-2's tanh approximation) or 'swiglu' (Shazeer 2020)
    mlp_hidden: int = 0              # the MLP's inner width (0 = 4 n_embd for gelu; 8/3 n_embd, to a multiple of 64,
                                     # for swiglu: its three matrices then weigh what gelu's two 4x wide do)
    tie_embeddings: bool = True      # one matrix embeds tokens and scores them (Press & Wolf 2017)

    def __post_init__(self):
        """Refuse, naming the key, shapes that do not divide and switches that do not exist or go together."""
        rules = [
            ('positions', self.positions in ('learned', 'rope'), "'learned' or 'rope'"),
            ('norm', self.norm in ('layernorm', 'rmsnorm'), "'layernorm' or 'rmsnorm'"),
            ('mlp', self.mlp in ('gelu', 'swiglu'), "'gelu' or 'swiglu'"),
            ('n_embd', self.n_head > 0 and self.n_embd % self.n_head == 0, f"a multiple of n_head={self.n_head}"),
            ('n_kv_head', 0 <= self.n_kv_head <= self.n_head and self.n_head % self.kv_heads == 0,
             f"a divisor of n_head={self.n_head} (query heads share each key and value head)"),
            ('rope_theta', self.rope_theta > 0, '> 0'),
            ('mlp_hidden', self.mlp_hidden >= 0, '> 0 (0: the MLP\'s usual width)'),
        ]
        for key, ok, expected in rules:
            if not ok:
                raise InputError(f"{key}={getattr(self, key)!r}: expected {expected}")
        if self.positions == 'rope' and (self.n_embd // self.n_head) % 2:
            raise InputError(f"n_embd={self.n_embd} / n_head={self.n_head}: rope rotates pairs of dimensions, so a "
                             f"head's size must be even, not {self.n_embd // self.n_head}")

    @property
    def padded_vocab_size(self):
        return 64 * math.ceil(self.vocab_size / 64)

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self):
        if self.mlp_hidden:
            return self.mlp_hidden
        return 4 * self.n_embd if self.mlp == 'gelu' else 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def block_params(self):
        """(weights, biases and gains) of one block: attention's query, key and value (n_kv_head of each of the
        last two) and output projections, the MLP's matrices (SwiGLU's three, GELU's two), two norms."""
        H, hidden, qkv = self.n_embd, self.mlp_width, (self.n_head + 2 * self.kv_heads) * self.head_size
        weights = H * qkv + H * H + (3 if self.mlp == 'swiglu' else 2) * H * hidden
        biases = (qkv + H + (2 if self.mlp == 'swiglu' else 1) * hidden + H) if self.bias else 0
        gains = 2 * H * (2 if self.norm == 'layernorm' and self.bias else 1)
        return weights, biases + gains

    def n_params(self, non_embedding=True):
        """Parameters of the GPT, counted from the shapes (no need to build a 2.8B model to know): the LM head
        (the token embedding too, when tied), the blocks, the final norm; with non_embedding=False also what costs
        no FLOPs per token, the position table and an untied token embedding."""
        H = self.n_embd
        n = self.padded_vocab_size * H + self.n_layer * sum(self.block_params())
        n += H * (2 if self.norm == 'layernorm' and self.bias else 1)
        if non_embedding:
            return n
        return n + (self.block_size * H if self.positions == 'learned' else 0) + \
            (0 if self.tie_embeddings else self.padded_vocab_size * H)

    def flops_per_token(self, seq_len, backward=True):
        """FLOPs per token of a forward + backward pass (a forward alone with backward=False), the PaLM appendix
        B count: 6 (2) per parameter, plus the attention scores and values over seq_len positions, 12 (4) *
        n_layer * n_embd * seq_len (n_head query heads, however many keys and values they share)."""
        passes = 3 if backward else 1
        return passes * (2 * self.n_params() + 4 * self.n_layer * self.n_embd * seq_len)

    def activation_bytes(self, tokens, compute_bytes, checkpointing=False):
        """Bytes the backward keeps from the forward of a micro-batch of `tokens` tokens, an estimate: per block
        and token, the residual stream at its two norms in fp32 (8 n_embd bytes) and in the compute dtype the
        norms' outputs, q, k, v (and their rotated copies with rope), the attention output, and the MLP's inner
        values (GELU's input and output, 2 x mlp_hidden; SwiGLU's gate, up, and their product, 4 x); flash
        attention keeps no scores. GPT-2: 14 n_embd. With activation checkpointing: each block's input only,
        plus one block's worth while it is recomputed. Plus the embeddings' and the final norm's."""
        qkv = (self.n_head + 2 * self.kv_heads) * self.head_size
        rotated = (self.n_head + self.kv_heads) * self.head_size if self.positions == 'rope' else 0
        values = 3 * self.n_embd + qkv + rotated + (4 if self.mlp == 'swiglu' else 2) * self.mlp_width
        per_block = tokens * (8 * self.n_embd + values * compute_bytes)
        if checkpointing:
            return self.n_layer * tokens * self.n_embd * 4 + per_block + tokens * self.n_embd * 8
        return self.n_layer * per_block + tokens * self.n_embd * 8

    @classmethod
    def from_preset(cls, name, architecture=None, **overrides):
        """The config of a preset (PRESETS), in its architecture or another one, any key overridden."""
        if name not in PRESETS:
            raise InputError(f"model_size={name!r}: unknown; choose one of {', '.join(PRESETS)}")
        shape = dict(PRESETS[name])
        architecture = architecture or shape.pop('architecture', 'gpt2')
        shape.pop('architecture', None)
        if architecture not in ARCHITECTURES:
            raise InputError(f"architecture={architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
        return cls(**{**ARCHITECTURES[architecture], **shape, **overrides})


def norm(config):
    """The norm of a block and the final one: LayerNorm (with a bias, GPT-2's) or RMSNorm (a gain alone)."""
    if config.norm == 'rmsnorm':
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotary(seq_len, config, device):
    """(cos, sin), (seq_len, head_size) each, of rope's angles: position t times frequency theta^(-2i/head_size),
    in fp32, each frequency twice, for the halves that rotate together (transformers' Llama convention)."""
    frequencies = config.rope_theta ** (-torch.arange(0, config.head_size, 2, device=device).float() / config.head_size)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), frequencies)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate(x, rope):
    """x (B, heads, T, head_size) with each pair (x_i, x_{i + head_size/2}) rotated by its position's angle."""
    cos, sin = (t.to(x.dtype) for t in rope)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        # queries, keys and values in one matrix: n_head, n_kv_head and n_kv_head heads of them
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.kv_heads) * config.head_size,
                                bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, rope=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split([self.n_head * self.head_size] + [self.n_kv_head * self.head_size] * 2, dim=2)
        q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        # SDPA picks flash/memory-efficient attention on CUDA and a fused kernel on CPU; enable_gqa: each key and
        # value head serves n_head / n_kv_head query heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == 'swiglu'
        # SwiGLU's gate and up projections in one matrix, as attention's q, k and v
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * config.mlp_width, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        # GPT-2 used the tanh approximation of GELU; matching it keeps pretrained weights exact
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate='tanh')))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class LM(nn.Module):
    """What the project asks of a language model: its final hidden states (hidden_states), an LM head (lm_head, whose
    rows beyond config.vocab_size pad the vocabulary), its decoder blocks (blocks: what fsdp shards and
    torch.compile compiles one by one), config.vocab_size and config.block_size; the rest follows."""

    def forward(self, idx, targets=None, *, return_hidden=False, logits_at=None, **loss_args):
        """idx (B, T) token ids -> logits (B, T, vocab_size); or
        - return_hidden=True: the final hidden states (B, T, n_embd), what a teacher hands to its student;
        - logits_at=(batch indices, time indices): fp32 logits (N, vocab_size) at those N positions only, to
          score continuations;
        - targets (B, T): the loss, as nanoGPT's forward(idx, targets): losses.salt_loss(hidden states, LM
          head, targets, **loss_args), i.e. (loss, ce, kd); SALT's stage 1 passes the teacher's hidden states
          and LM head as teacher_hidden and teacher_weight, with kd_weight and temperature. It is computed
          here, not by the caller, because under FSDP the LM head's weight is whole only inside this
          forward."""
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of length {idx.size(1)} is longer than block_size {self.config.block_size}")
        x = self.hidden_states(idx)
        if logits_at is not None:  # fp32 whatever the autocast and weights: log-probs of 50K-way softmaxes get compared
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x[logits_at].float(), self.lm_head.weight.float())[:, :self.config.vocab_size]
        if targets is None:
            return x if return_hidden else self.logits(x)
        return salt_loss(x, self.lm_head.weight, targets, vocab_size=self.config.vocab_size, **loss_args)

    def logits(self, hidden):
        return self.lm_head(hidden)[..., :self.config.vocab_size]  # padded columns are not tokens

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens continuations of idx (B, T), cropping the context to block_size."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float('inf')
            next_id = torch.multinomial(F.softmax(logits.float(), dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


class GPT(LM):
    def __init__(self, config, device='cpu'):
        """A GPT with its initial weights (init_weights) on `device`; device='meta': the shapes alone, no memory and
        nothing drawn, for train.py to shard under fsdp before each rank makes (to_empty) and fills its shards."""
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        with torch.device('meta'):  # the layers' constructors draw nothing here: init_weights draws every weight
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(V, config.n_embd),
                **(dict(wpe=nn.Embedding(config.block_size, config.n_embd)) if config.positions == 'learned' else {}),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=norm(config),
            ))
            self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        self.activation_checkpointing = False  # set by train.py: trade a second forward per block for memory
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        if device != 'meta':
            self.to_empty(device=device)
            self.init_weights()

    def to_empty(self, *, device, recurse=True):
        """nn.Module's, which makes a new tensor of each parameter and so unties the embedding and the LM head: tied
        again here, to wte's (the one that FSDP, meeting it first, keeps)."""
        super().to_empty(device=device, recurse=recurse)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        return self

    @torch.no_grad()
    def init_weights(self):
        """Draw the initial weights from the default (CPU) generator, each parameter's whole tensor in turn, and
        keep it, or under FSDP this rank's shard of it: sharded or whole, a GPT gets the same weights, bit for
        bit, from the same seed. The draws are nanoGPT's on a GPT built whole, as every earlier version built
        it: the layers' constructors' own init (then replaced), N(0, 0.02) for every Linear and Embedding (the
        tied matrix twice, as wte and as lm_head), then the residual projections again."""
        for module in self.modules():  # the constructors' draws, made again and thrown away
            if isinstance(module, nn.Linear):
                nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device='cpu')
            elif isinstance(module, nn.Embedding):
                nn.Embedding(module.num_embeddings, module.embedding_dim, device='cpu')
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                _fill(module.weight, lambda w: w.normal_(0.0, 0.02))
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                _fill(module.weight, nn.init.ones_)
            elif [*module.parameters(recurse=False), *module.buffers(recurse=False)]:  # to_empty left it undefined
                raise TypeError(f"GPT.init_weights has no init for the tensors of a {type(module).__name__}")
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                _fill(module.bias, nn.init.zeros_)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                _fill(p, lambda w: w.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer)))

    def num_params(self, non_embedding=True):
        return self.config.n_params(non_embedding)

    def hidden_states(self, idx):
        x, rope = self.transformer.wte(idx), None
        if self.config.positions == 'learned':
            x = x + self.transformer.wpe(torch.arange(idx.size(1), device=idx.device))
        else:  # computed afresh, no cache: the angles of a few positions are cheap next to a block
            rope = rotary(idx.size(1), self.config, idx.device)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            # activation checkpointing: keep each block's input only, recompute its inside in the backward
            x = checkpoint(block, x, rope, use_reentrant=False) if self.activation_checkpointing and self.training \
                else block(x, rope)
        return self.transformer.ln_f(x)

    def blocks(self):
        return list(self.transformer.h)

    def forward_flops_per_token(self, seq_len):
        return self.config.flops_per_token(seq_len, backward=False)

    @classmethod
    def from_hf_state_dict(cls, hf_state, config):
        """Build our GPT from a transformers GPT2LMHeadModel state dict. GPT-2 stores its linear layers
        as Conv1D, i.e. (in, out): those four matrices are transposed."""
        model = cls(config)
        ours = model.state_dict()
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        for name, tensor in hf_state.items():
            if name not in ours or name.endswith('.attn.bias') or name.endswith('.attn.masked_bias'):
                continue  # causal-mask buffers of older transformers versions
            if name.endswith(transposed):
                tensor = tensor.t()
            if name in ('transformer.wte.weight', 'lm_head.weight'):  # tied; pad the vocab with zero rows
                padded = torch.zeros_like(ours[name])
                padded[:tensor.size(0)] = tensor
                tensor = padded
            if ours[name].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(ours[name].shape)}")
            ours[name].copy_(tensor)
        return model

    @classmethod
    def from_pretrained(cls, name):
        """A pretrained GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') as an SLM; needs the
        optional `transformers` package and downloads the weights from the Hugging Face hub."""
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise ImportError(f"init_from={name!r} needs `pip install transformers`") from e
        hf = GPT2LMHeadModel.from_pretrained(name)
        config = GPTConfig.from_preset(name, block_size=hf.config.n_positions, vocab_size=hf.config.vocab_size)
        return cls.from_hf_state_dict(hf.state_dict(), config)


def _fill(param, init):
    """param := init(an empty CPU tensor of param's whole shape); under FSDP (a DTensor) only this rank's shard of
    it, cut as FSDP cuts it (src_data_rank=None: from this rank's own copy, no communication)."""
    whole = init(torch.empty(param.shape, dtype=param.dtype))
    if isinstance(param, DTensor):
        whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param = param.to_local()
    param.copy_(whole)


def compiled(model, scope='blocks', **options):
    """An LM under torch.compile (options: its keyword arguments). scope='blocks' compiles each transformer block
    in place: identical blocks share one graph, so a cold compile is one block's, the switch to SALT's stage 2
    (another loss, no teacher) recompiles nothing, and the parameters keep their names; the embeddings and the
    loss (losses.py, already fused) run uncompiled. scope='model' compiles the whole forward, the loss
    included, which may fuse across the blocks' edges."""
    if scope == 'model':
        return torch.compile(model, **options)
    for block in model.blocks():
        block.compile(**options)
    return model


def model_args(config):
    """The config as a plain dict (stored in checkpoints, loadable with torch.load(weights_only=True))."""
    return asdict(config)
