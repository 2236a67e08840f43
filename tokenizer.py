"""
Text <-> token ids, for every script that reads or writes text: GPT-2's BPE through tiktoken (the default, which
needs nothing more), or the tokenizer of any transformers model, through its fast tokenizer (`python prepare.py
... --tokenizer DIR`: SmolLM2, Qwen, Pythia, Llama ...).

Where a tokenizer is written down, as its record (below):
- a data directory's meta.json, "tokenizer"; a transformers tokenizer's files are saved in DATA_DIR/tokenizer,
  which every worker of prepare.py and every later reader loads;
- a train.py checkpoint's meta.pt, "tokenizer", with those files copied into the checkpoint directory, so that a
  checkpoint decodes its own text wherever it is moved (evaluation.py, sample.py, export_hf.py);
- a transformers model directory holds its own files.

The record: kind ('tiktoken' or 'transformers'), name, vocab_size (the ids are 0..vocab_size-1), eot and
eot_token (the token written before every document), vocab_sha256 (a hash of every id's token, in id order) and,
for a transformers tokenizer, files_sha256 (a hash of the files it was read from). Two tokenizers are one
vocabulary when their vocab_sha256 agree: what KD asks of a teacher and its student's data is that every id
means the same token, whichever files hold them.

`python prepare.py bpe` trains a tokenizer of this kind on a data directory's train split (train_bpe, save_bpe).

transformers is imported only where a transformers tokenizer is met.
"""
import hashlib
import json
import os

from common import InputError

GPT2 = 'r50k_base'  # tiktoken's name for GPT-2's BPE
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256  # <|endoftext|>
# vocab_sha256 of GPT-2's tokens as transformers spells them, 'Ġthe' for ' the' (a test computes it from tiktoken)
GPT2_VOCAB_SHA256 = '3eec753ec2898a20d38172a5e4488c7612b730d67ef26d18bbdb2722c51a8c1d'
GPT2_RECORD = dict(kind='tiktoken', name=GPT2, vocab_size=GPT2_VOCAB_SIZE, eot=GPT2_EOT, eot_token='<|endoftext|>',
                   vocab_sha256=GPT2_VOCAB_SHA256)
# The document separator: a token of these names where the vocabulary has one, else the eos_token. A chat model's
# eos_token ends a turn (SmolLM2-Instruct's <|im_end|>, Llama 3's <|eot_id|>), not a document.
END_OF_TEXT = ('<|endoftext|>', '<|end_of_text|>')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json',
                   'vocab.json', 'merges.txt', 'tokenizer.model', 'chat_template.jinja')


def vocab_hash(tokens):
    return hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode('utf-8')).hexdigest()


class GPT2Tokenizer:
    """GPT-2's BPE, by tiktoken. encode: the text as text (an '<|endoftext|>' in it is five tokens of text)."""
    kind, name, vocab_size, eot, eot_token = 'tiktoken', GPT2, GPT2_VOCAB_SIZE, GPT2_EOT, '<|endoftext|>'

    def __init__(self):
        import tiktoken
        self.enc = tiktoken.get_encoding(GPT2)

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, threads=1):
        return self.enc.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids):
        return self.enc.decode(ids)

    def record(self):
        return dict(GPT2_RECORD)

    def transformers_tokenizer(self, model_max_length=None):
        """GPT-2's tokenizer as a transformers tokenizer, made offline from tiktoken's ranks by transformers' own
        converter (which reads tiktoken's file format: base64 token, rank)."""
        import base64
        import tempfile
        from transformers import GPT2TokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
        with tempfile.TemporaryDirectory() as scratch:
            ranks = os.path.join(scratch, f'{GPT2}.tiktoken')
            with open(ranks, 'wb') as f:
                f.writelines(base64.b64encode(token) + b' %d\n' % rank
                             for token, rank in self.enc._mergeable_ranks.items())
            converted = TikTokenConverter(vocab_file=ranks, pattern=self.enc._pat_str,
                                          extra_special_tokens=self.enc._special_tokens).converted()
        return GPT2TokenizerFast(tokenizer_object=converted, bos_token=self.eot_token, eos_token=self.eot_token,
                                 unk_token=self.eot_token, model_max_length=model_max_length)

    def save(self, folder, model_max_length=None):
        self.transformers_tokenizer(model_max_length).save_pretrained(folder)


class TransformersTokenizer:
    """A transformers fast tokenizer from a folder (a model's directory, or one saved by prepare.py). encode, as
    GPT-2's: no BOS or EOS added, and a special token's string in the text is text, not that token."""
    kind = 'transformers'

    def __init__(self, folder, name=None):
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise InputError(f"{folder}: a transformers tokenizer needs `pip install transformers`") from error
        if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
            raise InputError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
        try:
            self.hf = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise InputError(f"{folder}: the tokenizer does not load ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:200]})") from error
        if not self.hf.is_fast:
            raise InputError(f"{folder}: a fast tokenizer (tokenizer.json) is needed; this one is "
                             f"{type(self.hf).__name__}")
        self.folder, self.name = folder, name or os.path.basename(os.path.normpath(folder))
        self.backend = self.hf.backend_tokenizer
        self.backend.encode_special_tokens = True  # '<|endoftext|>' in a text is text, as tiktoken's encode_ordinary
        self.vocab_size = max(self.hf.get_vocab().values()) + 1
        ends = [token for token in END_OF_TEXT if self.backend.token_to_id(token) is not None]
        self.eot_token = ends[0] if ends else self.hf.eos_token
        if self.eot_token is None:
            raise InputError(f"{folder}: the tokenizer has no end-of-text token ({' or '.join(END_OF_TEXT)}, or an "
                             f"eos_token) to separate documents")
        self.eot = self.backend.token_to_id(self.eot_token)

    def encode(self, text):
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, threads=1):  # the Rust library's own threads (RAYON_NUM_THREADS)
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.backend.decode(list(ids), skip_special_tokens=False)  # as it is: no clean-up of spaces

    def record(self):
        files = hashlib.sha256()
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(self.folder, name)):
                with open(os.path.join(self.folder, name), 'rb') as f:
                    files.update(name.encode() + hashlib.file_digest(f, 'sha256').digest())
        tokens = [self.backend.id_to_token(i) for i in range(self.vocab_size)]
        return dict(kind=self.kind, name=self.name, vocab_size=self.vocab_size, eot=self.eot,
                    eot_token=self.eot_token, vocab_sha256=vocab_hash(tokens), files_sha256=files.hexdigest())

    def save(self, folder, model_max_length=None):
        if model_max_length:
            self.hf.model_max_length = model_max_length
        self.hf.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------
# Records and where their files are


def as_record(value):
    """A record from what a meta.json or meta.pt holds: the record itself, or, from before records, the name of
    tiktoken's encoding (GPT-2's), or nothing (nanoGPT-style data: GPT-2's)."""
    if isinstance(value, dict):
        return value
    if value in (None, GPT2):
        return dict(GPT2_RECORD)
    return dict(kind='tiktoken', name=value, vocab_sha256=value)  # no tiktoken encoding but GPT-2's is supported


def same_vocabulary(a, b):
    return a['vocab_sha256'] == b['vocab_sha256']


def describe(record):
    return f"{record['name']!r}" + (f" ({record['vocab_size']:,} tokens)" if 'vocab_size' in record else '')


def load(record, folder):
    """The tokenizer of a record, its files (for a transformers one) in folder, checked to be that vocabulary."""
    record = as_record(record)
    if record['kind'] == 'tiktoken':
        if record['name'] != GPT2:
            raise InputError(f"tokenizer {record['name']!r}: of tiktoken's encodings only GPT-2's ({GPT2}) is known")
        return GPT2Tokenizer()
    tokenizer = TransformersTokenizer(folder, record['name'])
    if not same_vocabulary(tokenizer.record(), record):
        raise InputError(f"{folder}: its tokenizer is not the {describe(record)} it should be (another vocabulary)")
    return tokenizer


def read_data_meta(data_dir):
    """A data directory's meta.json, or None (nanoGPT-style data has none)."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def data_record(data_dir):
    """The record of the tokenizer a data directory was made with."""
    meta = read_data_meta(data_dir) or {}
    return as_record(meta.get('tokenizer', meta.get('encoding')))


def of_data(data_dir):
    return load(data_record(data_dir), os.path.join(data_dir, 'tokenizer'))


def train_bpe(texts, vocab_size):
    """A byte-level BPE of vocab_size tokens trained on texts (an iterable of documents), as nanochat trains its own:
    GPT-2's pre-tokenization and its 256 byte tokens, <|endoftext|> as id 0. A `tokenizers` Tokenizer (save_bpe)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT[0]],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return bpe


def save_bpe(bpe, folder):
    """Save a Tokenizer as a transformers fast tokenizer's directory (what prepare.py --tokenizer reads), whole or
    not at all (written beside it, then renamed). Returns it, loaded from there."""
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TEXT[0]).save_pretrained(folder + '.tmp')
    os.replace(folder + '.tmp', folder)
    return TransformersTokenizer(folder)


def for_prepare(name_or_dir):
    """prepare.py's --tokenizer: '' for GPT-2's, else a transformers tokenizer's directory (a model's)."""
    if not name_or_dir or name_or_dir == GPT2:
        return GPT2Tokenizer()
    if not os.path.isdir(name_or_dir):
        raise InputError(f"--tokenizer {name_or_dir}: no such directory (a transformers model or tokenizer "
                         f"directory, e.g. one downloaded with `huggingface-cli download`)")
    return TransformersTokenizer(name_or_dir)
