"""
The whole SALT experiment, end to end: tokenize -> train the small LM -> score the data with it -> train
the student three ways (baseline, SALT, SALT_DS) with the same seed, data order and step budget, at shorter
budgets too (WSD branches, --fractions; or SALT and SALT_DS again on 70% of the steps, --short) -> a results
table and val-loss curves in results/<name>/.

  python experiment.py                     # the default study on Python's standard library, CPU, 3 seeds: WSD
                                           # branches at 50/70/85/100%, a BPE of the corpus, an SLM ahead of the
                                           # student, the selection-only control (--design branches)
  python experiment.py --design tokens     # the same at budgets of 1, 4, 16 and 32 tokens per parameter, one SLM
  python experiment.py --design tokens --corpus "text shakespeare.txt"   # on another corpus (prepare.py's args)
  python experiment.py --design demo       # the earlier demo: GPT-2's tokens, cosine, --short 0.7, one SLM
  python experiment.py --design demo --name pile --slm_config config/pile_slm.py \\
      --student_config config/pile_student.py --nproc 8 --tokenize=   # data tokenized with `prepare.py pile ...`
  python experiment.py --ablate kd_weight=0.5,0.667,0.9 --ablate top_k=1,10,100

The designs are described in docs/cpu_studies.md. Every seed (--seeds) trains every run; the tables give each seed and the mean. An ablation
`--ablate KEY=V1,V2,...` trains one more student per value and seed: SALT with --KEY=V, or SALT_DS for the
selection's keys (top_k, select_fraction), and adds a table per KEY to the report. A value may bring settings of
its own after a '+': `--ablate kd_end=teacher+kd_steps=600` (the adaptive end of stage 1, at most 600 steps).

Each step is an ordinary command (printed before it runs), so any of them can be rerun by hand. A step
whose output already exists is skipped: rerunning after an interruption continues where it stopped, and
rerunning with more seeds, ablations or --short trains only what is new. The report is rewritten after every run,
and once more, saying where it stopped, when SIGTERM (a time limit) stops the study. --fit SECONDS --rate_file F
shrinks the steps until the study fits SECONDS with 30% slack at the tokens/s that gpu_check.sh measured in F.
"""
import argparse
import ast
import concurrent.futures
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

import salt
from data import ORDER_VERSION, TokenSequences
from bench_train import Stopped, on_sigterm, read_records as read_raw_records
from configurator import OPTIONAL
from model import GPTConfig

RUNS = ('baseline', 'salt', 'salt_ds', 'selection_only')  # selection_only: SALT_DS's selection in stage 1, w = 0
WEAK = 'weak_slm'  # --weak_slm_config's name: its SLM's folder, and its runs' labels end with it
SELECTION_KEYS = ('top_k', 'select_fraction')  # ablated on SALT_DS; every other key on SALT
HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts; out/ and results/ go to the working directory


def read_config(path):
    """The assignments of a config file (config files are plain Python, as train.py executes them)."""
    if not os.path.isfile(path):
        sys.exit(f"config file {path!r} does not exist")
    scope = {}
    exec(open(path).read(), scope)
    return {k: v for k, v in scope.items() if not k.startswith('__')}


CHILDREN = set()  # the commands running now (--jobs runs several): ended with the study


def run(cmd, done_file=None):
    if done_file and os.path.exists(done_file):
        print(f"[skip] {shlex.join(cmd)}  ({done_file} exists)")
        return
    print(f"[run] {shlex.join(cmd)}", flush=True)
    child = subprocess.Popen(cmd)
    CHILDREN.add(child)
    status = child.wait()
    CHILDREN.discard(child)
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
    return [{**r, 'kd': r['kl']} if 'kl' in r and 'kd' not in r else r for r in read_raw_records(out_dir)]


def read_metrics(out_dir):
    return [r for r in read_records(out_dir) if 'val_loss' in r]


def run_folder(out, seed, label):
    """Where a run of the study `out` trains: seed<seed>/<its label, spaces as underscores>."""
    return os.path.join(out, f'seed{seed}', label.replace(' ', '_'))


def header_of(out_dir):
    """The run's metrics header: the last, as a resumed run writes one per start."""
    return [r for r in read_records(out_dir) if r.get('type') == 'header'][-1]


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
    max_steps = header_of(out_dir)['config']['max_steps']
    return any(r.get('step') == max_steps and 'val_loss' in r for r in read_records(out_dir))


def set_aside_if_stale(out_dir):
    """A run trained before the data order it would be resumed with (data.ORDER_VERSION: its header says another, or
    none) is not this code's run: moved to OUT_DIR.order<N>, kept, and trained again. Returns whether it was."""
    path = os.path.join(out_dir, 'metrics.jsonl')
    headers = [r for r in read_records(out_dir) if r.get('type') == 'header'] if os.path.isfile(path) else []
    order = headers[-1].get('data_order', 1) if headers else ORDER_VERSION
    if order == ORDER_VERSION:
        return False
    aside = f"{out_dir}.order{order}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(out_dir, aside)
    print(f"[again] {out_dir} was trained with data order {order}, this code reads order {ORDER_VERSION}: moved to "
          f"{aside}, trained again", flush=True)
    return True


def train(nproc, config_file, out_dir, overrides):
    set_aside_if_stale(out_dir)
    if finished(out_dir):
        print(f"[skip] {out_dir} is finished")
        return
    # an interrupted run resumes from its checkpoint by itself
    run(python(nproc) + [os.path.join(HERE, 'train.py'), config_file, f'--out_dir={out_dir}'] + overrides)


def score(args, student, data_dir, slm_ckpt, top_k, out):
    """The SALT_DS score file for this top-k (made once); its wall-clock goes to timings.json, as part of
    what SALT_DS costs on top of the student's training."""
    score_file = os.path.join(out, f'scores_top{top_k}.npy')
    timings_path = os.path.join(out, 'timings.json')
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}
    if os.path.isfile(score_file) and salt.read_score_meta(score_file)['teacher'] != salt.teacher_id(slm_ckpt):
        for path in (score_file, salt.meta_path(score_file)):
            os.replace(path, path + '.old')
        timings.pop(f'score_top{top_k}', None)
        print(f"[again] {score_file} was made by an SLM trained since: moved to {score_file}.old, made again")
    started = time.time()
    run(python(args.nproc) + [os.path.join(HERE, 'salt.py'), 'score', f'--ckpt={slm_ckpt}', f'--data_dir={data_dir}',
                              f"--block_size={student['block_size']}", f"--max_sequences={student.get('train_sequences', 0)}",
                              f'--top_k={top_k}', f'--out={score_file}'], done_file=score_file)
    if f'score_top{top_k}' not in timings:
        timings[f'score_top{top_k}'] = time.time() - started
        with open(timings_path, 'w') as f:
            json.dump(timings, f)
    return score_file, timings[f'score_top{top_k}']


def planned_runs(args, slms, student):
    """{label: (kind, SLM, train.py overrides)} for one seed: the three main runs, and with --selection_only the
    control that reads SALT_DS's selection in stage 1 without KD (w = 0), the first SLM's; with --short, SALT and SALT_DS
    again on that fraction of the steps, with their own LR schedule (the paper's claim: SALT at < 70% of the
    steps matches the baseline; a cosine run's mid-way checkpoint, not yet annealed, would understate it);
    SALT and SALT_DS again with each further SLM, labelled by its name; then one run per ablated value (the value
    the main run already has is that run: same label, no second training). `slms`: {name: run_slm's dict}."""
    runs = {'baseline': ('baseline', None, [])}
    for name, slm in slms.items():
        suffix = '' if name == 'slm' else f' {name}'  # the first SLM's runs keep the names they always had
        teacher = [f"--teacher_ckpt={slm['ckpt']}"]
        runs[f'salt{suffix}'] = ('salt', name, teacher)
        runs[f'salt_ds{suffix}'] = ('salt_ds', name, teacher + [f"--score_file={slm['scores'][args.top_k]}"])
        if args.selection_only and name == 'slm':  # the control: what the selection gives without KD
            runs['selection_only'] = ('selection_only', name, runs['salt_ds'][2] + ['--kd_weight=0.0'])
        if args.short and name == 'slm':
            steps = round(student['max_steps'] * args.short)
            for kind in ('salt', 'salt_ds'):
                runs[f'{kind} {steps} steps'] = (kind, name, runs[kind][2] + [f'--max_steps={steps}'])
    teacher = runs['salt'][2]
    for key, values in args.ablate:
        kind = 'salt_ds' if key in SELECTION_KEYS else 'salt'
        current = str(args.top_k if key == 'top_k' else student.get(key))
        for value in values:
            if ablation_label(kind, key, value, current) == kind:
                continue
            if key == 'top_k':
                overrides = teacher + [f"--score_file={slms['slm']['scores'][int(value)]}"]
            else:  # a value may bring settings of its own: kd_end=teacher+kd_steps=600
                first, *more = value.split('+')
                overrides = runs[kind][2] + [f'--{key}={first}'] + [f'--{setting}' for setting in more]
            runs[ablation_label(kind, key, value, current)] = (kind, 'slm', overrides)
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


def teacher_minutes(kind, slm):
    """What a run costs before its student trains: its SLM for SALT, the SLM and the scoring for SALT_DS and the
    selection-only control."""
    if kind == 'baseline':
        return 0.0
    return slm['minutes'] + (slm['score_minutes'] if kind in ('salt_ds', 'selection_only') else 0.0)


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
        teacher = costs[label]
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


def ablation_tables(curves, args, student, max_step, done):
    """A table per ablated key whose runs are all done."""
    tables = []
    for key, values in args.ablate:
        kind = 'salt_ds' if key in SELECTION_KEYS else 'salt'
        current = str(args.top_k if key == 'top_k' else student.get(key))
        labels = [ablation_label(kind, key, value, current) for value in values]
        if not set(labels) <= set(done):
            continue
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


def selection_of(header):
    """The ids a SALT_DS run selected, from the scores and settings its metrics header recorded (train.py's rule)."""
    config = header['config']
    scores = np.load(config['score_file'])
    stage1 = config['kd_steps'] * config['batch_size'] * config['grad_accum_steps'] * header['world_size']
    return scores, salt.select_top(scores, salt.selection_size(len(scores), config['select_fraction'], stage1))


def selection_tables(run_dirs):
    """SALT_DS's selection per data subset, for each SALT_DS run of {label: its first seed's out_dir} with a selection
    of its own (every seed's is the same: one SLM's scores of one pool): each subset's share of the pool and of the
    sequences stage 1 reads."""
    tables = {}
    for label, run_dir in run_dirs.items():
        header = header_of(run_dir)
        config = header['config']
        scores, selected = selection_of(header)
        if (config['score_file'], len(selected)) in tables:
            continue
        sequences = TokenSequences(config['data_dir'], 'train', config['block_size'], max_sequences=len(scores))
        tables[(config['score_file'], len(selected))] = (
            f"`{label}`: the top {len(selected):,} of {len(scores):,} sequences by `{config['score_file']}`\n\n" +
            salt.subset_table(*sequences.domains(), selected))
    return '\n\n'.join(tables.values())


def read_ids(out_dir):
    """{step: the ids it read, every rank's, sorted} from a run's log_ids files (a resumed run logs its steps after
    the checkpoint again: the last line of a step is the one)."""
    steps = {}
    for path in sorted(glob.glob(os.path.join(out_dir, 'ids_rank*.jsonl'))):
        rank = {}
        with open(path) as f:
            for record in (json.loads(line) for line in f if line.endswith('\n')):
                rank[record['step']] = record['ids']
        for step, ids in rank.items():
            steps.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in sorted(steps.items())}


def reads_table(out, labels, seeds):
    """What each run read, from its logged ids (train.py's log_ids), not from the code that decides it: the
    sequences read and how many of them more than once, the pool's sequences never read, the steps whose batch was
    the same seed's baseline's, and for a run with a selection whether stage 1 read exactly the selected ones."""
    rows = []
    for label in labels:
        for seed in seeds:
            run_dir = run_folder(out, seed, label)
            reads, baseline = read_ids(run_dir), read_ids(run_folder(out, seed, 'baseline'))
            if not reads:
                continue  # trained before log_ids
            header = header_of(run_dir)
            config, ids = header['config'], np.concatenate([np.asarray(v, np.int64) for v in reads.values()])
            counts = np.bincount(ids, minlength=config['train_sequences'] or int(ids.max()) + 1)
            stage1 = '-'
            if config['score_file']:
                read1 = np.unique(np.concatenate([reads[s] for s in reads if s <= config['kd_steps']]))
                stage1 = 'yes' if np.array_equal(read1, selection_of(header)[1]) else 'no'
            same = sum(reads[s] == baseline.get(s) for s in reads)
            rows.append([label, seed, f"{len(ids):,}", f"{(counts > 1).sum():,}", f"{(counts == 0).sum():,} of "
                         f"{len(counts):,}", f"{same:,} of {len(reads):,}", stage1])
    return markdown_table(['run', 'seed', 'sequences read', 'read more than once', 'never read', "steps with the "
                           "baseline's batch", 'stage 1 read exactly the selection'], rows)


def task_table(curves, runs, seeds):
    """The few-shot scores of the final evaluation (train.py's eval_tasks) per run, mean over seeds."""
    metrics = [key for key in curves[(seeds[0], 'baseline')][-1] if '/' in key]
    rows = [[label] + [f"{np.mean([curves[(seed, label)][-1][key] for seed in seeds]):.4f}" for key in metrics]
            for label in runs]
    return markdown_table(['run'] + metrics, rows)


def cost_table(out, seeds, runs, slms):
    """KD-stage vs plain step time of the main SALT and SALT_DS runs, each SLM's, against the FLOP estimate of what
    KD adds: its teacher's forward over a student step (model.GPTConfig.flops_per_token)."""
    def model_config(run_dir):  # the header's model_args (runs before them: the preset of their model_size)
        header = header_of(run_dir)
        if 'model_args' in header:
            return GPTConfig(**header['model_args'])
        return GPTConfig.from_preset(header['config']['model_size'], block_size=header['config']['block_size'])

    student = model_config(run_folder(out, seeds[0], 'baseline'))
    rows = []
    for label in [label for label in main_labels(runs) if runs[label][0] != 'baseline']:
        slm = model_config(os.path.dirname(slms[runs[label][1]]['ckpt']))
        teacher_flops = slm.flops_per_token(student.block_size, backward=False)
        flop_ratio = teacher_flops / student.flops_per_token(student.block_size)
        for seed in seeds:
            records = [r for r in read_records(run_folder(out, seed, label))
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


def extra_tables(curves, runs, seeds, max_step, out):
    """The tables beyond the val loss: its noise, SALT_DS's selection and the val loss per data subset, and the
    few-shot tasks."""
    final = curves[(seeds[0], 'baseline')][-1]
    header = header_of(run_folder(out, seeds[0], 'baseline'))
    tables = "\n## Resolution\n\n" + noise_table(curves, seeds, max_step, header.get('val_tokens', 0))
    if len(final.get('val_loss_subsets', {})) > 1:
        selections = {label: run_folder(out, seeds[0], label)
                      for label in main_labels(runs) if runs[label][0] == 'salt_ds'}
        if selections:
            tables += f"\n## SALT_DS's selection per data subset (what stage 1 reads)\n\n{selection_tables(selections)}\n"
        tables += ("\n## Val loss per data subset (final)\n\n" +
                   subset_table(curves, runs, seeds, header['val_tokens_subsets']))
    reads = reads_table(out, main_labels(runs), seeds)
    if reads.count('\n') > 2:  # a row beyond the header's two lines
        tables += "\n## What each run read (its logged sequence ids)\n\n" + reads
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
        style = dict(color='0.4' if label == 'baseline' else next(palette), linestyle='-' if label in RUNS else
                     ':' if label.endswith(WEAK) else '--')
        gaps = []
        for seed in seeds:
            evals = [r for r in curves[(seed, label)] if r['step'] > 0]
            baseline = {r['step']: r['val_loss'] for r in curves[(seed, 'baseline')]}
            gaps.append({r['step']: r['val_loss'] - baseline[r['step']] for r in evals if r['step'] in baseline})
            named = dict(label=label) if seed == seeds[0] else {}
            if label != 'baseline':
                by_gap.plot(list(gaps[-1]), list(gaps[-1].values()), alpha=0.3, linewidth=1, **style)
            by_step.plot([r['step'] for r in evals], [r['val_loss'] for r in evals], alpha=0.7, **style, **named)
            by_time.plot([costs[label] + r['elapsed_s'] / 60 for r in evals], [r['val_loss'] for r in evals],
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


def parse_fractions(text):
    fractions = [float(f) for f in text.split(',')]
    if not all(0 < f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"--fractions {text!r}: expected fractions in (0, 1], e.g. 0.5,0.7,1.0")
    return fractions


# --design: the defaults of a study's flags ('demo': the arguments' own), each on a corpus (--corpus) in a BPE trained
# on its own train split. 'branches', the default study (docs/cpu_studies.md): Llama students whose parameters are
# mostly blocks, in a 4,096-token BPE, WSD branches at four fractions, SALT, SALT_DS and the selection-only control
# with an SLM that stays ahead of the student, three seeds, two runs at a time (one a core); --weak_slm_config
# config/branches_slm.py adds an SLM that the student passes. 'tokens': one tiny student (a 1,024-token BPE) at
# several budgets of tokens per parameter (--budgets), each budget a branches study of its own, one SLM for all
STUDY = dict(fractions=[0.5, 0.7, 0.85, 1.0], seeds=[1337, 1338, 1339], selection_only=True, jobs=2, corpus='stdlib',
             tokenize='')
DESIGNS = {'branches': dict(STUDY, name='branches', student_config='config/branches_student.py',
                            slm_config='config/branches_slm_strong.py', bpe_vocab=4096),
           'tokens': dict(STUDY, name='tokens', student_config='config/tokens_student.py',
                          slm_config='config/tokens_slm.py', bpe_vocab=1024, budgets=[1, 4, 16, 32],
                          seeds=[1337, 1338])}
BPE_BYTES = 20_000_000  # the BPE is trained on the first 20 MB of the corpus's train split


def corpus_name(corpus):
    """A folder name for a corpus given as prepare.py's arguments: 'stdlib' stays itself; 'text a.txt b.txt' gives
    'text_a_' and a hash of the whole (two corpora never share a folder)."""
    words = [os.path.splitext(os.path.basename(word.rstrip('/')))[0] for word in shlex.split(corpus)
             if not word.startswith('-')]
    if shlex.split(corpus) == words[:1]:
        return words[0]
    return '_'.join(words[:2] + [f"{zlib.crc32(corpus.encode()):08x}"])


def corpus_in_bpe(corpus, vocab_size):
    """The corpus (prepare.py's arguments) in a BPE of vocab_size trained on its own train split: GPT-2's tokens of it
    first (data/<name>), the BPE on their text (data/tokenizer_<name>_bpe<V>), then the corpus again in the BPE, the
    data directory returned (data/<name>_bpe<V>). Each is made once."""
    name = corpus_name(corpus)
    gpt2, bpe, data_dir = f'data/{name}', f'data/tokenizer_{name}_bpe{vocab_size}', f'data/{name}_bpe{vocab_size}'
    prepare = [sys.executable, os.path.join(HERE, 'prepare.py'), *shlex.split(corpus)]
    run(prepare + [f'--out_dir={gpt2}'], done_file=os.path.join(gpt2, 'meta.json'))
    run([sys.executable, os.path.join(HERE, 'prepare.py'), 'bpe', f'--data_dir={gpt2}', f'--vocab_size={vocab_size}',
         f'--max_bytes={BPE_BYTES}', f'--out_dir={bpe}'], done_file=os.path.join(bpe, 'tokenizer.json'))
    run(prepare + [f'--tokenizer={bpe}', f'--out_dir={data_dir}'], done_file=os.path.join(data_dir, 'meta.json'))
    return data_dir


def parse_budgets(text):
    budgets = [float(b) for b in text.split(',')]
    if not all(b > 0 for b in budgets):
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: expected tokens per parameter above 0, e.g. 1,4,16")
    return budgets


def parse_ablation(text):
    key, sep, values = text.partition('=')
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"--ablate {text!r}: expected KEY=V1,V2,...")
    return key, values.split(',')


STARTUP_S = 15  # a run's start-up and final checkpoint, assumed (not measured on a GPU yet)
SLACK = 1.3     # a study sized from a measured rate must fit its time limit 30% slower than that


def study_seconds(student, slm, step_s, kd_step_s, short, fractions=()):
    """The time of one seed's study without ablations (what gpu_experiment.sh runs), from the student's measured
    step time, plain and in the KD stage (gpu_check.sh's experiment_steps), and from the FLOP count for the rest:
    the SLM's training, its scoring of the pool and the students' evaluations (forwards: a third of a training
    token's FLOPs), plus each run's start-up. With --fractions, each main run's branches too: a decay from its
    branch point each, with KD where the point comes before kd_steps. The SLM's few evaluations are left to the
    slack."""
    block = student['block_size']
    flops = [GPTConfig.from_preset(c['model_size'], block_size=block).flops_per_token(block) for c in (student, slm)]
    token_s = step_s / (student['batch_size'] * block)  # a student token's training
    slm_token_s = token_s * flops[1] / flops[0]
    runs = [student['max_steps']] * 3 + [round(student['max_steps'] * short)] * (2 if short else 0)
    plan = branch_plan(fractions, student).values()
    points = [point for point, _ in plan]
    decays = [steps - point for point, steps in plan] * 3
    kd_steps = (len(runs) - 1) * student['kd_steps'] + 2 * sum(max(0, student['kd_steps'] - p) for p in points)
    training = (sum(runs) + sum(decays)) * step_s + kd_steps * (kd_step_s - step_s)
    evaluations = (sum(steps // student['eval_interval'] + 2 for steps in runs) +
                   sum(steps // student['eval_interval'] + 1 for steps in decays)) * student['eval_batches'] * \
        student['batch_size'] * block * token_s / 3
    slm_s = slm['max_steps'] * slm['batch_size'] * slm['block_size'] * slm_token_s
    scoring = student['train_sequences'] * block * slm_token_s / 3
    return training + evaluations + slm_s + scoring + STARTUP_S * (len(runs) + len(decays) + 2)


def scaled(config, steps):
    """config at `steps` steps, its KD stage, evaluations and checkpoints in proportion."""
    factor = steps / config['max_steps']
    return config | {key: max(1, round(config[key] * factor)) for key in ('kd_steps', 'eval_interval', 'ckpt_interval')
                     if key in config} | {'max_steps': steps}


def fit(student, slm, rate_file, seconds, short, fractions=()):
    """The student and SLM configs shrunk (same steps for both, as the configs have) until the study fits
    `seconds` with SLACK at the rate rate_file measured (gpu_check.sh's experiment_steps.jsonl), and what that
    rate was; the configs' own size where it fits."""
    if not os.path.isfile(rate_file):
        sys.exit(f"--rate_file {rate_file!r} does not exist")
    rows = [r for r in map(json.loads, open(rate_file)) if 'kd' in r.get('medians', {}) and 'plain' in r['medians']]
    if not rows:
        sys.exit(f"{rate_file}: no run with tokens/s in both stages: run gpu_check.sh's experiment_steps again")
    tokens = student['batch_size'] * student['block_size']
    step_s, kd_step_s = (tokens / rows[-1]['medians'][stage]['tokens_per_s'] for stage in ('plain', 'kd'))
    steps = student['max_steps']
    while steps > 1 and SLACK * study_seconds(scaled(student, steps), scaled(slm, steps), step_s, kd_step_s,
                                              short, fractions) > seconds:
        steps -= 1
    return scaled(student, steps), scaled(slm, steps), rows[-1]['medians']['plain']['tokens_per_s']


def run_slm(args, student, study, name, config, top_ks):
    """Train the SLM `name` (out/<study>/<name>) and score the pool with it; its files go where the first SLM's
    always went (the scores beside the seeds, so that a study that ran before finds them), a further SLM's in its
    own folder. Returns its checkpoint, score files, minutes of training and scoring, and final val loss."""
    out = os.path.join('out', args.name)
    slm_dir = args.slm_dir if name == 'slm' and args.slm_dir else os.path.join(out, name)
    with doing(study, f'training the SLM {name}'):
        train(args.nproc, config, slm_dir, [f'--{k}={v}' for k, v in args.slm_set])
    with doing(study, f'scoring the pool with the SLM {name}'):
        scored = {k: score(args, student, student['data_dir'], os.path.join(slm_dir, 'ckpt'), k,
                           out if name == 'slm' else slm_dir) for k in sorted(top_ks)}
    final = read_metrics(slm_dir)[-1]
    return dict(config=config, ckpt=os.path.join(slm_dir, 'ckpt'), scores={k: path for k, (path, _) in scored.items()},
                minutes=final['elapsed_s'] / 60, score_minutes=scored[args.top_k][1] / 60, val_loss=final['val_loss'])


class doing:
    """`with doing(study, what)`: what the study is doing, for the report of a study its time limit stops (several
    things at once with --jobs)."""
    lock = threading.Lock()

    def __init__(self, study, what):
        self.study, self.what = study, what

    def __enter__(self):
        with self.lock:
            self.study['doing'] = self.study['doing'] + [self.what]

    def __exit__(self, error, *rest):
        if error is None:  # what a stop or a failure interrupted stays, for the report
            with self.lock:
                self.study['doing'] = [w for w in self.study['doing'] if w != self.what]


def in_parallel(jobs, tasks, done):
    """Run the calls of {key: task}, `jobs` at a time (threads, each waiting on its own command), calling
    done(key, result) in this thread as each finishes. A failure or a time limit ends the commands still running
    (they resume from their checkpoints when the study is run again) and is raised here."""
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(task): key for key, task in tasks.items()}
        try:
            for future in concurrent.futures.as_completed(futures):
                done(futures[future], future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            for child in list(CHILDREN):
                child.terminate()
            raise


def train_chain(args, student, study, label, seed, overrides):
    """One run and its branches: (its evaluations, {fraction: the branch's}, {fraction: the branch's seconds})."""
    run_dir = run_folder(os.path.join('out', args.name), seed, label)
    settings = [f'--seed={seed}', '--log_ids=True'] + [f'--{k}={v}' for k, v in args.set] + overrides  # the run's win
    branches = branch_plan(args.fractions, student)
    points = ','.join(str(point) for point, _ in branches.values())
    with doing(study, f"training {label} (seed {seed})"):
        train(args.nproc, args.student_config, run_dir, settings + ([f'--branch_steps={points}'] if branches else []))
    curves, seconds = {}, {}
    for fraction, (point, steps) in branches.items():  # each a short decay from the run's stable phase
        branch_dir = f"{run_dir}_{round(fraction * 100)}pct"
        with doing(study, f"training {label} (seed {seed}) to {fraction:.0%} of the steps"):
            train(args.nproc, args.student_config, branch_dir,
                  settings + [f'--branch_from={run_dir}@{point}', f'--max_steps={steps}'])
        curves[fraction], seconds[fraction] = read_metrics(branch_dir), branch_seconds(branch_dir, point)
    return read_metrics(run_dir), curves, seconds


def run_study(args, student, study):
    """The SLMs, the scoring and every run, `args.jobs` commands at a time (the baselines beside the SLMs, which they
    do not need), the report rewritten after each run and its branches; `study` holds how far it got."""
    top_ks = {args.top_k} | {int(v) for key, values in args.ablate if key == 'top_k' for v in values}
    slms = {'slm': (args.slm_config, top_ks), **({WEAK: (args.weak_slm_config, {args.top_k})}
                                                 if args.weak_slm_config else {})}
    trained = {}

    def chain(seed, label, overrides):
        return lambda: train_chain(args, student, study, label, seed, overrides)

    def store(key, result):
        if key[0] == 'slm':
            trained[key[1]] = result
            return
        study['curves'][key] = result[0]
        for fraction in result[1]:
            study['branches'][(*key, fraction)] = result[1][fraction]
            study['branch_seconds'][(*key, fraction)] = result[2][fraction]
        if study['runs']:
            write_report(args, student, study)

    in_parallel(args.jobs, {**{('slm', name): lambda name=name, config=config, ks=ks: run_slm(
        args, student, study, name, config, ks) for name, (config, ks) in slms.items()},
        **{(seed, 'baseline'): chain(seed, 'baseline', []) for seed in args.seeds}}, store)
    study['slms'] = {name: trained[name] for name in slms}  # the first SLM first, whichever finished first
    study['runs'] = planned_runs(args, study['slms'], student)
    study['costs'] = {label: teacher_minutes(kind, study['slms'].get(slm))
                      for label, (kind, slm, _) in study['runs'].items()}
    in_parallel(args.jobs, {(seed, label): chain(seed, label, overrides) for label, (_, _, overrides)
                            in study['runs'].items() if label != 'baseline' for seed in args.seeds}, store)
    write_report(args, student, study)


def branch_seconds(branch_dir, point):
    """A branch's own wall-clock: its metrics begin with its parent's records up to the branch point, and its clock
    goes on from the parent's there (train.py)."""
    timed = [r for r in read_records(branch_dir) if 'elapsed_s' in r and 'step' in r]
    return timed[-1]['elapsed_s'] - [r['elapsed_s'] for r in timed if r['step'] <= point][-1]


def branch_plan(fractions, student):
    """{fraction: (branch point, steps)} of the fractions below 1 (1: the run itself): a WSD run of round(fraction *
    max_steps) steps is the main run's checkpoint at its decay_start, decayed (salt.py, "branches")."""
    if fractions and student.get('lr_schedule') != 'wsd':
        sys.exit("--fractions branches a run's stable phase: the student config needs lr_schedule = 'wsd'")
    plan = {}
    for fraction in sorted(f for f in fractions if f < 1):
        steps = round(fraction * student['max_steps'])
        plan[fraction] = (salt.decay_start(steps, student.get('decay_fraction', 0.2)), steps)
    return plan


def fraction_reached(losses, target):
    """The smallest fraction of the steps whose loss reaches target, linear between the fractions around it, from
    {fraction: final val loss}; None where none does."""
    fractions = sorted(losses)
    for i, fraction in enumerate(fractions):
        if losses[fraction] <= target:
            if i == 0:
                return fraction
            before = fractions[i - 1]
            return before + (losses[before] - target) / (losses[before] - losses[fraction]) * (fraction - before)
    return None


def of_run(per_branch, seed, label):
    """{fraction: value} of one run's branches, from {(seed, label, fraction): value}."""
    return {f: value for (s, l, f), value in per_branch.items() if (s, l) == (seed, label)}


def fraction_curves(study, labels, seeds):
    """{(seed, label): {fraction: final val loss}}, the run itself at 1.0."""
    return {(seed, label): {1.0: study['curves'][(seed, label)][-1]['val_loss'],
                            **{f: c[-1]['val_loss'] for f, c in of_run(study['branches'], seed, label).items()}}
            for label in labels for seed in seeds}


def fraction_table(study, labels, seeds):
    """Per run and seed (and the mean, the spread over seeds in brackets): the final val loss of each fraction's
    branch; the fraction at which it reaches the same seed's baseline at 100%; what KD gave at 100% (the baseline's
    loss minus the run's) beside what the baseline's last 30% of the steps gave it (its 70% branch minus its 100%,
    the nearest fraction below 100% where 70% is not one): the gain the claim needs to buy back that cost."""
    losses = fraction_curves(study, labels, seeds)
    fractions = sorted(losses[(seeds[0], 'baseline')])
    short = min(fractions[:-1] or [1.0], key=lambda f: abs(f - 0.7))
    rows = []
    for label in labels:
        per_seed = []
        for seed in seeds:
            run, baseline = losses[(seed, label)], losses[(seed, 'baseline')]
            per_seed.append([run[f] for f in fractions] + [fraction_reached(run, baseline[1.0]),
                                                           baseline[1.0] - run[1.0], baseline[short] - baseline[1.0]])
            rows.append([label, seed] + [f"{v:.4f}" for v in per_seed[-1][:-3]] +
                        [reached(per_seed[-1][-3])] + [f"{v:+.4f}" for v in per_seed[-1][-2:]])
        if len(seeds) > 1:
            columns = list(zip(*per_seed))
            reach = columns[-3]
            rows.append([label, 'mean'] + [spread(c, '.4f') for c in columns[:-3]] +
                        [spread(reach, '.0%') if None not in reach else f"not reached ({reach.count(None)} of "
                         f"{len(reach)} seeds)"] + [spread(c, '+.4f') for c in columns[-2:]])
    return markdown_table(['run', 'seed'] + [f"val loss at {f:.0%}" for f in fractions] +
                          ["reaches the baseline's 100% at", 'KD gain at 100%',
                           f"the baseline's last {1 - short:.0%} of the steps"], rows)


def reached(fraction):
    return 'not reached' if fraction is None else f"{fraction:.0%}"


def spread(values, spec):
    """The mean over seeds and, in brackets, the smallest and largest; one seed's value alone."""
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    return f"{np.mean(values):{spec}} ({min(values):{spec}} .. {max(values):{spec}})"


def lead_table(study, labels, seeds, kd_steps):
    """Each SLM's final val loss (it is trained before the students) beside the students' at the end of stage 1 (the
    evaluation at or before kd_steps) and at the end; per run, its lead over the same seed's baseline there (the
    baseline's val loss minus the run's: positive where KD led); in the baseline's row the seed-to-seed spread of
    the baseline (largest minus smallest), against which a lead of the same size says nothing."""
    curves = study['curves']
    baseline = curves[(seeds[0], 'baseline')]
    ends = [[r['step'] for r in baseline if r['step'] <= kd_steps][-1], baseline[-1]['step']]
    rows = [[f"SLM `{name}` (trained before)", f"{slm['val_loss']:.4f}", '', f"{slm['val_loss']:.4f}", '']
            for name, slm in study['slms'].items()]
    for label in labels:
        row = [label]
        for step in ends:
            losses = [val_at(curves[(seed, label)], step) for seed in seeds]
            leads = [val_at(curves[(seed, 'baseline')], step) - loss for seed, loss in zip(seeds, losses)]
            if label == 'baseline':
                lead = f"seeds differ by {max(losses) - min(losses):.4f}" if len(seeds) > 1 else '-'
            else:
                lead = f"{spread(leads, '+.4f')}, ahead on {sum(d > 0 for d in leads)} of {len(seeds)} seeds"
            row += [spread(losses, '.4f'), lead]
        rows.append(row)
    return markdown_table(['run', f'val loss at the end of stage 1 (step {ends[0]})', 'lead over the baseline there',
                           f'val loss at the end (step {ends[1]})', 'lead over the baseline there'], rows)


def branches_wallclock_table(study, labels, seeds):
    """Per run and seed: its SLM's training and the scoring (done before the students, shown apart, and counted),
    the run and its branches, the total; and the time of a run of the fraction at which it reaches the baseline's
    100%, the SLM and scoring included: a branch's clock is that of a whole run of its length (train.py counts its
    parent's up to the branch point), linear between fractions."""
    losses = fraction_curves(study, labels, seeds)
    rows = []
    for label in labels:
        slm = study['slms'].get(study['runs'][label][1])
        teacher = study['costs'][label]
        slm_minutes = slm['minutes'] if slm else 0.0
        for seed in seeds:
            run = study['curves'][(seed, label)][-1]['elapsed_s'] / 60
            branches = sum(of_run(study['branch_seconds'], seed, label).values()) / 60
            minutes = {1.0: run, **{f: curve[-1]['elapsed_s'] / 60
                                    for f, curve in of_run(study['branches'], seed, label).items()}}
            fraction = fraction_reached(losses[(seed, label)], losses[(seed, 'baseline')][1.0])
            reach = ['not reached', '-']
            if fraction is not None:
                at = np.interp(fraction, sorted(minutes), [minutes[f] for f in sorted(minutes)]) + teacher
                reach = [f"{at:.1f}", f"{at / (study['curves'][(seed, 'baseline')][-1]['elapsed_s'] / 60):.2f}x"]
            rows.append([label, seed, f"{slm_minutes:.1f}", f"{teacher - slm_minutes:.1f}", f"{run:.1f}",
                         f"{branches:.1f}", f"{teacher + run + branches:.1f}"] + reach)
    return markdown_table(['run', 'seed', 'SLM, trained before (min)', 'scoring (min)', 'the run (min)',
                           'its branches (min)', 'total (min)', "a run of the fraction that reaches the baseline's "
                           "100%, SLM and scoring included (min)", "vs the baseline's 100%"], rows)


def plot_fractions(study, labels, seeds, path):
    """Final val loss against the fraction of the steps, per run: the mean over seeds bold, each seed faint; the
    baseline's 100% as a line, where a run's curve crosses it is the fraction in the table."""
    losses = fraction_curves(study, labels, seeds)
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, color in zip(labels, plt.get_cmap('tab10').colors):
        fractions = sorted(losses[(seeds[0], label)])
        for seed in seeds:
            ax.plot(fractions, [losses[(seed, label)][f] for f in fractions], color=color, alpha=0.3, linewidth=1)
        ax.plot(fractions, [np.mean([losses[(seed, label)][f] for seed in seeds]) for f in fractions], color=color,
                linewidth=2.5, marker='o', label=f"{label} (mean of {len(seeds)} seeds)")
    ax.axhline(np.mean([losses[(seed, 'baseline')][1.0] for seed in seeds]), color='0.4', linestyle='--',
               label="the baseline's 100%")
    ax.set(xlabel='fraction of the steps (a WSD branch each)', ylabel='final val loss', title='val loss vs budget')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report_tables(args, student, study, done):
    """The report's tables over the runs in `done`, the baseline among them."""
    curves, seeds, out = study['curves'], args.seeds, os.path.join('out', args.name)
    max_step = curves[(seeds[0], 'baseline')][-1]['step']
    return ("## Val loss\n\n" + main_table(curves, main_labels(done), seeds, max_step) +
            "\n## The SLMs, and KD's lead over the baseline\n\n" +
            lead_table(study, main_labels(done), seeds, student['kd_steps']) +
            "\n## Wall-clock\n\n" + wallclock_table(curves, done, seeds, study['costs']) +
            (f"\n## Ablations\n\n{ablation_tables(curves, args, student, max_step, done)}" if args.ablate else "") +
            extra_tables(curves, done, seeds, max_step, out) +
            "\n## Cost per step\n\n" + cost_table(out, seeds, done, study['slms']) +
            branches_tables(args, student, study, done))


def branched(args, study, done):
    """The main runs among done whose branches have all finished, the baseline first; [] until the baseline's have."""
    fractions = [f for f in args.fractions if f < 1]
    if not fractions:
        return []
    labels = [label for label in main_labels(done)
              if all((seed, label, f) in study['branches'] for seed in args.seeds for f in fractions)]
    return labels if 'baseline' in labels else []


def branches_tables(args, student, study, done):
    """With --fractions: the fractions' table, and the val loss per data subset at the end of stage 1."""
    labels = branched(args, study, done)
    if not labels:
        return ''
    stage1 = {key: [r for r in curve if r['step'] <= student['kd_steps']] for key, curve in study['curves'].items()}
    header = header_of(run_folder(os.path.join('out', args.name), args.seeds[0], 'baseline'))
    subsets = len(header.get('val_tokens_subsets', {})) > 1 and stage1[(args.seeds[0], 'baseline')][-1]['step'] > 0
    return ("\n## Fractions of the steps (a WSD branch each)\n\n" + fraction_table(study, labels, args.seeds) +
            "\n## Wall-clock with the branches\n\n" + branches_wallclock_table(study, labels, args.seeds) +
            (f"\n## Val loss per data subset at the end of stage 1 (step {student['kd_steps']}, or the evaluation "
             f"before it)\n\n" + subset_table(stage1, {label: () for label in labels}, args.seeds,
                                                header['val_tokens_subsets']) if subsets else ''))


def write_report(args, student, study, stopped=False):
    """table.md and val_loss.png over the runs that finished for every seed: after each run and when the time limit
    stops the study (said at the top), so a study that runs out of time still reports what it trained."""
    results = os.path.join('results', args.name)
    done = {label: plan for label, plan in study['runs'].items()
            if all((seed, label) in study['curves'] for seed in args.seeds)}
    report = (f"# SALT experiment `{args.name}`\n\n{args.corpus_line}\n\n{args.student_config} (students), seeds "
              f"{args.seeds}\n" +
              "".join(f"- SLM `{name}`: {slm['config']}, trained in {slm['minutes']:.1f} min, scored the pool in "
                      f"{slm['score_minutes']:.1f} min, final val loss {slm['val_loss']:.4f}\n"
                      for name, slm in study['slms'].items()) + "\n" +
              study['sizing'] +
              (f"**Stopped by its time limit** while {'; '.join(study['doing'])}: the tables hold the runs that finished.\n\n"
               if stopped else '') +
              (report_tables(args, student, study, done) if 'baseline' in done else ''))
    with open(os.path.join(results, 'table.md'), 'w') as f:
        f.write(report)
    if 'baseline' in done:
        plot_curves(study['curves'], study['costs'], done, os.path.join(results, 'val_loss.png'))
    if branched(args, study, done):
        plot_fractions(study, branched(args, study, done), args.seeds, os.path.join(results, 'fractions.png'))
    return report


# ----------------------------------------------------------------------------------------------------------
# --budgets (the tokens design): the study once per budget of tokens per parameter, one SLM for them all


def student_params(student):
    """The student's parameters, counted from its shape in its data's vocabulary (the tied embedding included): what
    a budget of tokens per parameter is per."""
    vocab_size = TokenSequences(student['data_dir'], 'train', student['block_size']).vocab_size
    return GPTConfig.from_preset(student['model_size'], architecture=student.get('architecture') or None,
                                 block_size=student['block_size'], vocab_size=vocab_size,
                                 **{key: student[key] for key in OPTIONAL if student.get(key) is not None}).n_params()


def tokens_per_step(config):
    return config['batch_size'] * config.get('grad_accum_steps', 1) * config['block_size']


def at_tokens(config, tokens):
    """config's settings that change with the steps, for a run of `tokens` tokens: its steps, and its KD stage,
    warmup, evaluations and checkpoints at the config's own shares of them."""
    steps = max(1, round(tokens / tokens_per_step(config)))
    settings = scaled(config, steps) | {'warmup_steps': max(1, round(config['warmup_steps'] * steps /
                                                                        config['max_steps']))}
    return {key: settings[key] for key in ('max_steps', 'kd_steps', 'warmup_steps', 'eval_interval', 'ckpt_interval')
            if key in settings}


def budget_settings(student, budget, n_params):
    """The student's settings at `budget` tokens per parameter. Its pool is the first sequences of the corpus, as many
    as its steps read: each is read once. Stage 1 stays the config's share of the steps at every budget (17%, the
    paper's 36K of ~208K), and a budget's shorter branches keep that stage 1 whole, as the paper's shorter SALT run
    keeps its n_KD."""
    settings = at_tokens(student, budget * n_params)
    return settings | {'train_sequences': settings['max_steps'] * tokens_per_step(student) // student['block_size']}


def budget_name(budget):
    return f"{budget:g}x"


def run_budgets(args, student):
    """The study once per budget of tokens per parameter, the shortest first (its baselines train beside the SLM), each
    in out/<name>/<B>x/ with its own report in results/<name>/<B>x/; one SLM, trained first on the longest budget's
    tokens in out/<name>/slm, for them all (each budget's pool scored with it); the report over the budgets,
    results/<name>/table.md and budgets.png, rewritten after each."""
    n_params = student_params(student)
    slm = read_config(args.slm_config) | dict(args.slm_set)
    slm_set = args.slm_set + list(at_tokens(slm, max(args.budgets) * n_params).items())
    studies = {}
    for budget in sorted(args.budgets):
        settings = budget_settings(student, budget, n_params)
        budget_args = argparse.Namespace(**{**vars(args), 'name': f"{args.name}/{budget_name(budget)}",
                                            'set': args.set + list(settings.items()), 'slm_set': slm_set,
                                            'slm_dir': os.path.join('out', args.name, 'slm')})
        study = new_study(f"{budget:g} tokens per parameter of the student's {n_params:,}: {settings['max_steps']} "
                          f"steps over a pool of {settings['train_sequences']:,} sequences, stage 1 "
                          f"{settings['kd_steps']} steps ({settings['kd_steps'] / settings['max_steps']:.0%}).\n\n")
        studies[budget] = (budget_args, student | settings, study)
        os.makedirs(os.path.join('results', budget_args.name), exist_ok=True)
        try:
            run_study(budget_args, student | settings, study)
        except Stopped:  # reported here, and raised again with what it stopped and where that report is
            write_report(budget_args, student | settings, study, stopped=True)
            raise Stopped(study['doing'], os.path.join('results', budget_args.name))
        finally:
            write_budgets_report(args, studies, n_params)


def budget_rows(args, studies):
    """(budget, its args, its study, the main runs whose branches all finished) of each budget with its baselines'."""
    rows = []
    for budget, (budget_args, _, study) in sorted(studies.items()):
        done = {label: plan for label, plan in study['runs'].items()
                if all((seed, label) in study['curves'] for seed in args.seeds)}
        labels = branched(budget_args, study, done)
        if labels:
            rows.append((budget, budget_args, study, labels))
    return rows


def reaches(study, label, seeds):
    """Per seed, the fraction of the steps at which a run reaches the same seed's baseline at 100% (None: never)."""
    losses = fraction_curves(study, [label, 'baseline'], seeds)
    return [fraction_reached(losses[(seed, label)], losses[(seed, 'baseline')][1.0]) for seed in seeds]


def reach_cell(study, label, seeds):
    """reaches() over the seeds, as a table cell."""
    reach = reaches(study, label, seeds)
    return spread(reach, '.0%') if None not in reach else f"not reached ({reach.count(None)} of {len(reach)} seeds)"


def budgets_table(args, rows):
    """One row a budget: the steps and stage 1; what the baseline's last 30% of the steps are worth; the fraction at
    which each other run reaches the baseline's 100%; the step at which the baseline passes the SLM's val loss."""
    methods = [label for label in ('salt', 'salt_ds', 'selection_only') if any(label in r[3] for r in rows)]
    table = []
    for budget, budget_args, study, labels in rows:
        seeds, config = args.seeds, header_of(run_folder(os.path.join('out', budget_args.name), args.seeds[0],
                                                         'baseline'))['config']
        losses = fraction_curves(study, ['baseline'], seeds)
        short = min([f for f in losses[(seeds[0], 'baseline')] if f < 1] or [1.0], key=lambda f: abs(f - 0.7))
        last = [losses[(seed, 'baseline')][short] - losses[(seed, 'baseline')][1.0] for seed in seeds]
        slm_loss = study['slms']['slm']['val_loss']
        passes = [steps_to_reach(study['curves'][(seed, 'baseline')], slm_loss) for seed in seeds]
        table.append([f"{budget:g}", f"{config['max_steps']:,} ({config['kd_steps']:,})", spread(last, '+.4f')] +
                     [reach_cell(study, label, seeds) if label in labels else '-' for label in methods] +
                     [spread(passes, '.0f') if None not in passes else
                      f"not passed ({passes.count(None)} of {len(passes)} seeds)"])
    return markdown_table(["tokens per parameter", "steps (stage 1)", "the baseline's last 30% of the steps"] +
                          [f"{label} reaches the baseline's 100% at" for label in methods] +
                          ["the baseline passes the SLM's val loss at step"], table)


def leads_table(args, rows):
    """Per budget and KD run, its lead over the same seed's baseline (the baseline's val loss minus its own) at the
    end of stage 1 (the evaluation at or before it) and at the end."""
    table = []
    for budget, budget_args, study, labels in rows:
        curves, seeds = study['curves'], args.seeds
        header = header_of(run_folder(os.path.join('out', budget_args.name), seeds[0], 'baseline'))
        kd_steps = header['config']['kd_steps']
        ends = [[r['step'] for r in curves[(seeds[0], 'baseline')] if r['step'] <= kd_steps][-1],
                curves[(seeds[0], 'baseline')][-1]['step']]
        for label in [label for label in labels if label in ('salt', 'salt_ds')]:
            table.append([f"{budget:g}", label] + [spread([val_at(curves[(seed, 'baseline')], step) -
                                                           val_at(curves[(seed, label)], step) for seed in seeds],
                                                          '+.4f') for step in ends])
    return markdown_table(['tokens per parameter', 'run', "KD's lead at the end of stage 1",
                           "KD's lead at the end"], table)


def in_context_table(args, rows):
    """Per budget and run, at its end: the induction loss beside the first copy's loss (a model that copies has the
    first far above the second), and the in-context score (evaluation.py); each score beside its difference from
    the same seed's baseline's."""
    table = []
    for budget, _, study, labels in rows:
        for label in labels:
            cells = []
            for key in ('induction_loss', 'first_copy_loss', 'in_context_score'):
                finals = [study['curves'][(seed, label)][-1].get(key) for seed in args.seeds]
                baselines = [study['curves'][(seed, 'baseline')][-1].get(key) for seed in args.seeds]
                if None in finals:  # trained before it was logged
                    cells += ['-'] if key == 'first_copy_loss' else ['-', '-']
                elif key == 'first_copy_loss':
                    cells.append(spread(finals, '.4f'))
                else:
                    cells += [spread(finals, '.4f'), '' if label == 'baseline' else
                              spread([f - b for f, b in zip(finals, baselines)], '+.4f')]
            table.append([f"{budget:g}", label] + cells)
    return markdown_table(['tokens per parameter', 'run', 'induction loss', "minus the baseline's",
                           "the first copy's loss", 'in-context score', "minus the baseline's"], table)


def plot_budgets(args, rows, path):
    """The fraction of the steps at which each run reaches the baseline's 100%, against tokens per parameter: the mean
    over the seeds that reach it, each seed faint; a budget where some seed does not reach it is marked above 1."""
    fig, ax = plt.subplots(figsize=(7, 5))
    methods = [label for label in ('salt', 'salt_ds', 'selection_only') if any(label in r[3] for r in rows)]
    for label, color in zip(methods, plt.get_cmap('tab10').colors[1:]):
        means, budgets = [], []
        for budget, _, study, labels in rows:
            if label not in labels:
                continue
            reach = reaches(study, label, args.seeds)
            ax.scatter([budget] * len(reach), [1.05 if r is None else r for r in reach], color=color, alpha=0.35,
                       marker='o', s=18)
            if None not in reach:
                means.append(np.mean(reach))
                budgets.append(budget)
        ax.plot(budgets, means, color=color, linewidth=2.5, marker='o',
                label=f"{label} (mean of {len(args.seeds)} seeds)")
    ax.axhline(1.0, color='0.4', linewidth=1, label="the baseline's 100% (above: not reached)")
    ax.axhline(0.7, color='0.4', linestyle='--', linewidth=1, label="the paper's claim: under 70%")
    ax.set_xscale('log', base=2)
    ax.set(xlabel='tokens per parameter (a study each)',
           ylabel="fraction of the steps that reaches the baseline's 100%",
           title=f"SALT's saving against the training budget, on {args.corpus or 'the configs’ data'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_budgets_report(args, studies, n_params):
    """results/<name>/table.md and budgets.png over the budgets whose runs and branches have finished."""
    rows = budget_rows(args, studies)
    results = os.path.join('results', args.name)
    student = next(iter(studies.values()))[1]
    report = (f"# SALT experiment `{args.name}`: budgets of tokens per parameter\n\n{args.corpus_line}\n\n"
              f"{args.student_config} ({n_params:,} parameters, the tied embedding included), seeds {args.seeds}; "
              f"one SLM ({args.slm_config}), trained on the longest budget's tokens. Each budget is a study of its "
              f"own, its report in {results}/<budget>/table.md; stage 1 is "
              f"{student['kd_steps'] / student['max_steps']:.0%} of each budget's steps.\n\n")
    if rows:
        report += ("## Where the claim can live\n\n" + budgets_table(args, rows) +
                   "\n## KD's lead over the baseline\n\n" + leads_table(args, rows) +
                   "\n## In-context learning at the end (evaluation.py)\n\n" + in_context_table(args, rows))
        plot_budgets(args, rows, os.path.join(results, 'budgets.png'))
    with open(os.path.join(results, 'table.md'), 'w') as f:
        f.write(report)
    return report


def new_study(sizing=''):
    return dict(curves={}, branches={}, branch_seconds={}, slms={}, runs={}, costs=None, doing=[], sizing=sizing)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--name', default='demo', help='out/<name>/ for runs, results/<name>/ for the report')
    parser.add_argument('--slm_config', default='config/demo_slm.py')
    parser.add_argument('--student_config', default='config/demo_student.py')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1337, 1338])
    parser.add_argument('--nproc', type=int, default=1, help='processes per run (torchrun when > 1)')
    parser.add_argument('--jobs', type=int, default=1,
                        help='runs trained at once, each on its share of the CPU cores (OMP_NUM_THREADS, unless set)')
    parser.add_argument('--selection_only', action=argparse.BooleanOptionalAction, default=False,
                        help="also the control: SALT_DS's selection in stage 1 without KD (w = 0)")
    parser.add_argument('--top_k', type=int, default=10, help='SALT_DS: learnable = target in the SLM top-k')
    parser.add_argument('--short', type=float, default=0.7,
                        help='also train SALT and SALT_DS on this fraction of the steps (0 = not)')
    parser.add_argument('--ablate', type=parse_ablation, action='append', default=[], metavar='KEY=V1,V2,...')
    parser.add_argument('--tokenize', default='stdlib',
                        help="prepare.py arguments that make the student config's data_dir when it has no "
                             "meta.json ('' = it must exist already)")
    parser.add_argument('--set', type=parse_setting, nargs='*', action='extend', default=[], metavar='KEY=VALUE',
                        help="overrides of the student config for every student run")
    parser.add_argument('--slm_set', type=parse_setting, nargs='*', action='extend', default=[], metavar='KEY=VALUE',
                        help="overrides of the SLM config")
    parser.add_argument('--fractions', type=parse_fractions, default=[], metavar='F1,F2,...',
                        help="each main run at these fractions of its steps too, a WSD branch each (1 = the run)")
    parser.add_argument('--weak_slm_config', default='',
                        help=f"a second SLM, out/<name>/{WEAK}: SALT and SALT_DS again with it, labelled '{WEAK}'")
    parser.add_argument('--corpus', default='', metavar='ARGS',
                        help="prepare.py's arguments of a corpus ('stdlib', 'text a.txt b.txt', 'parquet ...'): the "
                             "runs' data is the corpus in a BPE trained on its train split, whatever the configs' "
                             "data_dir ('' = the configs' data_dir, made by --tokenize where it is missing)")
    parser.add_argument('--bpe_vocab', type=int, default=4096, help="with --corpus: the BPE's vocabulary size")
    parser.add_argument('--budgets', type=parse_budgets, default=[], metavar='B1,B2,...',
                        help="the study once per budget of tokens per parameter of the student (the tokens design)")
    parser.add_argument('--design', choices=('demo', *DESIGNS), default='branches',
                        help="the defaults of the flags above, each still overridable: 'branches' (the default "
                             "study of docs/cpu_studies.md) or 'demo' (the earlier demo: the defaults shown)")
    parser.add_argument('--fit', type=float, default=0, metavar='SECONDS',
                        help="fewer steps where the study would not fit SECONDS with 30%% slack at --rate_file's rate")
    parser.add_argument('--rate_file', help="gpu_check.sh's experiment_steps.jsonl: the rate --fit sizes by")
    parser.set_defaults(**DESIGNS.get(parser.parse_known_args()[0].design, {}))
    args = parser.parse_args()
    args.slm_dir = ''  # where the first SLM trains: out/<name>/slm, or the one SLM of every budget
    design = DESIGNS.get(args.design, {})
    if args.corpus and args.corpus != design.get('corpus') and args.name == design.get('name'):  # on another corpus
        args.name = f"{args.name}_{corpus_name(args.corpus)}"
    if args.corpus and args.tokenize:
        parser.error(f"--corpus {args.corpus!r} makes the runs' data, --tokenize {args.tokenize!r} the configs' "
                     f"data_dir: give one (--corpus= for the configs' data_dir)")
    if args.budgets and not args.fractions:
        parser.error("--budgets compares the runs by their WSD branches: give --fractions too")
    if args.fractions:
        args.short = 0  # the branches give every shorter budget
    if min(args.nproc, args.top_k, args.jobs) < 1:
        parser.error(f"--nproc, --top_k and --jobs must be at least 1, got {args.nproc}, {args.top_k} and {args.jobs}")
    if not 0 <= args.short < 1:
        parser.error(f"--short must be in [0, 1), got {args.short}")
    if bool(args.fit) != bool(args.rate_file):
        parser.error("--fit and --rate_file go together")
    return args


def fit_study(args, student):
    """With --fit: the student's settings shrunk to fit (and the SLM's, added to --set and --slm_set), and the
    report's line that says so."""
    slm = read_config(args.slm_config) | dict(args.slm_set)
    for config, name in ((student, args.student_config), (slm, args.slm_config)):
        missing = [key for key in ('model_size', 'batch_size', 'block_size', 'eval_interval', 'eval_batches',
                                   'train_sequences') if key not in config]
        if missing:
            sys.exit(f"{name} must set {', '.join(missing)} for --fit")
    fitted, slm, rate = fit(student, slm, args.rate_file, args.fit, args.short, args.fractions)
    args.set += [(key, value) for key, value in fitted.items() if student.get(key) != value]
    args.slm_set += [(key, slm[key]) for key in ('max_steps', 'eval_interval', 'ckpt_interval') if key in slm]
    return fitted, (f"Sized to fit {args.fit:.0f} s with 30% slack at the {rate:,.0f} tokens/s that {args.rate_file} "
                    f"measured (experiment.study_seconds): max_steps={fitted['max_steps']}, "
                    f"{student['max_steps']} in {args.student_config}.\n\n")


def main():
    args = parse_args()
    student = read_config(args.student_config) | dict(args.set)  # what the main runs train with
    for key in ('data_dir', 'block_size', 'max_steps'):
        if key not in student:
            sys.exit(f"{args.student_config} must set {key}: experiment.py scores the data the students train on "
                     f"and sizes the shorter runs by it")
    study = new_study()
    if args.fit:
        student, study['sizing'] = fit_study(args, student)
        print(study['sizing'].strip(), flush=True)
    if args.corpus:  # every run's data: the corpus in a BPE of its own
        student['data_dir'] = corpus_in_bpe(args.corpus, args.bpe_vocab)
        args.set.append(('data_dir', student['data_dir']))
        args.slm_set.append(('data_dir', student['data_dir']))
    elif args.tokenize:
        run([sys.executable, os.path.join(HERE, 'prepare.py'), *shlex.split(args.tokenize),
             f"--out_dir={student['data_dir']}"], done_file=os.path.join(student['data_dir'], 'meta.json'))
    train_tokens = len(TokenSequences(student['data_dir'], 'train', 1))
    args.corpus_line = (f"Corpus: `prepare.py {args.corpus}` in a {args.bpe_vocab:,}-token BPE trained on its train "
                        f"split"
                        if args.corpus else f"Corpus: {student['data_dir']}") + f", {train_tokens:,} train tokens."
    results = os.path.join('results', args.name)
    os.makedirs(results, exist_ok=True)
    if args.jobs > 1:  # one run per core: a small model's run gains less from a second thread than from a second run
        os.environ.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // args.jobs)))
    signal.signal(signal.SIGTERM, on_sigterm)  # the time limit of the command: report what finished, then stop
    try:
        if args.budgets:
            run_budgets(args, student)
            print(f"wrote {results}/table.md and {results}/budgets.png")
            return
        run_study(args, student, study)
    except Stopped as stop:
        doing, where = stop.args or (study['doing'], results)  # run_budgets' Stopped: the budget's, reported
        if not stop.args:
            write_report(args, student, study, stopped=True)
        print(f"stopped by the time limit while {'; '.join(doing)}: {where}/table.md holds the runs that finished")
        sys.exit(124)
    print(write_report(args, student, study))
    print(f"wrote {results}/table.md and {results}/val_loss.png")


if __name__ == '__main__':
    main()
