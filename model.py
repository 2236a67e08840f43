"""
The network: a GPT in the GPT-2 architecture (pre-LayerNorm blocks, learned positions, GELU MLP, tied
input/output embeddings), written to be read in one sitting.

Two things differ from a textbook GPT because of SALT:
- forward() can return the final hidden states instead of logits, so the training loss (kernels.salt_loss)
  computes the LM head chunk by chunk and never holds (tokens x vocab) logits;
- the vocabulary is padded to a multiple of 64 for fast GEMMs, and the padded columns never take part in a
  loss or a sample (logits() slices them off; salt_loss masks them).
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F

# Presets by name, from a CPU demo to the paper's pair (a ~1.5B teacher and a ~2.8B student).
# (n_layer, n_head, n_embd); the paper does not publish its exact shapes, these are GPT-2/Pythia-like.
PRESETS = {
    'demo-slm':     (2, 2, 64),      # the embedded demo's small LM
    'demo-student': (4, 4, 128),     # the embedded demo's student, ~2x the SLM's parameters
    'gpt2':         (12, 12, 768),   # 124M
    'gpt2-medium':  (24, 16, 1024),  # 350M
    'gpt2-large':   (36, 20, 1280),  # 774M
    'gpt2-xl':      (48, 25, 1600),  # 1.5B: the paper's teacher size
    'salt-2.8b':    (32, 32, 2560),  # 2.8B: the paper's student size
}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # the tokenizer's vocabulary; the embedding is padded beyond it
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm

    @property
    def padded_vocab_size(self):
        return 64 * math.ceil(self.vocab_size / 64)

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # SDPA picks flash/memory-efficient attention on CUDA and a fused kernel on CPU
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 used the tanh approximation of GELU; matching it keeps pretrained weights exact
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate='tanh')))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        # weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, return_hidden=False):
        """idx (B, T) token ids -> logits (B, T, vocab_size), or the final hidden states (B, T, n_embd)
        with return_hidden=True (then the loss applies lm_head itself, see kernels.salt_loss)."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return x if return_hidden else self.logits(x)

    def logits(self, hidden):
        return self.lm_head(hidden)[..., :self.config.vocab_size]  # padded columns are not tokens

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), the PaLM appendix B count: 6 per parameter
        per token plus the attention scores and values, 12 * n_layer * n_embd * T."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens continuations of idx (B, T), cropping the context to block_size."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float('inf')
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

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


def model_args(config):
    """The config as a plain dict (stored in checkpoints, loadable with torch.load(weights_only=True))."""
    return asdict(config)
