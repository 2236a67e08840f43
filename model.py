"""
The network: a GPT in the GPT-2 architecture (pre-LayerNorm blocks, learned positions, GELU MLP, tied
input/output embeddings), written to be read in one sitting.

Two things differ from a textbook GPT because of SALT:
- forward(idx, targets, **loss_args) returns the loss of kernels.salt_loss, whose KD term takes the teacher's
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

from kernels import default_chunk_size, salt_loss

# Presets by name, from a CPU demo to the paper's pair (a ~1.5B teacher and a ~2.8B student).
# (n_layer, n_head, n_embd); the paper does not publish its exact shapes, these are GPT-2/Pythia-like.
PRESETS = {
    'demo-slm':     (2, 2, 64),      # the embedded demo's small LM
    'demo-student': (4, 4, 128),     # the embedded demo's student, ~2x the SLM's parameters
    'gpu-slm':      (6, 6, 384),     # 30M: the one-GPU experiment's SLM (config/gpu_slm.py), ~half its student
    'gpu-student':  (12, 8, 512),    # 64M, 59% of it in the blocks: the one-GPU experiment's student
    'gpt2-half':    (6, 12, 768),    # 82M: half of gpt2's blocks, a teacher for it in the speed benchmarks
    'gpt2':         (12, 12, 768),   # 124M
    'gpt2-medium-half': (12, 16, 1024),  # 204M: half of gpt2-medium's blocks, likewise
    'gpt2-medium':  (24, 16, 1024),  # 350M
    'gpt2-large':   (36, 20, 1280),  # 774M
    'gpt2-xl':      (48, 25, 1600),  # 1.5B: the paper's teacher size
    'salt-2.8b':    (32, 32, 2560),  # 2.8B: the paper's student size
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

    @property
    def padded_vocab_size(self):
        return 64 * math.ceil(self.vocab_size / 64)

    def n_params(self, non_embedding=True):
        """Parameters of the GPT, counted from the shapes (no need to build a 2.8B model to know): the tied
        embedding / LM head, per block 12 n_embd^2 weights and 13 n_embd biases and gains, the final LayerNorm;
        the position embeddings unless non_embedding (they cost no FLOPs per token)."""
        H = self.n_embd
        per_block = 12 * H * H + (13 * H if self.bias else 2 * H)
        n = self.padded_vocab_size * H + self.n_layer * per_block + (2 if self.bias else 1) * H
        return n if non_embedding else n + self.block_size * H

    def flops_per_token(self, seq_len, backward=True):
        """FLOPs per token of a forward + backward pass (a forward alone with backward=False), the PaLM appendix
        B count: 6 (2) per parameter, plus the attention scores and values over seq_len positions, 12 (4) *
        n_layer * n_embd * seq_len."""
        passes = 3 if backward else 1
        return passes * (2 * self.n_params() + 4 * self.n_layer * self.n_embd * seq_len)

    def activation_bytes(self, tokens, compute_bytes, checkpointing=False):
        """Bytes the backward keeps from the forward of a micro-batch of `tokens` tokens, an estimate: per block
        and token, the residual stream at its two LayerNorms in fp32 (8 n_embd bytes) and 14 n_embd values in
        the compute dtype (the LayerNorm outputs, q, k, v, the attention output, the MLP's 4x wide input and
        output of its GELU); flash attention keeps no scores. With activation checkpointing: each block's input
        only, plus one block's worth while it is recomputed. Plus the embeddings' and the final LayerNorm's."""
        per_block = tokens * self.n_embd * (8 + 14 * compute_bytes)
        if checkpointing:
            return self.n_layer * tokens * self.n_embd * 4 + per_block + tokens * self.n_embd * 8
        return self.n_layer * per_block + tokens * self.n_embd * 8

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


class LM(nn.Module):
    """What the project asks of a language model: its final hidden states (hidden_states), an LM head (lm_head, whose
    rows beyond config.vocab_size pad the vocabulary), its decoder blocks (blocks: what fsdp shards and
    torch.compile compiles one by one), config.vocab_size and config.block_size; the rest follows."""

    def forward(self, idx, targets=None, *, return_hidden=False, logits_at=None, **loss_args):
        """idx (B, T) token ids -> logits (B, T, vocab_size); or
        - return_hidden=True: the final hidden states (B, T, n_embd), what a teacher hands to its student;
        - logits_at=(batch indices, time indices): fp32 logits (N, vocab_size) at those N positions only, to
          score continuations;
        - targets (B, T): the loss, as nanoGPT's forward(idx, targets): kernels.salt_loss(hidden states, LM
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
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            ))
            self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        self.activation_checkpointing = False  # set by train.py: trade a second forward per block for memory
        # weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them
        self.transformer.wte.weight = self.lm_head.weight
        if device != 'meta':
            self.to_empty(device=device)
            self.init_weights()

    def to_empty(self, *, device, recurse=True):
        """nn.Module's, which makes a new tensor of each parameter and so unties the embedding and the LM head: tied
        again here, to wte's (the one that FSDP, meeting it first, keeps)."""
        super().to_empty(device=device, recurse=recurse)
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
            elif isinstance(module, nn.LayerNorm):
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
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            # activation checkpointing: keep each block's input only, recompute its inside in the backward
            x = checkpoint(block, x, use_reentrant=False) if self.activation_checkpointing and self.training else block(x)
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
    loss (kernels.py, already fused) run uncompiled. scope='model' compiles the whole forward, the loss
    included, which may fuse across the blocks' edges."""
    if scope == 'model':
        return torch.compile(model, **options)
    for block in model.blocks():
        block.compile(**options)
    return model


def model_args(config):
    """The config as a plain dict (stored in checkpoints, loadable with torch.load(weights_only=True))."""
    return asdict(config)


# ----------------------------------------------------------------------------------------------------------
# Memory per device of a training run, before it starts: what train.py prints, and what chooses ddp or fsdp

GiB = 2 ** 30


def memory_plan(student, teacher, *, tokens, world_size, compute_bytes, checkpointing=False, shard_teacher=False,
                device_type='cuda'):
    """{what: (bytes under ddp, bytes under fsdp)} per device for training `student` (a GPTConfig) with AdamW on
    micro-batches of `tokens` tokens, and, in SALT's stage 1, a frozen `teacher` (an LM, or None) as it is held,
    its parameters in their own dtype (a GPT or a transformers model; on the meta device, shapes only);
    compute_bytes: 2 for bf16 autocast, 4 for fp32. An estimate from the shapes: fp32
    weights, gradients and AdamW's two moments are 16 bytes per parameter, whole on every ddp rank, 1/world_size
    of them on an fsdp rank, which also holds the blocks it is gathering (two at a time: one at work, one
    prefetched) and the root's embeddings, whole from the forward to the backward."""
    n, vocab, hidden = student.n_params(non_embedding=False), student.padded_vocab_size, student.n_embd
    block = 12 * hidden * hidden + 13 * hidden
    # the rows a chunk of the loss really has: the kernel's own choice, no more than the micro-batch's tokens
    chunk_rows = min(tokens, default_chunk_size(tokens, hidden, vocab, device_type))
    plan = {
        'weights (fp32)': (4 * n, 4 * n / world_size),
        'gradients (fp32)': (4 * n, 4 * n / world_size),
        'AdamW moments (fp32)': (8 * n, 8 * n / world_size),
        # ddp: autocast caches a 16-bit copy of each weight it casts; fsdp gathers 16-bit weights instead
        'weights gathered or cast for compute': (n * compute_bytes if compute_bytes < 4 else 0,
                                                 (2 * block + vocab * hidden) * compute_bytes + 2 * block * 4),
        f'activations ({tokens:,} tokens per micro-batch)': (student.activation_bytes(tokens, compute_bytes,
                                                                                     checkpointing),) * 2,
        # the fused loss: fp32 gradient of the LM head, and a chunk's logits, teacher logits and soft labels
        'loss (LM head)': (vocab * hidden * 4 + 3 * chunk_rows * vocab * 4,) * 2,
    }
    if teacher is not None:  # shard_teacher: each rank its shard of the blocks, the root whole, two blocks gathered
        whole, root, block = teacher_bytes(teacher)
        plan['teacher (frozen, stage 1)'] = (whole, root + (whole - root) / world_size + 2 * block if shard_teacher
                                             else whole)
    plan['total'] = tuple(sum(column) for column in zip(*plan.values()))
    return plan


def teacher_bytes(teacher):
    """(all, outside the blocks, the largest block) bytes of an LM's parameters, each in its own dtype."""
    def size(params):
        return sum(p.numel() * p.element_size() for p in params)
    in_blocks = {id(p) for block in teacher.blocks() for p in block.parameters()}
    return (size(teacher.parameters()), size(p for p in teacher.parameters() if id(p) not in in_blocks),
            max(size(block.parameters()) for block in teacher.blocks()))


def start_memory(student, world_size):
    """(bytes under ddp, bytes under fsdp) per device while train.py builds the student (a GPTConfig), before
    training: a ddp rank holds the whole fp32 weights; an fsdp rank its shard of them (the student is built on the
    meta device and sharded first), and the one parameter init_weights has whole at a time, drawn on the CPU and
    cut on the device, the largest of which is the embedding (or an MLP matrix, or the positions)."""
    n, hidden = student.n_params(non_embedding=False), student.n_embd
    largest = max(student.padded_vocab_size, student.block_size, 4 * hidden) * hidden
    return 4 * n, 4 * n / world_size + 4 * largest


def memory_table(plan, world_size, device_bytes=None, at_start=None):
    """The plan as a markdown table in GiB; under its total, the peak while the student is built (at_start:
    start_memory's) and the device's memory, when given."""
    rows = dict(plan)
    if at_start:
        rows['at start, building the student (not in the total)'] = at_start
    if device_bytes:
        rows['device memory'] = (device_bytes, device_bytes)
    lines = [f"| per device (estimate) | ddp | fsdp over {world_size} |", "|---|---|---|"]
    lines += [f"| {what} | {ddp / GiB:.1f} GiB | {fsdp / GiB:.1f} GiB |" for what, (ddp, fsdp) in rows.items()]
    return "\n".join(lines)


if __name__ == '__main__':
    import argparse
    import os
    parser = argparse.ArgumentParser(description="The memory plan of a training run, per device (as train.py "
                                                 "prints it at start), e.g. the paper's sizes: --student salt-2.8b "
                                                 "--teacher gpt2-xl --batch_size 4 --block_size 2048 --world_size 8")
    parser.add_argument('--student', required=True, choices=PRESETS)
    parser.add_argument('--vocab_size', type=int, default=50257, help="the data's vocabulary (meta.json's)")
    parser.add_argument('--teacher', help="SALT's stage 1: a frozen teacher, a preset or a transformers model's "
                                          "directory (its config.json: shapes only, no weights read)")
    parser.add_argument('--batch_size', type=int, required=True, help='sequences per micro-batch per device')
    parser.add_argument('--block_size', type=int, required=True)
    parser.add_argument('--world_size', type=int, default=8)
    parser.add_argument('--dtype', choices=['bfloat16', 'float32'], default='bfloat16')
    parser.add_argument('--activation_checkpointing', action='store_true')
    parser.add_argument('--shard_teacher', action='store_true')
    args = parser.parse_args()
    for name in ('batch_size', 'block_size', 'world_size', 'vocab_size'):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.teacher and args.teacher not in PRESETS and not os.path.isfile(os.path.join(args.teacher, 'config.json')):
        parser.error(f"--teacher {args.teacher}: neither a preset ({', '.join(PRESETS)}) nor a transformers directory")
    student = GPTConfig.from_preset(args.student, block_size=args.block_size, vocab_size=args.vocab_size)
    dtype = getattr(torch, args.dtype)
    if args.teacher in PRESETS:
        teacher = GPT(GPTConfig.from_preset(args.teacher, block_size=args.block_size, vocab_size=args.vocab_size),
                      device='meta').to(dtype)
    elif args.teacher:
        import hf_model
        teacher = hf_model.shapes(args.teacher, dtype)
    plan = memory_plan(student, teacher if args.teacher else None, tokens=args.batch_size * args.block_size,
                       world_size=args.world_size, compute_bytes=2 if args.dtype == 'bfloat16' else 4,
                       checkpointing=args.activation_checkpointing,
                       shard_teacher=args.shard_teacher)
    print(memory_table(plan, args.world_size, at_start=start_memory(student, args.world_size)))
