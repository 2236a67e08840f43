"""
The whole SALT experiment, end to end: tokenize -> train the small LM -> score the data with it -> train
the student three ways (baseline, SALT, SALT_DS) with the same seed, data order and step budget -> a
results table and val-loss curves in results/<name>/.

  python experiment.py                     # the embedded demo: Python's standard library, CPU, ~12 min
  python experiment.py --name pile --slm_config config/pile_slm.py --student_config config/pile_student.py \\
      --nproc 8 --seeds 1337 1338          # data tokenized beforehand with `python data.py pile ...`

Each step is an ordinary command (printed before it runs), so any of them can be rerun by hand. A step
whose output already exists is skipped: rerunning after an interruption continues where it stopped.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt

RUNS = ('baseline', 'salt', 'salt_ds')
HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts; out/ and results/ go to the working directory


def read_config(path):
    """The assignments of a config file (config files are plain Python, as train.py executes them)."""
    scope = {}
    exec(open(path).read(), scope)
    return {k: v for k, v in scope.items() if not k.startswith('__')}


def run(cmd, done_file=None):
    if done_file and os.path.exists(done_file):
        print(f"[skip] {shlex.join(cmd)}  ({done_file} exists)")
        return
    print(f"[run] {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def python(nproc):
    """How to start a training or scoring script: plain python, or torchrun for several processes."""
    if nproc > 1:
        return ['torchrun', '--standalone', f'--nproc_per_node={nproc}']
    return [sys.executable]


def read_records(out_dir):
    """metrics.jsonl's records; a run killed mid-write may have left half a last line, which is skipped."""
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if line.endswith('\n')]


def read_metrics(out_dir):
    return [r for r in read_records(out_dir) if 'val_loss' in r]


def val_at(curve, step):
    """Val loss of the last evaluation at or before `step`."""
    return [r['val_loss'] for r in curve if r['step'] <= step][-1]


def steps_to_reach(curve, target):
    """The first evaluated step whose val loss is <= target, or None."""
    return next((r['step'] for r in curve if r['step'] > 0 and r['val_loss'] <= target), None)


def finished(out_dir):
    """A train.py run is finished when its metrics hold the final evaluation at its max_steps."""
    if not os.path.isfile(os.path.join(out_dir, 'metrics.jsonl')):
        return False
    records = read_records(out_dir)
    max_steps = [r for r in records if r.get('type') == 'header'][-1]['config']['max_steps']
    return any(r.get('step') == max_steps and 'val_loss' in r for r in records)


def train(nproc, config_file, out_dir, overrides):
    if finished(out_dir):
        print(f"[skip] {out_dir} is finished")
        return
    # an interrupted run resumes from its checkpoint by itself
    run(python(nproc) + [os.path.join(HERE, 'train.py'), config_file, f'--out_dir={out_dir}'] + overrides)


def write_table(curves, path):
    """results table: per run and seed, val loss at 50/70/100% of the steps and the fraction of the steps
    the run needed to reach the baseline's final val loss (read at evaluation granularity)."""
    seeds = sorted({seed for seed, _ in curves})
    max_step = curves[(seeds[0], 'baseline')][-1]['step']
    marks = [round(max_step * f) for f in (0.5, 0.7, 1.0)]
    lines = [f"| run | seed | " + " | ".join(f"val loss @ {m} ({m / max_step:.0%})" for m in marks) +
             " | steps to baseline's final val loss | wall-clock (min) |", "|---" * (len(marks) + 4) + "|"]
    for seed in seeds:
        target = curves[(seed, 'baseline')][-1]['val_loss']
        for name in RUNS:
            curve = curves[(seed, name)]
            reached = steps_to_reach(curve, target)
            reach = f"{reached} ({reached / max_step:.0%})" if reached else "not reached"
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{val_at(curve, m):.4f}" for m in marks) +
                         f" | {reach} | {curve[-1]['elapsed_s'] / 60:.1f} |")
    with open(path, 'w') as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_curves(curves, path):
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(baseline='tab:gray', salt='tab:blue', salt_ds='tab:orange')
    for (seed, name), curve in sorted(curves.items()):
        evals = [r for r in curve if r['step'] > 0]
        label = f"{name} (seed {seed})"
        by_step.plot([r['step'] for r in evals], [r['val_loss'] for r in evals], color=colors[name], label=label)
        by_time.plot([r['elapsed_s'] / 60 for r in evals], [r['val_loss'] for r in evals], color=colors[name], label=label)
    by_step.set(xlabel='step', ylabel='val loss', title='val loss vs step')
    by_time.set(xlabel='wall-clock (min, student training only)', ylabel='val loss', title='val loss vs time')
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--name', default='demo', help='out/<name>/ for runs, results/<name>/ for the report')
    parser.add_argument('--slm_config', default='config/demo_slm.py')
    parser.add_argument('--student_config', default='config/demo_student.py')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1337])
    parser.add_argument('--nproc', type=int, default=1, help='processes per run (torchrun when > 1)')
    parser.add_argument('--top_k', type=int, default=10, help='SALT_DS: learnable = target in the SLM top-k')
    parser.add_argument('--tokenize', default='stdlib',
                        help="data.py arguments that make the student config's data_dir when it has no meta.json "
                             "('' = it must exist already)")
    parser.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='overrides for every student run')
    args = parser.parse_args()

    student = read_config(args.student_config)
    for key in ('data_dir', 'block_size'):
        if key not in student:
            sys.exit(f"{args.student_config} must set {key} (experiment.py scores the data the students train on)")
    data_dir = student['data_dir']
    if args.tokenize:
        run([sys.executable, os.path.join(HERE, 'data.py'), *shlex.split(args.tokenize), f'--out_dir={data_dir}'],
            done_file=os.path.join(data_dir, 'meta.json'))
    out, results = os.path.join('out', args.name), os.path.join('results', args.name)
    os.makedirs(results, exist_ok=True)

    slm_dir = os.path.join(out, 'slm')
    train(args.nproc, args.slm_config, slm_dir, [])
    slm_ckpt, score_file = os.path.join(slm_dir, 'ckpt.pt'), os.path.join(out, 'scores.npy')
    run(python(args.nproc) + [os.path.join(HERE, 'salt.py'), 'score', f'--ckpt={slm_ckpt}', f'--data_dir={data_dir}',
                              f"--block_size={student['block_size']}", f"--max_sequences={student.get('train_sequences', 0)}",
                              f'--top_k={args.top_k}', f'--out={score_file}'], done_file=score_file)

    extra = {'baseline': [], 'salt': [f'--teacher_ckpt={slm_ckpt}'],
             'salt_ds': [f'--teacher_ckpt={slm_ckpt}', f'--score_file={score_file}']}
    curves = {}
    for seed in args.seeds:
        for name in RUNS:
            run_dir = os.path.join(out, f'seed{seed}', name)
            train(args.nproc, args.student_config, run_dir, [f'--seed={seed}'] + extra[name] + [f'--{s}' for s in args.set])
            curves[(seed, name)] = read_metrics(run_dir)
    write_table(curves, os.path.join(results, 'table.md'))
    plot_curves(curves, os.path.join(results, 'val_loss.png'))
    print(f"wrote {results}/table.md and {results}/val_loss.png")


if __name__ == '__main__':
    main()
