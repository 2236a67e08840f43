"""
What a training run leaves in out_dir to be continued from: its checkpoints and its metrics.jsonl.

out_dir/ckpt is a torch.distributed.checkpoint (DCP) directory that every rank writes its part of in
parallel (a rank's shard under fsdp; under ddp the replicated tensors are spread over the ranks), and that
loads on any number of ranks, or whole in one process (salt.load_model); ckpt/meta.pt, written by rank 0,
holds the rest: the step, the config, the loader's position, the RNG state. It is written as ckpt.tmp, then
renamed; the previous one stays as ckpt.prev, which a run falls back to if ckpt is incomplete or damaged
(meta.pt records every other file's size and checksum, verified before loading), or does not load all the same.
A run whose out_dir holds a checkpoint continues from it, so that a job killed at any moment is restarted with
the same command; a run with other settings is refused. A run keeps a copy of its checkpoint at each of its
branch_steps (out_dir/ckpt_stepN, which no later checkpoint replaces); a branch (branch_from='DIR@N') starts
from that copy in an out_dir of its own, exactly as if its parent's run had been resumed there with another
max_steps and learning-rate decay, and once it has a checkpoint of its own it continues from that one. out_dir/run.lock keeps a second job out while one runs
(common.lock_for_the_job).
"""
import hashlib
import io
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from common import InputError, atomic_write
from data import ORDER_VERSION

# settings a resumed run may change without changing what it computes (grad_accum_steps: with the number of
# processes, see check_resumable)
RESUMABLE_CHANGES = {'out_dir', 'init_from', 'max_steps', 'eval_interval', 'eval_batches', 'log_interval',
                     'ckpt_interval', 'wandb_log', 'wandb_project', 'eval_tasks', 'eval_shots',
                     'eval_fewshot_files', 'compile', 'device', 'dtype', 'peak_flops', 'ddp_timeout',
                     'skip_nonfinite', 'parallelism', 'shard_teacher', 'activation_checkpointing',
                     'grad_accum_steps', 'branch_steps', 'log_ids', 'eval_compiled'}
# and those a branch may change besides: where its learning rate decays (check_learning_rates compares the rates
# before the branch point, step by step)
BRANCH_CHANGES = {'lr_decay_steps', 'decay_fraction', 'branch_from'}
# what the learning rate of a step depends on (salt.lr_at): a resumed run's must not move for the steps it took
LR_SETTINGS = ('max_steps', 'lr_decay_steps', 'lr_schedule', 'decay_fraction', 'warmup_steps', 'learning_rate',
               'min_lr')
# paths a resumed run compares by what they hold (fingerprints, kept in meta.pt as 'inputs'), not by name
MOVABLE = {'data_dir': 'data', 'teacher_ckpt': 'teacher', 'score_file': 'SALT_DS selection'}
# settings younger than some checkpoints, with the value the runs that wrote those had
ADDED_SETTINGS = {'kd_loss': 'forward_kl', 'kd_end': 'steps', 'kd_token_weight': 'constant', 'architecture': '',
                  'n_layer': None, 'n_head': None, 'n_embd': None, 'n_kv_head': None, 'positions': None,
                  'rope_theta': None, 'norm': None, 'mlp': None, 'mlp_hidden': None, 'bias': None,
                  'tie_embeddings': None, 'lr_schedule': 'cosine', 'decay_fraction': 0.2, 'branch_from': '',
                  'role': 'student'}


def checkpoint_paths(out_dir):
    return [os.path.join(out_dir, 'ckpt'), os.path.join(out_dir, 'ckpt.prev')]  # newest first


def read_meta(ckpt):
    """The meta.pt of a train.py checkpoint directory (model_args, step, run_id, tokenizer, config, ...), after
    checking that the directory is one."""
    if not os.path.exists(ckpt):
        raise InputError(f"checkpoint {ckpt!r} does not exist: train the SLM first "
                         f"(python train.py config/<slm config>.py) or fix the path")
    meta_file = os.path.join(ckpt, 'meta.pt')
    if not (os.path.isfile(meta_file) and os.path.isfile(os.path.join(ckpt, '.metadata'))):
        raise InputError(f"{ckpt!r} is not a checkpoint of train.py (a directory with meta.pt and .metadata) nor a "
                         f"transformers model's directory (with config.json)")
    try:
        return torch.load(meta_file, map_location='cpu', weights_only=True)
    except Exception as error:  # whatever is wrong with the file, the remedy is the same
        raise InputError(f"{meta_file!r} does not load ({type(error).__name__}): the checkpoint is damaged") from error


def warn(message):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: {message}; trying the previous checkpoint")


def checked(path):
    """The meta of checkpoint `path` if its files pass their checks, else None, with a warning line naming the
    damage. Under torchrun every rank checks its share of the files, and all agree."""
    meta, error = None, None
    try:
        meta = read_meta(path)
        verify(path, meta)
    except InputError as damage:  # whatever is wrong with it, the previous one may be fine
        error = str(damage)
    error = next((e for e in gather(error) if e), None)
    if error:
        warn(error)
    return None if error else meta


def latest(out_dir):
    """(path, meta) of the newest intact checkpoint in out_dir, or (None, None) when there is none. Under
    torchrun all ranks take the same checkpoint: a rank that loaded another would train on other weights."""
    paths = checkpoint_paths(out_dir)
    for path in paths:
        meta = checked(path) if os.path.isdir(path) else None
        if meta is not None:
            return path, meta
    if any(os.path.exists(path) for path in paths):
        raise InputError(f"no checkpoint in {out_dir} is intact (see the warnings above): move them away "
                         f"to start over")
    return None, None


def my_share(files):
    """This rank's share of a checkpoint's files to hash (all of them in one process): hashing at save and
    verifying at load are spread over the ranks like the writing and the reading."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return sorted(files)[rank::world_size]


def digest(file):
    with open(file, 'rb') as f:  # sha1: fast, and damage, not an attacker, is what it must catch
        return hashlib.file_digest(f, 'sha1').hexdigest()


def file_digests(path):
    """{name: [size, sha1]} of a written checkpoint's files but meta.pt, gathered from every rank's share."""
    files = my_share(name for name in os.listdir(path) if name != 'meta.pt')
    digests = {name: [os.path.getsize(os.path.join(path, name)), digest(os.path.join(path, name))]
               for name in files}
    return {name: value for share in gather(digests) for name, value in share.items()}


def verify(path, meta, share=my_share):
    """Raise InputError naming the first damaged file of this rank's share (share=sorted: all of them): its size
    and checksum as meta.pt recorded them."""
    if 'files' not in meta:
        return verify_sizes(path, share)
    for name in share(meta['files']):
        file, (size, checksum) = os.path.join(path, name), meta['files'][name]
        if not os.path.isfile(file):
            raise InputError(f"{file!r} is missing: the checkpoint is damaged")
        if os.path.getsize(file) != size:
            raise InputError(f"{file!r} has {os.path.getsize(file)} bytes, not {size}: the checkpoint is damaged")
        if digest(file) != checksum:
            raise InputError(f"{file!r} does not match its checksum: the checkpoint is damaged")


def verify_sizes(path, share=my_share):
    """A checkpoint older than the checksums, checked as far as its .metadata allows: every file it points
    into exists and is long enough."""
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as error:  # whatever is wrong with the file, the remedy is the same
        raise InputError(f"{os.path.join(path, '.metadata')!r} does not load ({type(error).__name__}): the "
                         f"checkpoint is damaged") from error
    ends = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name in share(ends):
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) < ends[name]:
            raise InputError(f"{file!r} is missing or shorter than {ends[name]} bytes: the checkpoint is damaged")


def teacher_identity(config, meta, identify):
    """The id of a run's teacher (identify: salt.teacher_id), '' for none. A teacher at the path the checkpoint's
    run had is the one it trained with, whose id meta.pt keeps: it is not read again (stage 2 may have deleted
    it)."""
    teacher = config['teacher_ckpt']
    if meta and meta['config']['teacher_ckpt'] == teacher:
        return meta['inputs']['teacher_ckpt']
    return identify(teacher) if teacher else ''


def fingerprints(data_fingerprint, selected_ids, teacher_id):
    """What a run reads, by content, {key of MOVABLE: a hash or an id}: a resumed run may find its data, teacher
    or scores moved or copied elsewhere (a new path), not changed."""
    selection = hashlib.sha256(selected_ids.tobytes()).hexdigest() if selected_ids is not None else ''
    return dict(data_dir=data_fingerprint, score_file=selection, teacher_ckpt=teacher_id)


def check_resumable(meta, config, fingerprints, world_size, branch=False):
    """Refuse to continue a run with other settings; paths may differ where they hold the same thing. A branch
    (branch=True: meta is its parent's) may change BRANCH_CHANGES too."""
    where = f"branch_from={config['branch_from']!r} is" if branch else f"{config['out_dir']} holds"
    order = meta['loader'].get('order', 1)
    if order != ORDER_VERSION:  # the step's model is fine, but the batches from here on would be another run's
        raise InputError(f"{where} a checkpoint of data order {order}, this code reads order {ORDER_VERSION} "
                         f"(data.ORDER_VERSION): continued, it would read other sequences than the run it began. "
                         f"Train it again in another out_dir, or delete this one")
    saved = {**ADDED_SETTINGS, **meta['config']}
    may_change = RESUMABLE_CHANGES | set(MOVABLE) | (BRANCH_CHANGES if branch else set())
    changed = [f"{key}={saved.get(key)!r} (now {value!r})" for key, value in config.items()
               if key not in may_change and saved.get(key) != value]
    changed += [f"{key}={config[key]!r} (the run read another {what} from {saved[key]!r})"
                for key, what in MOVABLE.items() if fingerprints[key] != meta['inputs'][key]]
    # the global batch: on other processes, grad_accum_steps must keep it (the loader reads the same batches)
    if saved['grad_accum_steps'] * meta['world_size'] != config['grad_accum_steps'] * world_size:
        changed.append(f"grad_accum_steps x processes = {saved['grad_accum_steps']} x {meta['world_size']} "
                       f"(now {config['grad_accum_steps']} x {world_size})")
    if changed and branch:
        raise InputError(f"branch_from={config['branch_from']!r} is a checkpoint of a run with other settings: "
                         f"{', '.join(changed)}. A branch changes only max_steps and where its learning rate decays.")
    if changed:
        raise InputError(f"{config['out_dir']} holds a checkpoint of a run with other settings: "
                         f"{', '.join(changed)}. Continue that run with its settings, or give this one "
                         f"another out_dir.")


def kept_path(out_dir, step):
    return os.path.join(out_dir, f'ckpt_step{step}')


def keep(out_dir, step):
    """Copy out_dir/ckpt, just written at `step`, to kept_path (as a .tmp, then renamed: a kill leaves it whole or
    absent): a branch point, which later checkpoints do not replace."""
    kept = kept_path(out_dir, step)
    shutil.rmtree(kept + '.tmp', ignore_errors=True)
    shutil.copytree(checkpoint_paths(out_dir)[0], kept + '.tmp')
    if os.path.exists(kept):  # a rerun of a run that was killed after keeping it
        shutil.rmtree(kept)
    os.replace(kept + '.tmp', kept)


def branch_point(spec):
    """(path, meta) of the checkpoint a branch starts from: branch_from='DIR@STEP', the copy that the run in DIR
    kept at STEP (its branch_steps), checked like any checkpoint."""
    parent, _, step = spec.rpartition('@')
    path = kept_path(parent, int(step))
    if not os.path.isdir(path):
        kept = sorted(int(name[len('ckpt_step'):]) for name in (os.listdir(parent) if os.path.isdir(parent) else [])
                      if re.fullmatch(r'ckpt_step\d+', name))
        raise InputError(f"branch_from={spec!r}: {parent!r} holds no checkpoint of step {step} (it kept "
                         f"{', '.join(map(str, kept)) or 'none'}: a run keeps one at each of its branch_steps)")
    meta = checked(path)
    if meta is None:
        raise InputError(f"branch_from={spec!r}: {path!r} is damaged (the warning above says how)")
    return path, meta


def check_learning_rates(meta, config, lr_at, branch=False):
    """A resumed run, or a branch (branch=True), must have had the learning rate of its checkpoint's run (meta's) at
    every step it took, or it would not be the run it stands for: a new max_steps moves a cosine run's, and a WSD
    run's past its decay start. lr_at is salt.lr_at."""
    before = {**ADDED_SETTINGS, **meta['config']}
    step = next((s for s in range(meta['step']) if lr_at(s, before) != lr_at(s, config)), None)
    if step is None:
        return
    changed = ', '.join(f"{key}={config[key]!r} (was {before[key]!r})" for key in LR_SETTINGS
                        if config[key] != before[key])
    rates = f"at step {step} the learning rate was {lr_at(step, before):.4g} and would be {lr_at(step, config):.4g}"
    if branch:
        raise InputError(f"branch_from={config['branch_from']!r}: {rates} in this branch: a branch point lies before "
                         f"the branch's decay and its parent's (lr_schedule='wsd', salt.decay_start)")
    raise InputError(f"{config['out_dir']} holds a run of {meta['step']} steps: {rates} with {changed}, so it "
                     f"would not be one run. Keep its settings, or branch from it (branch_from, lr_schedule='wsd')")


def restore(out_dir, path, meta, model, optimizer):
    """Load checkpoint `path`'s weights and optimizer state into model and optimizer, each rank the part it holds,
    whatever number of ranks wrote it. One that does not load although its files passed their checks (damaged
    before they were hashed) gives way to the previous intact one, with a warning line, as latest() falls back
    on any other damage. Returns the (path, meta) that loaded."""
    paths = checkpoint_paths(out_dir)
    for candidate in paths[paths.index(path):] if path in paths else [path]:  # a branch point: no other
        if candidate != path:
            meta = checked(candidate) if os.path.isdir(candidate) else None
            if meta is None:
                continue
        failure = load_state(candidate, model, optimizer)
        if failure is None:
            return candidate, meta
        warn(f"{candidate!r} does not load ({failure}): the checkpoint is damaged")
    raise InputError(f"no checkpoint in {out_dir} loads (see the warnings above): move them away to start over")


def load_state(path, model, optimizer):
    """Read checkpoint path into model and optimizer: None, or what failed (on any rank: every rank says the
    same). A failure may leave them half read, for the next checkpoint to overwrite whole."""
    state = dict(zip(('model', 'optimizer'), get_state_dict(model, optimizer)))
    failure = None
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as error:  # whatever a damaged file makes DCP raise (a BaseException)
        failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    failure = next((f for f in gather(failure) if f), None)
    if failure is None:
        set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'])
    return failure


def restore_progress(meta, loader):
    """Put the loader and each rank's RNG where the checkpoint left them."""
    loader.load_state_dict(meta['loader'])
    rank = dist.get_rank() if dist.is_initialized() else 0
    # each rank's own state (a checkpoint older than them holds rank 0's only); a rank beyond those that wrote
    # it keeps the seed train.py gave it
    cpu_states = meta.get('rng_cpu_ranks', [meta['rng_cpu']])
    if rank < len(cpu_states):
        torch.set_rng_state(cpu_states[rank])
    cuda_states = meta.get('rng_cuda_ranks', [meta['rng_cuda']] if 'rng_cuda' in meta else [])
    if torch.cuda.is_available() and rank < len(cuda_states):
        torch.cuda.set_rng_state(cuda_states[rank])


def save(out_dir, model, optimizer, master, distributed, files_from=None, **meta):
    """Every rank writes its part of ckpt.tmp (DCP fsyncs its files), rank 0 adds the files of the folder
    files_from (the data's tokenizer's, if any) and meta.pt (meta and the RNG state), then moves ckpt to ckpt.prev
    and ckpt.tmp to ckpt: a kill at any moment leaves at least one complete checkpoint. meta.pt holds only tensors
    and plain values, so torch.load(weights_only=True) reads it. Returns what to call the checkpoint in
    messages."""
    meta['rng_cpu_ranks'] = gather(torch.get_rng_state())  # each rank draws its own dropout masks
    meta['rng_cpu'] = meta['rng_cpu_ranks'][0]  # what the code before rng_cpu_ranks reads
    if next(model.parameters()).is_cuda:
        meta['rng_cuda_ranks'] = gather(torch.cuda.get_rng_state())
        meta['rng_cuda'] = meta['rng_cuda_ranks'][0]
    newest, previous = checkpoint_paths(out_dir)
    tmp = newest + '.tmp'
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)  # a killed run's
    if distributed:
        dist.barrier()
    # a rank whose write failed ends the run on every rank, not in a collective's timeout
    outcome = write(tmp, model, optimizer, master, meta, files_from)
    outcomes = gather(outcome if outcome is None or isinstance(outcome, str) else '')
    if any(failed is not None for failed in outcomes) and master:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what it took; ckpt and ckpt.prev are untouched
    if isinstance(outcome, BaseException):
        raise outcome  # a bug, not the disk: its traceback
    failed = next((failed for failed in outcomes if failed), None)
    if failed:
        raise InputError(f"could not write the checkpoint {tmp!r} ({failed}): {newest!r} and {previous!r} are "
                         f"as they were; free some space (or raise the quota) and rerun the same command to "
                         f"resume")
    if '' in outcomes:
        raise RuntimeError(f"another rank could not write its part of {tmp!r}: its traceback says why")
    if master:
        if os.path.exists(previous):
            shutil.rmtree(previous)
        if os.path.exists(newest):
            os.replace(newest, previous)
        os.replace(tmp, newest)
        directory = os.open(out_dir, os.O_RDONLY)  # make the renames themselves durable
        os.fsync(directory)
        os.close(directory)
    return f"{newest} (step {meta['step']})"


def gather(value):
    """[every rank's value], in rank order; [value] in one process."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class _Writer(dcp.FileSystemWriter):
    """DCP's writer, keeping what stopped this rank's own write: DCP hands every rank each rank's failure as a copy
    that has lost the OSError (a full disk) behind it."""
    error = None

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except BaseException as error:
            self.error = error
            raise


def write(tmp, model, optimizer, master, meta, files_from=None):
    """Write the checkpoint into tmp. Returns None when it is written, else why not: the message of the disk's
    OSError (no space, a quota, a file-size limit), '' when it was another rank's write that failed (that rank
    says why), or the exception of any other failure (a bug), for save() to raise once every rank has reported."""
    writer = _Writer(tmp)
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({'model': model_state, 'optimizer': optimizer_state}, storage_writer=writer)
        meta['files'] = file_digests(tmp)  # checked before the checkpoint is trusted (verify)
        if master:  # rank 0 alone from here on: a failure here must not leave the others in a collective
            for name in sorted(os.listdir(files_from) if files_from else []):
                with open(os.path.join(files_from, name), 'rb') as f:
                    atomic_write(os.path.join(tmp, name), [f.read()])
                meta['files'][name] = [os.path.getsize(os.path.join(tmp, name)), digest(os.path.join(tmp, name))]
            buffer = io.BytesIO()
            torch.save(meta, buffer)
            atomic_write(os.path.join(tmp, 'meta.pt'), [buffer.getvalue()])
    except (Exception, CheckpointException) as error:
        if isinstance(error, CheckpointException) and writer.error is None:
            return ''
        disk = disk_error(writer.error or error)
        if disk is None:
            return error
        return os.strerror(disk.errno) if disk.errno else str(disk)
    return None


def disk_error(error):
    """The OSError behind a failed write, or None. dcp gathers each rank's exception into one
    CheckpointException (a BaseException), and torch.save's zip writer turns the OSError of a full disk into
    a RuntimeError whose context it is."""
    causes = [cause for cause, _ in error.failures.values()] if isinstance(error, CheckpointException) else [error]
    for cause in causes:
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            return cause
    return None


def step_unless(optimizer, nonfinite):
    """optimizer.step(), unless `nonfinite` (0-dim float, 1 or 0) says the step's loss or gradient is not finite:
    then no weight and no optimizer state changes. Fused AdamW (CUDA) decides on the device, taking it as
    GradScaler's found_inf, so the host never waits for the step; the unfused one (a CPU) has no such input, and
    there the host reads it at no cost."""
    if optimizer.defaults.get('fused'):
        optimizer.found_inf = nonfinite
        optimizer.step()
    elif not nonfinite:
        optimizer.step()


def nonfinite(unchecked, skipped, allowed, last_good, master):
    """The steps of `unchecked`, [(step, [non-finite, loss, gradient norm])] on the device, read in one host sync
    and emptied: each non-finite one had its update dropped (step_unless) and its batch is skipped while no more
    than `allowed` were (returns the new count), else the run stops, naming the last good checkpoint, which is
    kept."""
    values = torch.stack([value for _, value in unchecked]).tolist() if unchecked else []
    for (step, _), (bad, loss, grad_norm) in zip(unchecked, values):
        if not bad:
            continue
        skipped += 1
        if skipped > allowed:
            raise SystemExit(f"step {step}: loss {loss}, gradient norm {grad_norm}: not finite, stopping. The last "
                             f"good checkpoint is {last_good or 'none (none was written yet)'}. Lower learning_rate, "
                             f"or set skip_nonfinite=N to skip up to N such batches.")
        if master:
            print(f"step {step}: non-finite loss or gradient, batch skipped ({skipped}/{allowed})")
    unchecked.clear()
    return skipped


class Metrics:
    """out_dir/metrics.jsonl, one JSON record a line, the first a header (the config, the code version, the
    device), so that any number in it can be traced to what produced it; and Weights & Biases, given a
    project. On resume it keeps the records up to the checkpoint's step only: a killed job may have logged
    steps after its last checkpoint, which are about to be trained again, and may have left half a line. A new
    branch's starts with its parent's records (history, that run's metrics.jsonl) up to the branch point, so that
    it reads as the one run it stands for."""

    def __init__(self, out_dir, step, header, wandb_project='', history=None):
        path, kept = os.path.join(out_dir, 'metrics.jsonl'), []
        source = path if os.path.isfile(path) else history  # a new branch: its parent's records up to its start
        if step > 0 and source and os.path.isfile(source):
            with open(source) as f:
                kept = [line for line in f if line.endswith('\n') and json.loads(line).get('step', 0) <= step]
        with open(path + '.tmp', 'w') as f:
            f.writelines(kept + [json.dumps(header) + '\n'])
        os.replace(path + '.tmp', path)
        self.file, self.wandb = open(path, 'a'), None
        if wandb_project:
            import wandb  # only the runs that log there need it
            wandb.init(project=wandb_project, name=os.path.basename(out_dir.rstrip('/')), id=header['run_id'],
                       resume='allow', config=header['config'])
            self.wandb = wandb

    def log(self, record):
        self.file.write(json.dumps(record) + '\n')
        self.file.flush()
        if self.wandb:
            self.wandb.log(record, step=record['step'])

    def close(self):
        self.file.close()
        if self.wandb:
            self.wandb.finish()  # here, not at exit: a job's ranks end without the interpreter's teardown
