"""
The whole SALT experiment, end to end: tokenize -> train the small LM -> score the data with it -> train
the student three ways (baseline, SALT, SALT_DS) with the same seed, data order and step budget, and SALT
and SALT_DS again on 70% of the steps (--short) -> a results table and val-loss curves in results/<name>/.

  python experiment.py                     # the embedded demo: Python's standard library, 2 seeds, CPU
  python experiment.py --name pile --slm_config config/pile_slm.py --student_config config/pile_student.py \\
      --nproc 8 --tokenize=                # data tokenized beforehand with `python prepare.py pile ...`
  python experiment.py --ablate kd_weight=0.5,0.667,0.9 --ablate top_k=1,10,100

Every seed (--seeds, two by default) trains every run; the tables give each seed and the mean. An ablation
`--ablate KEY=V1,V2,...` trains one more student per value and seed: SALT with --KEY=V, or SALT_DS for the
selection's keys (top_k, select_fraction), and adds a table per KEY to the report. A value may bring settings of
its own after a '+': `--ablate kd_end=teacher+kd_steps=600` (the adaptive end of stage 1, at most 600 steps).

Each step is an ordinary command (printed before it runs), so any of them can be rerun by hand. A step
whose output already exists is skipped: rerunning after an interruption continues where it stopped, and
rerunning with more seeds, ablations or --short trains only what is new.
"""
import argparse
import ast
import json
import os
import shlex
import subprocess
import sys

import time

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from model import GPTConfig

RUNS = ('baseline', 'salt', 'salt_ds')
SELECTION_KEYS = ('top_k', 'select_fraction')  # ablated on SALT_DS; every other key on SALT
HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts; out/ and results/ go to the working directory


def read_config(path):
    """The assignments of a config file (config files are plain Python, as train.py executes them)."""
    if not os.path.isfile(path):
        sys.exit(f"config file {path!r} does not exist")
    scope = {}
    exec(open(path).read(), scope)
    return {k: v for k, v in scope.items() if not k.startswith('__')}


def run(cmd, done_file=None):
    if done_file and os.path.exists(done_file):
        print(f"[skip] {shlex.join(cmd)}  ({done_file} exists)")
        return
    print(f"[run] {shlex.join(cmd)}", flush=True)
    status = subprocess.run(cmd).returncode
    if status:  # the step has said why (one line for a bad input); what is done so far is kept
        sys.exit(f"the step above failed (exit status {status}); fix what it says and rerun this command: it "
                 f"continues where it stopped")


def python(nproc):
    """How to start a training or scoring script: plain python, or torchrun for several processes."""
    if nproc > 1:
        return ['torchrun', '--standalone', f'--nproc_per_node={nproc}']
    return [sys.executable]


def read_records(out_dir):
    """metrics.jsonl's records; a run killed mid-write may have left half a last line, which is skipped. The KD term
    is 'kd', which runs before that name logged as 'kl'."""
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f if line.endswith('\n')]
    return [{**r, 'kd': r['kl']} if 'kl' in r and 'kd' not in r else r for r in records]


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


def score(args, student, data_dir, slm_ckpt, top_k, out):
    """The SALT_DS score file for this top-k (made once); its wall-clock goes to timings.json, as part of
    what SALT_DS costs on top of the student's training."""
    score_file = os.path.join(out, f'scores_top{top_k}.npy')
    started = time.time()
    run(python(args.nproc) + [os.path.join(HERE, 'salt.py'), 'score', f'--ckpt={slm_ckpt}', f'--data_dir={data_dir}',
                              f"--block_size={student['block_size']}", f"--max_sequences={student.get('train_sequences', 0)}",
                              f'--top_k={top_k}', f'--out={score_file}'], done_file=score_file)
    timings_path = os.path.join(out, 'timings.json')
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}
    if f'score_top{top_k}' not in timings:
        timings[f'score_top{top_k}'] = time.time() - started
        with open(timings_path, 'w') as f:
            json.dump(timings, f)
    return score_file, timings[f'score_top{top_k}']


def planned_runs(args, slm_ckpt, score_files, student):
    """{label: (kind, train.py overrides)} for one seed: the three main runs; with --short, SALT and SALT_DS
    again on that fraction of the steps, with their own LR schedule (the paper's claim: SALT at < 70% of the
    steps matches the baseline; a cosine run's mid-way checkpoint, not yet annealed, would understate it);
    then one run per ablated value (the value the main run already has is that run: same label, no second
    training)."""
    teacher = [f'--teacher_ckpt={slm_ckpt}']
    runs = {'baseline': ('baseline', []), 'salt': ('salt', teacher),
            'salt_ds': ('salt_ds', teacher + [f'--score_file={score_files[args.top_k]}'])}
    if args.short:
        steps = round(student['max_steps'] * args.short)
        for kind in ('salt', 'salt_ds'):
            runs[f'{kind} {steps} steps'] = (kind, runs[kind][1] + [f'--max_steps={steps}'])
    for key, values in args.ablate:
        kind = 'salt_ds' if key in SELECTION_KEYS else 'salt'
        current = str(args.top_k if key == 'top_k' else student.get(key))
        for value in values:
            if ablation_label(kind, key, value, current) == kind:
                continue
            if key == 'top_k':
                overrides = teacher + [f'--score_file={score_files[int(value)]}']
            else:  # a value may bring settings of its own: kd_end=teacher+kd_steps=600
                first, *more = value.split('+')
                overrides = runs[kind][1] + [f'--{key}={first}'] + [f'--{setting}' for setting in more]
            runs[ablation_label(kind, key, value, current)] = (kind, overrides)
    return runs


def main_labels(runs):
    """The main runs and their shorter-budget repeats: every run but the ablations (labelled KEY=VALUE)."""
    return [label for label in runs if '=' not in label]


def ablation_label(kind, key, value, current):
    try:
        same = float(value) == float(current)
    except ValueError:
        same = value == current
    return kind if same else f'{kind} {key}={value}'


def teacher_minutes(kind, slm_minutes, score_minutes):
    """What a run costs before its student trains: the SLM for SALT, the SLM and the scoring for SALT_DS."""
    return {'baseline': 0.0, 'salt': slm_minutes, 'salt_ds': slm_minutes + score_minutes}[kind]


def marks(max_step):
    """The steps the tables read the val loss at: 50%, 70% and 100% of the run."""
    return [round(max_step * f) for f in (0.5, 0.7, 1.0)]


def summary_row(curves, baselines, max_step):
    """Over seeds: mean val loss at 50/70/100% of the steps; the final val loss minus the same seed's
    baseline's (paired: same init and data order, so much of the seed-to-seed noise cancels), mean and per
    seed; and the steps to reach each seed's baseline final."""
    vals = [np.mean([val_at(c, m) for c in curves]) for m in marks(max_step)]
    deltas = [c[-1]['val_loss'] - b[-1]['val_loss'] for c, b in zip(curves, baselines)]
    delta = f"{np.mean(deltas):+.4f}" + (f" ({', '.join(f'{d:+.4f}' for d in deltas)})" if len(deltas) > 1 else "")
    reached = [steps_to_reach(c, b[-1]['val_loss']) for c, b in zip(curves, baselines)]
    if all(reached):
        reach = f"{np.mean(reached):.0f} ({np.mean(reached) / max_step:.0%})"
    else:
        reach = f"not reached ({sum(r is None for r in reached)} of {len(reached)} seeds)"
    return [f"{v:.4f}" for v in vals] + [delta, reach]


def summary_header(max_step):
    return [f"val loss @ {m} ({m / max_step:.0%})" for m in marks(max_step)] + [
        "final - baseline's final", "steps to baseline's final val loss"]


def markdown_table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] +
                      ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def main_table(curves, labels, seeds, max_step):
    """Per run and seed (and their mean): val loss at 50/70/100% of the steps, the final val loss against the
    baseline's, and the steps the run needed to reach the baseline's final val loss (at evaluation granularity)."""
    rows = []
    for label in labels:
        for seed in seeds + (['mean'] if len(seeds) > 1 else []):
            chosen = seeds if seed == 'mean' else [seed]
            rows.append([label, seed] + summary_row([curves[(s, label)] for s in chosen],
                                                    [curves[(s, 'baseline')] for s in chosen], max_step))
    return markdown_table(['run', 'seed'] + summary_header(max_step), rows)


def wallclock_table(curves, runs, seeds, costs):
    """Wall-clock per run: the student's training, plus the SLM's training for SALT and the scoring too for
    SALT_DS; and when each run reached its seed's baseline final val loss: the saving at equal loss."""
    header = ['run', 'seed', 'student (min)', 'SLM and scoring (min)', 'total (min)',
              "to the baseline's final val loss: student (min)", 'all included (min)', "vs the baseline's total"]
    rows = []
    for label in main_labels(runs):
        teacher = costs[runs[label][0]]
        for seed in seeds:
            curve, baseline = curves[(seed, label)], curves[(seed, 'baseline')]
            student = curve[-1]['elapsed_s'] / 60
            step = steps_to_reach(curve, baseline[-1]['val_loss'])
            reach = ['not reached', '-', '-']
            if step is not None:
                minutes = next(r['elapsed_s'] for r in curve if r['step'] == step) / 60
                reach = [f"{minutes:.1f}", f"{minutes + teacher:.1f}",
                         f"{(minutes + teacher) / (baseline[-1]['elapsed_s'] / 60):.2f}x"]
            rows.append([label, seed, f"{student:.1f}", f"{teacher:.1f}", f"{student + teacher:.1f}"] + reach)
    return markdown_table(header, rows)


def ablation_tables(curves, args, student, max_step):
    tables = []
    for key, values in args.ablate:
        kind = 'salt_ds' if key in SELECTION_KEYS else 'salt'
        current = str(args.top_k if key == 'top_k' else student.get(key))
        labels = [ablation_label(kind, key, value, current) for value in values]
        rows = [[value + (' (main run)' if label == kind else '')] +
                summary_row([curves[(s, label)] for s in args.seeds], [curves[(s, 'baseline')] for s in args.seeds],
                            max_step) for value, label in zip(values, labels)]
        tables.append(f"### {key} ({kind.upper()}, mean over {len(args.seeds)} seed(s))\n\n" +
                      markdown_table([key] + summary_header(max_step), rows))
    return "\n".join(tables)


def subset_table(curves, runs, seeds, val_tokens, min_share=0.02):
    """The final val loss per data subset (those with at least min_share of the val tokens: fewer say little),
    per main run, mean over seeds, and for SALT and SALT_DS its difference from the same seed's baseline: where
    the teacher's help, or the selection's change of mix, went."""
    total = sum(val_tokens.values())
    subsets = [name for name, n in sorted(val_tokens.items(), key=lambda item: -item[1]) if n >= min_share * total]
    labels = main_labels(runs)
    rows = []
    for name in subsets:
        row = [name.replace('|', '\\|'), f"{val_tokens[name]:,}"]
        for label in labels:
            finals = [curves[(seed, label)][-1]['val_loss_subsets'][name] for seed in seeds]
            baselines = [curves[(seed, 'baseline')][-1]['val_loss_subsets'][name] for seed in seeds]
            delta = np.mean(finals) - np.mean(baselines)
            row.append(f"{np.mean(finals):.4f}" + ('' if label == 'baseline' else f" ({delta:+.4f})"))
        rows.append(row)
    return markdown_table(['subset', 'val tokens'] + labels, rows)


def task_table(curves, runs, seeds):
    """The few-shot scores of the final evaluation (train.py's eval_tasks) per run, mean over seeds."""
    metrics = [key for key in curves[(seeds[0], 'baseline')][-1] if '/' in key]
    rows = [[label] + [f"{np.mean([curves[(seed, label)][-1][key] for seed in seeds]):.4f}" for key in metrics]
            for label in runs]
    return markdown_table(['run'] + metrics, rows)


def cost_table(out, seeds):
    """KD-stage vs plain step time of the SALT runs against the FLOP estimate of what KD adds: a teacher
    forward over a student step (model.GPTConfig.flops_per_token)."""
    def model_config(run_dir):  # the header's model_args (runs before them: the preset of their model_size)
        header = [r for r in read_records(run_dir) if r.get('type') == 'header'][-1]
        if 'model_args' in header:
            return GPTConfig(**header['model_args'])
        return GPTConfig.from_preset(header['config']['model_size'], block_size=header['config']['block_size'])

    slm, student = model_config(os.path.join(out, 'slm')), model_config(os.path.join(out, f'seed{seeds[0]}', 'salt'))
    flop_ratio = slm.flops_per_token(student.block_size, backward=False) / student.flops_per_token(student.block_size)
    rows = []
    for label in ('salt', 'salt_ds'):
        for seed in seeds:
            records = [r for r in read_records(os.path.join(out, f'seed{seed}', label))
                       if 'tokens_per_s' in r and r['step'] > 1]  # the first interval includes start-up
            kd = [r['tokens_per_s'] for r in records if r['kd_weight'] > 0]
            plain = [r['tokens_per_s'] for r in records if r['kd_weight'] == 0]
            if not (kd and plain):
                continue  # too few logged steps in one of the stages
            kd, plain = np.median(kd), np.median(plain)
            rows.append([label, seed, f"{kd:,.0f}", f"{plain:,.0f}", f"{plain / kd:.2f}", f"{1 + flop_ratio:.2f}"])
    return markdown_table(['run', 'seed', 'KD-stage tokens/s', 'plain tokens/s', 'KD step time / plain step time',
                           '(student step + teacher forward) / student step, FLOPs'], rows)


def noise_table(curves, seeds, max_step, val_tokens):
    """How finely the tables can tell runs apart. The val loss's standard error over the val sequences (every run
    is evaluated on the same ones, so a difference between runs is surer than that); and the step at which the
    baseline first reaches its own final val loss: a run that 'reaches the baseline's final val loss' by then
    has not shown a saving, as the baseline's curve flattens (and wobbles) at the end."""
    rows = []
    for seed in seeds:
        curve = curves[(seed, 'baseline')]
        reach = steps_to_reach(curve, curve[-1]['val_loss'])
        rows.append([seed, f"{val_tokens:,}", f"{curve[-1]['val_loss']:.4f}",
                     f"{curve[-1]['val_loss_se']:.4f}" if 'val_loss_se' in curve[-1] else '-',
                     f"{reach} ({reach / max_step:.0%})"])
    return markdown_table(['seed', 'val tokens', "baseline's final val loss", 'its standard error',
                           'step the baseline first reaches it'], rows)


def extra_tables(curves, runs, seeds, max_step, baseline_dir):
    """The tables beyond the val loss: its noise, the val loss per data subset, and the few-shot tasks."""
    final = curves[(seeds[0], 'baseline')][-1]
    header = [r for r in read_records(baseline_dir) if r.get('type') == 'header'][-1]
    tables = "\n## Resolution\n\n" + noise_table(curves, seeds, max_step, header.get('val_tokens', 0))
    if len(final.get('val_loss_subsets', {})) > 1:
        tables += "\n## Val loss per data subset (final)\n\n" + subset_table(curves, runs, seeds, header['val_tokens_subsets'])
    if any('/' in key for key in final):
        tables += "\n## Few-shot tasks (final)\n\n" + task_table(curves, runs, seeds)
    return tables


def plot_curves(curves, costs, runs, path):
    """Three panels: each run's val loss minus the same seed's baseline's, against steps (the one to read first:
    the 0.02-0.05 differences the tables report are lost in absolute curves), the val loss itself against steps,
    and against wall-clock where SALT runs start after the SLM (and SALT_DS after scoring). One colour and one
    legend entry per run: the mean over the seeds bold in the first panel, each seed a faint line; main runs only
    (ablations are in the tables), the shorter-budget runs dashed."""
    labels, seeds = main_labels(runs), sorted({seed for seed, _ in curves})
    fig, (by_gap, by_step, by_time) = plt.subplots(1, 3, figsize=(19, 5))
    palette = iter(plt.get_cmap('tab10').colors)
    shown = []
    for label in labels:
        style = dict(color='0.4' if label == 'baseline' else next(palette), linestyle='-' if label in RUNS else '--')
        gaps = []
        for seed in seeds:
            evals = [r for r in curves[(seed, label)] if r['step'] > 0]
            baseline = {r['step']: r['val_loss'] for r in curves[(seed, 'baseline')]}
            gaps.append({r['step']: r['val_loss'] - baseline[r['step']] for r in evals if r['step'] in baseline})
            named = dict(label=label) if seed == seeds[0] else {}
            if label != 'baseline':
                by_gap.plot(list(gaps[-1]), list(gaps[-1].values()), alpha=0.3, linewidth=1, **style)
            by_step.plot([r['step'] for r in evals], [r['val_loss'] for r in evals], alpha=0.7, **style, **named)
            by_time.plot([costs[runs[label][0]] + r['elapsed_s'] / 60 for r in evals], [r['val_loss'] for r in evals],
                         alpha=0.7, **style, **named)
            shown += [r['val_loss'] for r in evals if r['step'] >= 0.15 * evals[-1]['step']]
        if label != 'baseline':
            steps = sorted(set.intersection(*map(set, gaps)))
            by_gap.plot(steps, [np.mean([gap[s] for gap in gaps]) for s in steps], linewidth=2.5,
                        label=f"{label} (mean of {len(seeds)} seeds)", **style)
    by_gap.axhline(0.0, color='0.4', linewidth=1.5, label='baseline')
    by_gap.set(xlabel='step', ylabel="val loss - the same seed's baseline's", title='against the baseline')
    by_step.set(xlabel='step', ylabel='val loss', title='val loss vs step')
    by_time.set(xlabel='wall-clock (min), the SLM and scoring included', ylabel='val loss', title='val loss vs time')
    low, high = min(shown), max(shown)  # from 15% of the steps on: the first evaluations would flatten the rest
    for ax in (by_gap, by_step, by_time):
        if ax is not by_gap:
            ax.set_ylim(low - 0.05 * (high - low), high)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_setting(text):
    """--set KEY=VALUE, the value a Python literal where it parses as one (as train.py reads it)."""
    key, sep, value = text.partition('=')
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (SyntaxError, ValueError):
        return key, value


def parse_ablation(text):
    key, sep, values = text.partition('=')
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"--ablate {text!r}: expected KEY=V1,V2,...")
    return key, values.split(',')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--name', default='demo', help='out/<name>/ for runs, results/<name>/ for the report')
    parser.add_argument('--slm_config', default='config/demo_slm.py')
    parser.add_argument('--student_config', default='config/demo_student.py')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1337, 1338])
    parser.add_argument('--nproc', type=int, default=1, help='processes per run (torchrun when > 1)')
    parser.add_argument('--top_k', type=int, default=10, help='SALT_DS: learnable = target in the SLM top-k')
    parser.add_argument('--short', type=float, default=0.7,
                        help='also train SALT and SALT_DS on this fraction of the steps (0 = not)')
    parser.add_argument('--ablate', type=parse_ablation, action='append', default=[], metavar='KEY=V1,V2,...')
    parser.add_argument('--tokenize', default='stdlib',
                        help="prepare.py arguments that make the student config's data_dir when it has no "
                             "meta.json "
                             "('' = it must exist already)")
    parser.add_argument('--set', type=parse_setting, nargs='*', default=[], metavar='KEY=VALUE',
                        help="overrides of the student config for every student run")
    parser.add_argument('--slm_set', type=parse_setting, nargs='*', default=[], metavar='KEY=VALUE',
                        help="overrides of the SLM config")
    args = parser.parse_args()
    if args.nproc < 1 or args.top_k < 1:
        parser.error(f"--nproc and --top_k must be at least 1, got {args.nproc} and {args.top_k}")
    if not 0 <= args.short < 1:
        parser.error(f"--short must be in [0, 1), got {args.short}")

    student = read_config(args.student_config) | dict(args.set)  # what the main runs train with
    for key in ('data_dir', 'block_size', 'max_steps'):
        if key not in student:
            sys.exit(f"{args.student_config} must set {key}: experiment.py scores the data the students train on "
                     f"and sizes the shorter runs by it")
    data_dir = student['data_dir']
    if args.tokenize:
        run([sys.executable, os.path.join(HERE, 'prepare.py'), *shlex.split(args.tokenize),
             f'--out_dir={data_dir}'],
            done_file=os.path.join(data_dir, 'meta.json'))
    out, results = os.path.join('out', args.name), os.path.join('results', args.name)
    os.makedirs(results, exist_ok=True)

    slm_dir = os.path.join(out, 'slm')
    train(args.nproc, args.slm_config, slm_dir, [f'--{k}={v}' for k, v in args.slm_set])
    slm_ckpt = os.path.join(slm_dir, 'ckpt')
    top_ks = {args.top_k} | {int(v) for key, values in args.ablate if key == 'top_k' for v in values}
    scored = {k: score(args, student, data_dir, slm_ckpt, k, out) for k in sorted(top_ks)}
    runs = planned_runs(args, slm_ckpt, {k: path for k, (path, _) in scored.items()}, student)
    costs = {kind: teacher_minutes(kind, read_metrics(slm_dir)[-1]['elapsed_s'] / 60, scored[args.top_k][1] / 60)
             for kind in RUNS}

    curves = {}
    for seed in args.seeds:
        for label, (_, overrides) in runs.items():
            run_dir = os.path.join(out, f'seed{seed}', label.replace(' ', '_'))
            settings = [f'--seed={seed}'] + [f'--{k}={v}' for k, v in args.set] + overrides  # the run's own win
            train(args.nproc, args.student_config, run_dir, settings)
            curves[(seed, label)] = read_metrics(run_dir)
    max_step = curves[(args.seeds[0], 'baseline')][-1]['step']
    report = (f"# SALT experiment `{args.name}`\n\n{args.slm_config} (SLM), {args.student_config} (students), "
              f"seeds {args.seeds}; SLM {costs['salt']:.1f} min, scoring {scored[args.top_k][1] / 60:.1f} min\n\n"
              f"## Val loss\n\n" + main_table(curves, main_labels(runs), args.seeds, max_step) +
              "\n## Wall-clock\n\n" + wallclock_table(curves, runs, args.seeds, costs) +
              (f"\n## Ablations\n\n{ablation_tables(curves, args, student, max_step)}" if args.ablate else "") +
              extra_tables(curves, runs, args.seeds, max_step, os.path.join(out, f'seed{args.seeds[0]}', 'baseline')) +
              "\n## Cost per step\n\n" + cost_table(out, args.seeds))
    with open(os.path.join(results, 'table.md'), 'w') as f:
        f.write(report)
    print(report)
    plot_curves(curves, costs, runs, os.path.join(results, 'val_loss.png'))
    print(f"wrote {results}/table.md and {results}/val_loss.png")


if __name__ == '__main__':
    main()
