"""
What every command of the project shares: errors a user can act on, files written whole, the code version
behind a result, and the start of a process under torchrun.
"""
import datetime
import json
import os
import secrets
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


class InputError(ValueError):
    """Bad input the user can fix: a file, a config key or a value, named in the message. The project's
    commands print its message as one line and exit with status 1; any other exception is a bug and keeps
    its traceback."""


def report_input_errors():
    """Install the command-line behaviour of InputError for this process (every script calls it first)."""
    default_hook = sys.excepthook

    def hook(kind, error, traceback):
        if issubclass(kind, InputError):
            print(f"error: {error}", file=sys.stderr)
        else:
            default_hook(kind, error, traceback)
    sys.excepthook = hook


def atomic_write(path, chunks):
    """Write byte chunks to path so that no half-written file ever exists under that name."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # same folder: replace is atomic
    try:
        with open(tmp, "xb") as f:  # unlike mkstemp, keeps the usual umask permissions
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, [json.dumps(obj, indent=2).encode("utf-8")])


def git_commit():
    """The commit of this code, recorded with every result: $SALT_GIT_COMMIT where it is set (a copy of the
    code without its .git), else git's, else 'unknown'."""
    if os.environ.get("SALT_GIT_COMMIT"):
        return os.environ["SALT_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def compute_init(device="", timeout_s=None):
    """Start this process: (distributed, rank, world_size, device). Under torchrun it joins the process group
    (nccl on CUDA, gloo on CPU) and takes its node-local GPU; `device` ('' = cuda when there is one, else cpu)
    is a single process's. timeout_s bounds how long a rank waits in a collective for a rank that died
    (None: torch.distributed's default)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s) if timeout_s else None)
    return True, dist.get_rank(), dist.get_world_size(), device


def fsdp_shard(model, bf16, blocks_only=False):
    """FSDP2 on an LM (model.py: our GPT, or a transformers teacher): each block its own unit, gathered whole only
    inside its forward and backward, so at any moment a rank holds its shard of everything plus the few blocks at
    work; the root unit holds the embeddings, the final norm and the LM head. bf16: compute in bf16, reduce
    gradients in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.blocks():
        fully_shard(block, mp_policy=policy)
    if not blocks_only:
        fully_shard(model, mp_policy=policy)
