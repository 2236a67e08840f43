"""
A transformers causal LM as SALT's teacher, SALT_DS's scorer or a model to evaluate and sample from, behind our
GPT's interface (model.LM): any architecture whose next-token logits are a plain linear map of its final hidden
state, GPT-2, Llama and SmolLM2, Qwen2 and Qwen3, GPT-NeoX and Pythia, Mistral, Phi-3, ... It stays the
transformers module, frozen (no conversion into our GPT); the fused loss and the scoring pass take its final
hidden state (its base model's output) and its output embedding, as they take our GPT's.

Checked when it is loaded, a failure being one line that names what is wrong:
- config.json: a causal LM that transformers knows, without any of the settings by which a model transforms its
  logits after the head (LOGIT_TRANSFORMS: Gemma 2's softcapping, Cohere's and Granite's scaling, ...), and a head
  without a bias: a fused KD loss that ignored them would train on silently wrong soft labels;
- on a few real tokens, the model's own logits equal hidden @ head.T, which catches any other such transform;
- its tokenizer, where it has one, fits its output embedding (tokens beyond the tokenizer's only pad the head:
  Qwen's 151,936 rows for 151,665 tokens).

transformers is imported inside the functions: a training run that never meets such a model does not pay for it.
"""
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import InputError
from model import LM

# config.json settings by which a model changes its logits after the LM head, with the value that changes nothing
LOGIT_TRANSFORMS = {
    'final_logit_softcapping': (None,),        # Gemma 2 (30.0), nanochat: cap * tanh(logits / cap)
    'logit_scale': (None, 1.0),                # Cohere (0.0625): logits * scale
    'logits_scaling': (None, 1.0),             # Granite: logits / scaling
    'lm_head_multiplier': (None, 1.0),         # Falcon-H1: logits * multiplier
    'logits_mup_width_multiplier': (None, 1.0),  # muP models: hidden / multiplier before the head
}
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. 1, 2, 3: def f(x):\n    return x ** 2\n"


@dataclass
class Shape:
    vocab_size: int  # the tokenizer's tokens; the head's rows beyond them pad the vocabulary
    block_size: int  # the positions the model was made for


class TransformersLM(LM):
    """A transformers causal LM (self.hf) as an LM: its base model's last hidden state and its output embedding."""

    def __init__(self, hf, vocab_size):
        super().__init__()
        self.hf = hf
        self.config = Shape(vocab_size=vocab_size, block_size=hf.config.max_position_embeddings)

    @property
    def lm_head(self):
        return self.hf.get_output_embeddings()

    def hidden_states(self, idx):
        return self.hf.base_model(input_ids=idx, use_cache=False)[0]

    def blocks(self):
        """Its decoder layers: the modules transformers itself never splits across devices (_no_split_modules)."""
        names = set(self.hf._no_split_modules or ())
        return [module for module in self.hf.modules() if type(module).__name__ in names]

    def forward_flops_per_token(self, seq_len):
        """A forward's FLOPs per token, as GPTConfig.flops_per_token counts ours: 2 per weight of every matrix
        multiply (the head included, the embedding's lookup not), plus the attention over seq_len positions."""
        c = self.hf.config
        weights = sum(m.weight.numel() for m in self.hf.modules()
                      if isinstance(m, nn.Linear) or type(m).__name__ == 'Conv1D')  # GPT-2's are Conv1D
        width = c.num_attention_heads * (getattr(c, 'head_dim', None) or c.hidden_size // c.num_attention_heads)
        return 2 * weights + 4 * c.num_hidden_layers * width * seq_len


def is_directory(path):
    """A transformers model directory, as opposed to a train.py checkpoint (meta.pt) or a hub name."""
    return os.path.isfile(os.path.join(path, 'config.json'))


def read_config(path):
    """The model's transformers config, after checking that it is a causal LM whose logits the head alone makes."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    where = os.path.join(path, 'config.json') if os.path.isdir(path) else path
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{where}: not a transformers config ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]})") from error
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"{where}: model_type {config.model_type!r} is not a causal LM (transformers' "
                         f"AutoModelForCausalLM has no class for it)")
    settings = config.get_text_config().to_dict()
    for key, plain in LOGIT_TRANSFORMS.items():
        if key in settings and settings[key] not in plain:
            raise InputError(f"{where}: {key} is {settings[key]!r}: this model transforms its logits after the LM "
                             f"head, which the fused KD loss and the scores do not do; it cannot be a teacher here")
    return config


def load(path, device, dtype=torch.float32, tokenizer=None):
    """The model of a transformers directory (or a hub name: OpenAI's GPT-2s) as a frozen TransformersLM in dtype on
    device, checked (see the top of this file). tokenizer: its tokenizer (tokenizer.py), if it has one."""
    config = read_config(path)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()  # a bar per load in every rank's log says nothing
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    except OSError as error:  # no weights file, or one that does not load
        raise InputError(f"{path}: {str(error).splitlines()[0][:300]}") from error
    head = hf.get_output_embeddings()
    if getattr(head, 'bias', None) is not None:
        raise InputError(f"{path}: its LM head has a bias, which the fused KD loss and the scores leave out; it "
                         f"cannot be a teacher here")
    rows = head.weight.shape[0]
    vocab_size = tokenizer.vocab_size if tokenizer else rows
    if vocab_size > rows:
        raise InputError(f"{path}: its tokenizer has {vocab_size:,} tokens but its LM head only {rows:,} rows")
    model = TransformersLM(hf.to(device).eval().requires_grad_(False), vocab_size).eval()
    ids = tokenizer.encode(CHECK_TEXT) if tokenizer else list(range(0, vocab_size, max(1, vocab_size // 32)))
    check_logits(model, path, torch.tensor(ids[:model.config.block_size], device=device)[None])
    return model


def check_logits(model, where, idx):
    """The model's own logits on idx must be hidden @ head.T: what the loss and the scores compute from it."""
    with torch.no_grad():
        theirs = model.hf(input_ids=idx, use_cache=False).logits.float()
        ours = (model.hidden_states(idx) @ model.lm_head.weight.T).float()
    # the same GEMM twice: equal up to its blocking in fp32, up to 16-bit rounding of logits of that size else
    tolerance = (1e-3 if model.lm_head.weight.dtype == torch.float32 else 2e-2) * theirs.abs().max().item()
    difference = (ours - theirs).abs().max().item()
    if not difference <= tolerance:
        raise InputError(f"{where}: its logits are not its final hidden state times its LM head (they differ by up "
                         f"to {difference:.3g}): it transforms them in a way this project does not; it cannot be a "
                         f"teacher here")


def shapes(path, dtype):
    """The model of a directory on the meta device, in dtype: its shapes, for the memory plan, no weights read."""
    config = read_config(path)
    from transformers import AutoModelForCausalLM
    with torch.device('meta'):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return TransformersLM(hf, hf.get_output_embeddings().weight.shape[0])


def identity(path):
    """What identifies the directory's model in score files and resumed runs: a hash of its config and weight
    files, not its path (a copy elsewhere is the same teacher; a model trained on and saved in place is not)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == 'config.json' or name.endswith(('.safetensors', '.bin')):
            with open(os.path.join(path, name), 'rb') as f:
                digest.update(name.encode() + hashlib.file_digest(f, 'sha256').digest())
    return f"transformers:{digest.hexdigest()[:16]}"
