"""
A transformers GPT-2 directory (config.json, the weights, the tokenizer's files), as a teacher, a scorer or a
model to evaluate: one that export_hf.py wrote from a checkpoint of ours, or a user's own GPT-2-family model.
salt.load_model loads it into our GPT through transformers, after checking that it is the GPT-2 our model
implements, with GPT-2's vocabulary; anything else is one line naming what differs.

transformers is imported inside the functions: the training and scoring processes that never meet such a
directory do not pay for its import.
"""
import base64
import hashlib
import json
import os
import tempfile

import tiktoken

from common import InputError
from data import ENCODING, EOT, VOCAB_SIZE
from model import GPT, GPTConfig

# What our GPT computes, as GPT-2 config.json keys: a directory with any other value is another model
GPT2_VALUES = {
    'model_type': ('gpt2',),
    'activation_function': ('gelu_new', 'gelu_pytorch_tanh'),  # both GELU's tanh approximation, as ours
    'layer_norm_epsilon': (1e-5,),
    'scale_attn_weights': (True,),
    'scale_attn_by_inverse_layer_idx': (False,),
    'add_cross_attention': (False,),
    'tie_word_embeddings': (True,),  # one matrix embeds and scores tokens
    'vocab_size': (VOCAB_SIZE,),  # GPT-2's tokenizer
}


def is_directory(path):
    """A transformers model directory, as opposed to a train.py checkpoint (meta.pt) or a hub name."""
    return os.path.isfile(os.path.join(path, 'config.json'))


def read_config(path):
    """config.json, after checking that it describes our GPT: {key: value} with transformers' GPT-2 defaults
    for the keys it leaves out."""
    from transformers import GPT2Config
    config_file = os.path.join(path, 'config.json')
    try:
        with open(config_file, encoding='utf-8') as f:
            config = {**GPT2Config().to_dict(), **json.load(f)}
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{config_file}: not a JSON file ({error})") from error
    for key, values in GPT2_VALUES.items():
        if config[key] not in values:
            raise InputError(f"{config_file}: {key} is {config[key]!r}, but GPT-2 as this project implements it "
                             f"has {' or '.join(map(repr, values))}: this model cannot be loaded here")
    if config['n_inner'] not in (None, 4 * config['n_embd']):
        raise InputError(f"{config_file}: n_inner is {config['n_inner']}, but GPT-2's MLP is 4 x n_embd = "
                         f"{4 * config['n_embd']} wide: this model cannot be loaded here")
    return config


def gpt2_tokenizer(model_max_length=None):
    """GPT-2's tokenizer as a transformers tokenizer, made offline from tiktoken's ranks by transformers' own
    converter (which reads tiktoken's file format: base64 token, rank)."""
    from transformers import GPT2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    enc = tiktoken.get_encoding(ENCODING)
    with tempfile.TemporaryDirectory() as scratch:
        ranks = os.path.join(scratch, f'{ENCODING}.tiktoken')
        with open(ranks, 'wb') as f:
            f.writelines(base64.b64encode(token) + b' %d\n' % rank for token, rank in enc._mergeable_ranks.items())
        converted = TikTokenConverter(vocab_file=ranks, pattern=enc._pat_str,
                                      extra_special_tokens=enc._special_tokens).converted()
    eot = enc.decode([EOT])
    return GPT2TokenizerFast(tokenizer_object=converted, bos_token=eot, eos_token=eot, unk_token=eot,
                             model_max_length=model_max_length)


def check_tokenizer(path):
    """When the directory has a tokenizer, it must be GPT-2's: the same token for every id."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in ('tokenizer.json', 'vocab.json')):
        return  # weights alone: config.json's vocab_size is all there is to check
    from transformers import AutoTokenizer
    theirs = {i: token for token, i in AutoTokenizer.from_pretrained(path).get_vocab().items()}
    ours = {i: token for token, i in gpt2_tokenizer().get_vocab().items()}
    for i in sorted(set(ours) | set(theirs)):
        if theirs.get(i) != ours.get(i):
            raise InputError(f"{path}: its tokenizer has {theirs.get(i)!r} for token id {i}, GPT-2's has "
                             f"{ours.get(i)!r}: not GPT-2's vocabulary")


def load(path):
    """Our GPT with the weights of a transformers GPT-2 directory (safetensors or PyTorch files, sharded or
    not: whatever transformers reads)."""
    config = read_config(path)
    check_tokenizer(path)
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(path)
    return GPT.from_hf_state_dict(hf.state_dict(), GPTConfig(
        block_size=config['n_positions'], vocab_size=config['vocab_size'], n_layer=config['n_layer'],
        n_head=config['n_head'], n_embd=config['n_embd']))


def identity(path):
    """What identifies the directory's model in score files and resumed runs: a hash of its config and weight
    files, not its path (a copy elsewhere is the same teacher; a model trained on and saved in place is not)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == 'config.json' or name.endswith(('.safetensors', '.bin')):
            with open(os.path.join(path, name), 'rb') as f:
                digest.update(name.encode() + hashlib.file_digest(f, 'sha256').digest())
    return f"transformers:{digest.hexdigest()[:16]}"
