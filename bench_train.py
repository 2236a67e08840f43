"""
The speed of a training step: tokens/s and MFU of train.py itself, plain and in SALT's KD stage, next to the
FLOP count's prediction of what the teacher's forward adds.

    python bench_train.py                         # on a GPU: gpt2-medium and gpt2, block 1024, compiled and not
    python bench_train.py --pairs demo-student:demo-slm --block_size 64 --batch_size 4 --steps 8   # a CPU

Each STUDENT:TEACHER pair (model.PRESETS; the defaults' teachers have half their student's blocks) runs
`train.py` for --steps steps of SALT, the first half in the KD stage, once per --compile setting ('off', or
train.py's compile_scope: 'blocks' or 'model'; the teacher is compiled when the student is), on --data_dir (the
standard library, tokenized first if missing). Its metrics.jsonl gives, per stage, the median tokens/s and MFU
over the logged steps; train.py leaves the first step of the run and of stage 2, where torch.compile compiles,
out of them and logs their time apart ('first step s', compilation included). Its evaluations run eager
(eval_compiled=False), so that no graph is compiled outside those first steps: their times count every
compilation. The teacher is a checkpoint of its preset after one training step: its weights do not matter for
speed; the student writes no checkpoint.
MFU counts the student's training FLOPs (`mfu`) or those and the teacher's forward (`mfu_with_teacher`),
over --peak_flops (H100/H200 SXM dense bf16 by default).

With --fsdp the runs train under FSDP in one process (torchrun), as a cluster's rank does. Each --out record also
holds what the first GPU run must show besides speed (`run`): the loss's path, the memory plan and the peak, and
with compile the graphs at the first and the last logged step (more at the last: it recompiled) and the graph
breaks. --prepare makes the data and the teachers and stops, so that a time limit on the measurement leaves
them out.

Every row is printed and written to --out as soon as it is measured. A run that fails is a "failed: reason"
row and the next run goes on; stopped by SIGTERM (a time limit), the run in progress still gives the rows of
the steps it logged, marked "stopped", and its train.log and metrics.jsonl stay in --work_dir.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys

from bench import last_error_line
from common import git_commit, report_input_errors
from model import GPTConfig, PRESETS

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = ['student', 'stage', 'tokens/s', 'MFU', 'MFU with the teacher', 'KD step / plain step',
          'predicted by FLOPs', 'first step s', 'note']
COMPILE_NAMES = {'off': 'eager', 'blocks': 'compiled per block', 'model': 'compiled whole'}


class Stopped(Exception):
    """SIGTERM arrived: the time limit of the command that runs this benchmark."""


def on_sigterm(signum, frame):
    raise Stopped()


def train(out_dir, *settings, fsdp=False):
    """Run train.py to the end in a fresh out_dir (a benchmark never resumes), its output in out_dir/train.log.
    A time limit's SIGTERM reaches train.py too (it is in our process group), so it is waited for, not left."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1'] if fsdp else \
        [sys.executable]
    command = [*launcher, os.path.join(HERE, 'train.py'), f'--out_dir={out_dir}', *settings,
               *(['--parallelism=fsdp'] if fsdp else [])]
    with open(os.path.join(out_dir, 'train.log'), 'w') as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            status = process.wait()
        except Stopped:
            process.terminate()
            process.wait()
            raise
    if status:
        with open(os.path.join(out_dir, 'train.log')) as log:
            raise RuntimeError(f"train.py exit status {status}: {last_error_line(log.read())}")


def read_records(out_dir):
    """A run's metrics.jsonl, without the half line a stopped run may have left; none before it starts."""
    path = os.path.join(out_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith('\n')]


def run_facts(out_dir):
    """The loss's path and the memory plan (the header), the peak memory (CUDA only), and with compile the
    graphs at the first and the last logged step and the graph breaks, from a run's metrics.jsonl."""
    records = read_records(out_dir)
    header = next((r for r in records if r.get('type') == 'header'), {})
    steps = [r for r in records if 'kd_weight' in r]
    graphs = [r['compiled_graphs'] for r in steps if 'compiled_graphs' in r]
    facts = dict(loss_impl=header.get('loss_impl'), memory_plan=header.get('memory_plan'),
                 peak_memory=max((r['peak_memory'] for r in steps if 'peak_memory' in r), default=None))
    if graphs:
        facts.update(compiled_graphs=[graphs[0], graphs[-1]], graph_breaks=steps[-1].get('graph_breaks'))
    return facts


def stage_medians(out_dir):
    """{'kd' | 'plain': {metric: median over the stage's logged steps, and compile_s: the stage's first step}}
    from a run's metrics.jsonl, for the stages that logged a step (a stopped run may have logged none of
    stage 2)."""
    records = [r for r in read_records(out_dir) if 'kd_weight' in r]  # the steps', not the header or step 0's eval
    stages = {'kd': [r for r in records if r['kd_weight'] > 0], 'plain': [r for r in records if r['kd_weight'] == 0]}
    medians = {}
    for stage, rows in stages.items():
        timed = [r for r in rows if 'tokens_per_s' in r]
        medians[stage] = {key: statistics.median(r[key] for r in timed) for key in (timed or [{}])[0]
                          if key in ('tokens_per_s', 'mfu', 'mfu_with_teacher')}
        medians[stage].update({'compile_s': r['compile_s'] for r in rows if 'compile_s' in r})  # one a stage
    return {stage: values for stage, values in medians.items() if values}


def predicted_kd_cost(student, teacher, block_size):
    """The KD step's time over the plain step's, if time followed FLOPs: the teacher's forward is extra."""
    student_config = GPTConfig.from_preset(student, block_size=block_size)
    teacher_config = GPTConfig.from_preset(teacher, block_size=block_size)
    return 1 + teacher_config.flops_per_token(block_size, backward=False) / student_config.flops_per_token(block_size)


def common_settings(args):
    return [f'--data_dir={args.data_dir}', f'--block_size={args.block_size}', f'--batch_size={args.batch_size}',
            '--warmup_steps=1', '--eval_batches=1', '--eval_compiled=False', '--log_interval=1',
            f'--peak_flops={args.peak_flops}']


def teacher_ckpt(teacher, args):
    """The teacher's checkpoint, made once per work_dir (for gpt2-medium's teacher, 2.4 GB written and checksummed:
    --prepare makes it before the time limit of the measurement)."""
    teacher_dir = os.path.join(args.work_dir, f'teacher-{teacher}')
    if not os.path.isdir(os.path.join(teacher_dir, 'ckpt')):
        train(teacher_dir, *common_settings(args), f'--model_size={teacher}', '--max_steps=1')
    return os.path.join(teacher_dir, 'ckpt')


def bench_pair(student, teacher, compile_scope, args, run_dir):
    """One SALT run of the pair, into run_dir; its medians per stage come from its metrics.jsonl."""
    train(run_dir, *common_settings(args), f'--model_size={student}', f'--teacher_ckpt={teacher_ckpt(teacher, args)}',
          f'--kd_steps={args.steps // 2}', f'--max_steps={args.steps}', f'--eval_interval={args.steps}',
          '--ckpt_interval=0', *([] if compile_scope == 'off' else
                                 ['--compile=True', f'--compile_scope={compile_scope}']), fsdp=args.fsdp)


def table_rows(record):
    """The table's two lines (plain, KD) of one run's record; '-' where a stage has no median."""
    medians = record['medians']
    name = f"{record['student']} ({COMPILE_NAMES[record['compile']]}{', FSDP' if record.get('fsdp') else ''})"

    def value(stage, key, form):
        return form.format(medians[stage][key]) if key in medians.get(stage, {}) else '-'
    measured = '-'
    if 'tokens_per_s' in medians.get('plain', {}) and 'tokens_per_s' in medians.get('kd', {}):
        measured = f"{medians['plain']['tokens_per_s'] / medians['kd']['tokens_per_s']:.2f}"
    note = record.get('note', '')
    return [[name, 'plain', value('plain', 'tokens_per_s', '{:,.0f}'), value('plain', 'mfu', '{:.1%}'), '-', '', '',
             value('plain', 'compile_s', '{:.1f}'), note],
            [name, f"KD from {record['teacher']}", value('kd', 'tokens_per_s', '{:,.0f}'), value('kd', 'mfu', '{:.1%}'),
             value('kd', 'mfu_with_teacher', '{:.1%}'), measured, f"{record['predicted']:.2f}",
             value('kd', 'compile_s', '{:.1f}'), note]]


def emit(record, out):
    print('\n'.join(f"| {' | '.join(row)} |" for row in table_rows(record)), flush=True)
    if out is not None:
        out.write(json.dumps(record) + '\n')
        out.flush()


def parse_pair(text):
    student, sep, teacher = text.partition(':')
    for name in (student, teacher):
        if name not in PRESETS:
            raise argparse.ArgumentTypeError(f"--pairs {text!r}: {name!r} is not a preset of model.py "
                                             f"({', '.join(PRESETS)})")
    return student, teacher


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', type=parse_pair, nargs='+', metavar='STUDENT:TEACHER',
                        default=[('gpt2-medium', 'gpt2-medium-half'), ('gpt2', 'gpt2-half')])
    parser.add_argument('--compile', choices=COMPILE_NAMES, nargs='+', default=['blocks', 'off'],
                        help="each an own run: 'off', or train.py's compile_scope ('blocks', 'model')")
    parser.add_argument('--block_size', type=int, default=1024)
    parser.add_argument('--batch_size', type=int, default=16, help='sequences per step')
    parser.add_argument('--steps', type=int, default=20, help='steps per run, half of them in the KD stage')
    parser.add_argument('--peak_flops', type=float, default=989e12, help="per-GPU dense bf16 peak, for MFU")
    parser.add_argument('--data_dir', default='data/stdlib')
    parser.add_argument('--work_dir', default='out/bench_train', help="the runs' out_dirs (replaced)")
    parser.add_argument('--out', help='also write the rows as JSON lines here')
    parser.add_argument('--fsdp', action='store_true', help='train under FSDP, one process (torchrun)')
    parser.add_argument('--prepare', action='store_true', help='make the data and the teachers, then stop')
    args = parser.parse_args(argv)
    for name in ('block_size', 'batch_size', 'peak_flops'):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.steps < 6:
        parser.error(f"--steps must be at least 6 (a median per stage needs a few logged steps), got {args.steps}")
    return args


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    if not os.path.isfile(os.path.join(args.data_dir, 'meta.json')):
        subprocess.run([sys.executable, os.path.join(HERE, 'prepare.py'), 'stdlib', f'--out_dir={args.data_dir}'],
                       check=True, stdout=subprocess.DEVNULL)
    if args.prepare:
        for teacher in dict.fromkeys(teacher for _, teacher in args.pairs):
            print(f"teacher {teacher}: {teacher_ckpt(teacher, args)}", flush=True)
        return
    out = open(args.out, 'w') if args.out else None
    if out is not None:
        out.write(json.dumps(dict(type='header', git_commit=git_commit(), **vars(args))) + '\n')
    print(f"| {' | '.join(HEADER)} |\n" + '|---' * len(HEADER) + '|', flush=True)
    # in the order asked: on a GPU under a time limit, the first run is the one that matters most (the MFU target)
    runs = [(student, teacher, scope) for student, teacher in args.pairs for scope in args.compile]
    for student, teacher, scope in runs:
        run_dir = os.path.join(args.work_dir, f"{student}-{COMPILE_NAMES[scope].replace(' ', '-')}" +
                               ('-fsdp' if args.fsdp else ''))
        record = dict(student=student, teacher=teacher, compile=scope, fsdp=args.fsdp,
                      predicted=predicted_kd_cost(student, teacher, args.block_size))
        try:
            bench_pair(student, teacher, scope, args, run_dir)
        except Stopped:
            emit(dict(record, medians=stage_medians(run_dir), run=run_facts(run_dir), note='stopped by the time limit'),
                 out)
            sys.exit(124)
        except Exception as error:  # one run's failure is its row; the next run may well work
            record['note'] = f"failed: {type(error).__name__}: {error}".replace('|', '/').replace('\n', ' ')[:300]
        emit(dict(record, medians=stage_medians(run_dir), run=run_facts(run_dir)), out)


if __name__ == '__main__':
    report_input_errors()
    main()
