"""
What every command of the project shares: errors a user can act on, files written whole, the code version
behind a result, the start of a process under torchrun (which ends with its launcher), and one job per output.
"""
import atexit
import datetime
import fcntl
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time

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


def end_now(status):
    """Exit with `status` at once, stdout and stderr flushed, skipping the interpreter's teardown: in a process of a
    job that teardown can crash in gloo's threads (a SIGABRT, seen rarely at the end of 2-rank CPU runs; PyTorch
    PR 179291), which would turn a finished job's status into -6. A command's files are closed by then."""
    for path in list(_LOCKS):  # what atexit would have done
        unlock(path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def end_job(distributed):
    """The end of a command under torchrun: the ranks leave together (gloo may abort a rank still at work), the
    process group goes, and the process exits 0 (end_now). Nothing in one process."""
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
        end_now(0)


def end_with_parent(who):
    """From now on this process exits within a second of its parent's end, even by SIGKILL (which runs no
    cleanup), instead of working on as an orphan; `who` names it in the line it prints. An orphan is re-parented,
    so a thread watches os.getppid(). torchrun starts its workers in sessions of their own: a signal to the
    launcher's process group does not reach them, and without this they would train on beside a rerun."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os.write(2, f"{who}: its parent (pid {parent}), the launcher, is gone: stopping\n".encode())
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def compute_init(device="", timeout_s=None):
    """Start this process: (distributed, rank, world_size, device). Under torchrun it joins the process group
    (nccl on CUDA, gloo on CPU), takes its node-local GPU and ends with its launcher (end_with_parent); `device`
    ('' = cuda when there is one, else cpu) is a single process's. timeout_s bounds how long a rank waits in a
    collective for a rank that died (None: torch.distributed's default)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, device
    end_with_parent(f"rank {os.environ['RANK']}")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s) if timeout_s else None)
    report = sys.excepthook  # torch's, which prefixes each line with the rank, around report_input_errors' hook

    def report_and_end(*args):  # a rank that stops on an exception ends as soon as it has said why (end_now)
        report(*args)
        end_now(1)
    sys.excepthook = report_and_end
    return True, dist.get_rank(), dist.get_world_size(), device


_LOCKS = {}  # path -> the descriptor of each lock this process holds: closing it would release the lock


def lock_for_the_job(path, what):
    """Make this job the only writer of `what` (a run's out_dir, a score file) for as long as it lives: global rank
    0 takes an exclusive lock on the file `path` (made if missing, on the filesystem every node shares), and
    writes its holder (host, pid, since when) into it. A job that finds it held ends at start, every rank with
    the same one line naming the holder, having touched nothing. The kernel releases the lock when its holder
    ends, however it ends: a crashed job leaves no stale lock; one that exits removes the file too (unlock). POSIX
    locks (fcntl.lockf), which NFS honours across nodes."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another process
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "a process that has not said who"
            os.close(fd)
            error = f"{what} is being written by another job ({holder}; its lock: {path}): wait for it to end"
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n".encode(), 0)
            _LOCKS[path] = fd
            atexit.register(unlock, path)
    if dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared)
        error = shared[0]
    if error:
        raise InputError(error)


def unlock(path):
    """Release a lock of lock_for_the_job that this process holds, and remove its file (at exit: no clutter beside
    the output, and a job refused at start leaves nothing)."""
    if path in _LOCKS:
        os.unlink(path)  # first: a job that opens the path from now on makes a new lock
        os.close(_LOCKS.pop(path))


def fsdp_shard(model, bf16, blocks_only=False):
    """FSDP2 on an LM (model.py: our GPT, or a transformers teacher): each block its own unit, gathered whole only
    inside its forward and backward, so at any moment a rank holds its shard of everything plus the few blocks at
    work; the root unit holds the embeddings, the final norm and the LM head. bf16: compute in bf16, reduce
    gradients in fp32. blocks_only (a frozen teacher, whose head feeds the student's loss whole): the blocks alone."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.blocks():
        fully_shard(block, mp_policy=policy)
        if blocks_only:  # each block is then a root, and FSDP keeps a root gathered after its forward, for the
            block.register_forward_hook(_reshard)  # backward that follows in training: a teacher has none
    if not blocks_only:
        # the root's inputs as given: the KD weight is an fp32 tensor, which bf16 would make 0.66797 of 0.667
        fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=policy.param_dtype,
                                                          reduce_dtype=policy.reduce_dtype, cast_forward_inputs=False))


@torch.compiler.disable  # a compiled block's hook: FSDP's own code, run as it is
def _reshard(block, args, output):
    block.reshard()
