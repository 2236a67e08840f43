"""
Export a checkpoint to a transformers GPT-2 directory, so that other tools can load it (llm.c's
dev/eval/export_hf.py is the precedent):

  python export_hf.py --ckpt out/demo/baseline/ckpt --out hf/baseline

writes hf/baseline/ with config.json, model.safetensors and the checkpoint's tokenizer (tokenizer.json,
tokenizer_config.json: GPT-2's, or that of the data it was trained on: tokenizer.py), which transformers loads
offline:

  GPT2LMHeadModel.from_pretrained('hf/baseline'), AutoTokenizer.from_pretrained('hf/baseline')

and so does lm-evaluation-harness (`lm_eval --model hf --model_args pretrained=hf/baseline ...`), and this
project again (`--teacher_ckpt=hf/baseline`, `salt.py score --ckpt hf/baseline`). The weights are the
checkpoint's in float32, whatever wrote it (one process or several, ddp or fsdp); the rows of the padded
vocabulary are dropped, the four linear layers of each block transposed into transformers' Conv1D (in, out)
layout, and the LM head tied to the token embedding. GPT-2's tokenizer is made offline from tiktoken's ranks.

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
    """Our GPT as transformers' GPT2LMHeadModel, in float32, eot its bos and eos token. The parameter names are the
    same; GPT-2's four linear layers per block are Conv1D modules, which store their weight as (in, out):
    transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function='gelu_new', resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        layer_norm_epsilon=1e-5, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True))
    ours = model.state_dict()
    conv1d = {f'{name}.weight' for name, module in hf.named_modules() if isinstance(module, Conv1D)}
    state = {}
    for name in hf.state_dict():
        tensor = ours[name].float()
        if name in conv1d:
            tensor = tensor.t()
        if name in ('transformer.wte.weight', 'lm_head.weight'):  # the padded rows are not tokens
            tensor = tensor[:c.vocab_size]
        state[name] = tensor.contiguous()
    hf.load_state_dict(state)
    return hf.eval()


def write_directory(model, tok, folder, source):
    """config.json, model.safetensors and the tokenizer's files into folder, each fsynced: a directory renamed
    into place after a crash holds whole files."""
    hf = transformers_model(model, tok.eot)
    hf.config.salt_checkpoint = source  # what check_out compares
    hf.save_pretrained(folder)  # safetensors; the tied head is stored once, as the embedding
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
    print(f"wrote {args.out}: GPT-2 with {model.config.n_layer} layers, {model.config.n_embd} wide, block size "
          f"{model.config.block_size}, from {args.ckpt} ({salt.teacher_id(args.ckpt)})")
