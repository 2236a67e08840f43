"""
The speed of a training step: tokens/s and MFU of train.py itself, plain and in SALT's KD stage, next to the
FLOP count's prediction of what the teacher's forward adds.

    python bench_train.py                         # on a GPU: gpt2-medium and gpt2, block 1024, compile on and off
    python bench_train.py --pairs demo-student:demo-slm --block_size 64 --batch_size 4 --steps 8   # a CPU

Each STUDENT:TEACHER pair (model.PRESETS; the defaults' teachers have half their student's blocks) runs
`train.py` for --steps steps of SALT, the first half in the KD stage, once per --compile setting (the teacher
is compiled when the student is), on --data_dir (the standard library, tokenized first if missing). Its
metrics.jsonl gives, per stage, the median tokens/s and MFU over the logged steps; train.py leaves the first
step of the run and of stage 2, where torch.compile compiles, out of them. The teacher is a checkpoint of its
preset after one training step: its weights do not matter for speed. MFU counts the student's training FLOPs
(`mfu`) or those and the teacher's forward (`mfu_with_teacher`), over peak_flops (train.py's, H100/H200 SXM
dense bf16 by default).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

from data import git_commit, report_input_errors
from model import GPTConfig, PRESETS

HERE = os.path.dirname(os.path.abspath(__file__))


def train(out_dir, *settings):
    """Run train.py to the end in a fresh out_dir (a benchmark never resumes); its output only on failure."""
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [sys.executable, os.path.join(HERE, 'train.py'), f'--out_dir={out_dir}', *settings]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def stage_medians(out_dir):
    """{'kd' | 'plain': {metric: median over the stage's logged steps}} from a run's metrics.jsonl."""
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        records = [r for r in map(json.loads, f) if 'tokens_per_s' in r]
    stages = {'kd': [r for r in records if r['kd_weight'] > 0], 'plain': [r for r in records if r['kd_weight'] == 0]}
    if not all(stages.values()):
        raise RuntimeError(f"{out_dir}: too few logged steps in a stage for a median: raise --steps")
    return {stage: {key: statistics.median(r[key] for r in rows) for key in rows[0]
                    if key in ('tokens_per_s', 'mfu', 'mfu_with_teacher')} for stage, rows in stages.items()}


def bench_pair(student, teacher, compiled, args):
    """One SALT run of the pair: its medians per stage, and the FLOP prediction of the KD step's cost."""
    common = [f'--data_dir={args.data_dir}', f'--block_size={args.block_size}', f'--batch_size={args.batch_size}',
              '--warmup_steps=1', '--eval_batches=1', '--log_interval=1']
    teacher_dir = os.path.join(args.work_dir, f'teacher-{teacher}')
    if not os.path.isdir(os.path.join(teacher_dir, 'ckpt')):
        train(teacher_dir, *common, f'--model_size={teacher}', '--max_steps=1')
    run_dir = os.path.join(args.work_dir, f"{student}-{'compiled' if compiled else 'eager'}")
    train(run_dir, *common, f'--model_size={student}', f'--teacher_ckpt={os.path.join(teacher_dir, "ckpt")}',
          f'--kd_steps={args.steps // 2}', f'--max_steps={args.steps}', f'--eval_interval={args.steps}',
          f'--ckpt_interval={args.steps}', f'--compile={compiled}')
    student_config = GPTConfig.from_preset(student, block_size=args.block_size)
    teacher_config = GPTConfig.from_preset(teacher, block_size=args.block_size)
    predicted = 1 + teacher_config.flops_per_token(args.block_size, backward=False) / \
        student_config.flops_per_token(args.block_size)
    return stage_medians(run_dir), predicted


def table_rows(student, teacher, compiled, medians, predicted):
    def percent(stage, key):
        return f"{medians[stage][key]:.1%}" if key in medians[stage] else '-'
    measured = medians['plain']['tokens_per_s'] / medians['kd']['tokens_per_s']
    name = f"{student} ({'compiled' if compiled else 'eager'})"
    return [[name, 'plain', f"{medians['plain']['tokens_per_s']:,.0f}", percent('plain', 'mfu'), '-', '', ''],
            [name, f'KD from {teacher}', f"{medians['kd']['tokens_per_s']:,.0f}", percent('kd', 'mfu'),
             percent('kd', 'mfu_with_teacher'), f"{measured:.2f}", f"{predicted:.2f}"]]


def parse_pair(text):
    student, sep, teacher = text.partition(':')
    for name in (student, teacher):
        if name not in PRESETS:
            raise argparse.ArgumentTypeError(f"--pairs {text!r}: {name!r} is not a preset of model.py "
                                             f"({', '.join(PRESETS)})")
    return student, teacher


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', type=parse_pair, nargs='+', metavar='STUDENT:TEACHER',
                        default=[('gpt2-medium', 'gpt2-medium-half'), ('gpt2', 'gpt2-half')])
    parser.add_argument('--compile', choices=['off', 'on', 'both'], default='both')
    parser.add_argument('--block_size', type=int, default=1024)
    parser.add_argument('--batch_size', type=int, default=16, help='sequences per step')
    parser.add_argument('--steps', type=int, default=20, help='steps per run, half of them in the KD stage')
    parser.add_argument('--data_dir', default='data/stdlib')
    parser.add_argument('--work_dir', default='out/bench_train', help="the runs' out_dirs (replaced)")
    parser.add_argument('--out', help='also write the rows as JSON lines here')
    args = parser.parse_args()
    for name in ('block_size', 'batch_size'):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.steps < 6:
        parser.error(f"--steps must be at least 6 (a median per stage needs a few logged steps), got {args.steps}")
    if not os.path.isfile(os.path.join(args.data_dir, 'meta.json')):
        subprocess.run([sys.executable, os.path.join(HERE, 'data.py'), 'stdlib', f'--out_dir={args.data_dir}'],
                       check=True, capture_output=True)
    header = ['student', 'stage', 'tokens/s', 'MFU', 'MFU with the teacher', 'KD step / plain step',
              'predicted by FLOPs']
    lines = [f"| {' | '.join(header)} |", '|---' * len(header) + '|']
    print('\n'.join(lines), flush=True)
    records = [dict(type='header', git_commit=git_commit(), **vars(args))]
    for student, teacher in args.pairs:
        # compiled first: on a GPU, under a time limit, it is the row that matters most (the MFU target)
        for compiled in {'off': [False], 'on': [True], 'both': [True, False]}[args.compile]:
            medians, predicted = bench_pair(student, teacher, compiled, args)
            lines += [f"| {' | '.join(row)} |" for row in table_rows(student, teacher, compiled, medians, predicted)]
            records.append(dict(student=student, teacher=teacher, compile=compiled, predicted=predicted, **medians))
            print('\n'.join(lines[-2:]), flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            f.writelines(json.dumps(record) + '\n' for record in records)
    print('\n' + '\n'.join(lines))


if __name__ == '__main__':
    report_input_errors()
    main()
