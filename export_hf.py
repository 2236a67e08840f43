"""
Export a checkpoint to a transformers directory, so that other tools can load it (llm.c's dev/eval/export_hf.py
is the precedent): a GPT2LMHeadModel of a GPT-2 student, a LlamaForCausalLM of a Llama one (model.ARCHITECTURES).

  python export_hf.py --ckpt out/demo/baseline/ckpt --out hf/baseline

writes hf/baseline/ with config.json, model.safetensors and the checkpoint's tokenizer (tokenizer.json,
tokenizer_config.json: GPT-2's, or that of the data it was trained on: tokenizer.py), which transformers loads
offline:

  AutoModelForCausalLM.from_pretrained('hf/baseline'), AutoTokenizer.from_pretrained('hf/baseline')

and so does lm-evaluation-harness (`lm_eval --model hf --model_args pretrained=hf/baseline ...`), and this
project again (`--teacher_ckpt=hf/baseline`, `salt.py score --ckpt hf/baseline`). The weights are the
checkpoint's in float32, whatever wrote it (one process or several, ddp or fsdp); the rows of the padded
vocabulary are dropped; GPT-2's four linear layers of each block are transposed into transformers' Conv1D (in, out)
layout, Llama's fused matrices (queries, keys and values; gate and up) cut into its q_proj, k_proj, v_proj,
gate_proj and up_proj. GPT-2's tokenizer is made offline from tiktoken's ranks. A student whose switches mix the
two architectures (rope with LayerNorm, say) has no such class, and is refused in one line.

The directory is written under a temporary name beside --out and renamed when complete. An --out that exists
is replaced only when it is an earlier export of the same checkpoint (its run and step, which config.json
records as "salt_checkpoint").
"""
import argparse
import json
import os
import secrets
import shutil

import checkpoint_manager
import salt
import tokenizer
from common import InputError, report_input_errors


def check_vocabulary(ckpt, meta, tok):
    """The checkpoint's vocabulary must be its tokenizer's, the one the export writes beside it."""
    vocab_size = meta['model_args']['vocab_size']
    if vocab_size != tok.vocab_size:
        raise InputError(f"{ckpt}: vocab_size {vocab_size} does not fit its tokenizer "
                         f"{tokenizer.describe(tok.record())}, the one the export writes")


def check_out(out, source):
    """--out may exist only as an earlier export of the same checkpoint, which the new one replaces."""
    if not os.path.exists(out):
        return
    try:
        with open(os.path.join(out, 'config.json'), encoding='utf-8') as f:
            exported_from = json.load(f).get('salt_checkpoint')
    except (OSError, ValueError):
        exported_from = None
    if exported_from != source:
        raise InputError(f"{out} exists and is not an export of this checkpoint ({source}): give another --out, "
                         f"or remove it")


def transformers_model(model, eot):
    """Our GPT as the transformers model of its architecture, in float32, eot its bos and eos token."""
    c = model.config
    switches = (c.positions, c.norm, c.mlp)
    if switches == ('learned', 'layernorm', 'gelu'):
        return gpt2_model(model, eot)
    if switches == ('rope', 'rmsnorm', 'swiglu'):
        return llama_model(model, eot)
    raise InputError(f"positions={c.positions!r}, norm={c.norm!r}, mlp={c.mlp!r}: a mix of GPT-2's and Llama's "
                     f"switches, which no transformers class computes; the export writes those two")


def gpt2_model(model, eot):
    """GPT2LMHeadModel. The parameter names are ours; GPT-2's four linear layers per block are Conv1D modules, which
    store their weight as (in, out): transposed. A student without biases gets zero ones (the same function)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.mlp_width, activation_function='gelu_new', resid_pdrop=c.dropout, embd_pdrop=c.dropout,
        attn_pdrop=c.dropout, layer_norm_epsilon=1e-5, bos_token_id=eot, eos_token_id=eot,
        tie_word_embeddings=c.tie_embeddings))
    ours, parameters = model.state_dict(), dict(hf.named_parameters(remove_duplicate=False))
    conv1d = {f'{name}.weight' for name, module in hf.named_modules() if isinstance(module, Conv1D)}
    state = {}
    for name, theirs in hf.state_dict().items():
        if name not in ours and name in parameters:  # a bias the student has not: zero, the same function
            theirs = torch.zeros_like(theirs)
        tensor = ours[name].float() if name in ours else theirs
        if name in conv1d:
            tensor = tensor.t()
        state[name] = tensor[:c.vocab_size] if name in ('transformer.wte.weight', 'lm_head.weight') else tensor
    hf.load_state_dict({name: tensor.contiguous() for name, tensor in state.items()})
    return hf.eval()


def llama_model(model, eot):
    """LlamaForCausalLM: the same computation (rope in its rotate-half convention, RMSNorm with eps 1e-5, SwiGLU),
    our fused matrices cut into its projections."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_width, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, head_dim=c.head_size,
        max_position_embeddings=c.block_size, rms_norm_eps=1e-5, rope_theta=c.rope_theta, hidden_act='silu',
        attention_bias=c.bias, mlp_bias=c.bias, attention_dropout=c.dropout, bos_token_id=eot, eos_token_id=eot,
        tie_word_embeddings=c.tie_embeddings))
    ours = {name: tensor.float() for name, tensor in model.state_dict().items()}
    q, kv = c.n_head * c.head_size, c.kv_heads * c.head_size
    state = {'model.embed_tokens.weight': ours['transformer.wte.weight'][:c.vocab_size],
             'model.norm.weight': ours['transformer.ln_f.weight'],
             'lm_head.weight': ours['lm_head.weight'][:c.vocab_size]}
    for i in range(c.n_layer):
        block, layer = f'transformer.h.{i}.', f'model.layers.{i}.'
        for kind in ('weight', 'bias') if c.bias else ('weight',):
            attn, fc = ours[block + 'attn.c_attn.' + kind], ours[block + 'mlp.c_fc.' + kind]
            state.update({
                layer + 'self_attn.q_proj.' + kind: attn[:q], layer + 'self_attn.k_proj.' + kind: attn[q:q + kv],
                layer + 'self_attn.v_proj.' + kind: attn[q + kv:], layer + 'mlp.gate_proj.' + kind: fc[:c.mlp_width],
                layer + 'mlp.up_proj.' + kind: fc[c.mlp_width:],
                layer + 'self_attn.o_proj.' + kind: ours[block + 'attn.c_proj.' + kind],
                layer + 'mlp.down_proj.' + kind: ours[block + 'mlp.c_proj.' + kind]})
        state[layer + 'input_layernorm.weight'] = ours[block + 'ln_1.weight']
        state[layer + 'post_attention_layernorm.weight'] = ours[block + 'ln_2.weight']
    if c.tie_embeddings:
        del state['lm_head.weight']  # the embedding's, in transformers as in ours
    hf.load_state_dict({name: tensor.contiguous() for name, tensor in state.items()}, strict=not c.tie_embeddings)
    return hf.eval()


def write_directory(model, tok, folder, source):
    """config.json, model.safetensors and the tokenizer's files into folder, each fsynced: a directory renamed
    into place after a crash holds whole files."""
    hf = transformers_model(model, tok.eot)
    hf.config.salt_checkpoint = source  # what check_out compares
    hf.save_pretrained(folder)  # safetensors; a tied head is stored once, as the embedding
    tok.save(folder, model_max_length=model.config.block_size)
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def export(ckpt, out):
    """Export checkpoint `ckpt` to the directory `out`: written whole under a temporary name, then renamed."""
    if not os.path.exists(ckpt):
        raise InputError(f"checkpoint {ckpt} does not exist (a train.py checkpoint is out_dir/ckpt)")
    meta = checkpoint_manager.read_meta(ckpt)
    tok = salt.model_tokenizer(ckpt)
    check_vocabulary(ckpt, meta, tok)
    source = salt.teacher_id(ckpt)
    check_out(out, source)
    model = salt.load_model(ckpt, 'cpu')
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f'.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')  # beside out: rename is atomic
    os.mkdir(tmp)  # unlike mkdtemp, with the usual umask permissions
    try:
        write_directory(model, tok, tmp, source)
        if os.path.exists(out):  # the earlier export of this checkpoint
            os.rename(out, tmp + '.old')
        os.rename(tmp, out)
    finally:
        for leftover in (tmp, tmp + '.old'):
            shutil.rmtree(leftover, ignore_errors=True)
    return model


if __name__ == '__main__':
    report_input_errors()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', required=True, help='a train.py checkpoint directory (out/RUN/ckpt)')
    parser.add_argument('--out', required=True, help='the transformers directory to write (hf/RUN)')
    args = parser.parse_args()
    model = export(args.ckpt, args.out)
    kind = 'LlamaForCausalLM' if model.config.positions == 'rope' else 'GPT2LMHeadModel'
    print(f"wrote {args.out}: {kind} with {model.config.n_layer} layers, {model.config.n_embd} wide, block size "
          f"{model.config.block_size}, from {args.ckpt} ({salt.teacher_id(args.ckpt)})")
