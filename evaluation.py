r"""
Evaluation: the val loss that train.py logs (val_loss), and few-shot evaluation of a checkpoint: multiple
choice in HellaSwag's format, last-word cloze in LAMBADA's.

  python evaluation.py --ckpt out/demo/baseline/ckpt --task hellaswag:hellaswag_val.jsonl \
      --task lambada:lambada_test.jsonl --out results/eval.json
  python evaluation.py --ckpt gpt2 --task hellaswag:hellaswag_val.jsonl --shots 10 \
      --fewshot_file hellaswag:hellaswag_train.jsonl                       # 10-shot
  torchrun --standalone --nproc_per_node=8 evaluation.py --ckpt out/pile/student/ckpt --task ...
  python evaluation.py --ckpt /models/pythia-1.4b --data_dir data/pile_neox --block_size 2048   # its val loss
  python evaluation.py --ckpt out/demo/salt/ckpt          # the induction loss alone

--ckpt: a train.py checkpoint, a transformers model's directory or a GPT-2 name ('gpt2', ...), each scored with its
own tokenizer (a checkpoint's is its data's: tokenizer.py). --task TASK:PATH, repeatable (or comma-separated,
'hellaswag:A.jsonl,lambada:B.jsonl'); the task files are jsonl, one JSON object a line:
- hellaswag: {"ctx": str, "endings": [str, ...], "label": int}, the label indexing the right ending
  (HellaSwag's own hellaswag_val.jsonl; any number of endings, at least 2);
- lambada: {"text": str}: the target is " " + the word after the last space, the context what comes before
  (lambada_openai's test jsonl).
--shots K prepends K solved examples (context + " " + right ending; a LAMBADA text whole) to every context,
joined by a blank line as lm-evaluation-harness does. They come from a separate file per task, given as
--fewshot_file TASK:PATH (repeatable or comma-separated, the format of the task's own file; required for
every task when K > 0; use another split than the one evaluated), drawn for each example by its own rng
seeded with (--seed, task, example index): the same prompts for any number of ranks.

--data_dir DIR --block_size N: the val loss (val_loss, as train.py logs it) on DIR's val split, in the data's
tokens, which must be the model's (--val_sequences K: K of them, spread over the split; default all), and its
in-context score. Always: the induction loss (both scores: "In-context learning" below, docs/evaluation.md).

Prints a line per task (scores, chance level, examples, contexts cut from the left to fit the block size)
and with --out writes them to a JSON file with the settings. Under torchrun the examples are split across
the ranks and the sums all-reduced (gloo on CPU, nccl on CUDA): the scores of one process, up to float
summation. A malformed line is an error naming its file and line.

During training, on the model being trained, on every rank (the task files are read once):

  tasks = evaluation.read_tasks('hellaswag:PATH,lambada:PATH')
  scores = evaluation.evaluate_tasks(raw_model, tasks, tokenizer.of_data(data_dir), rank=rank, world_size=world_size,
                                   autocast=autocast)
  # {'hellaswag': {'acc': ..., 'acc_norm': ..., ...}, 'lambada': {'acc': ..., 'ppl': ...}}
"""
import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import salt
import tokenizer
from common import InputError, compute_init, end_job, report_input_errors, write_json
from data import TokenSequences

# ----------------------------------------------------------------------------------------------------------
# The val loss


def val_set(val_data, count):
    """The val sequences every evaluation of a run reads: count of them spread evenly over the split (its
    first ones may all be one document, or one subset). (their ids, each one's data subset as an index into
    names, the subset names: none for data without subsets, e.g. nanoGPT's prepare.py's)."""
    ids = np.unique(np.linspace(0, len(val_data) - 1, min(len(val_data), count)).round().astype(np.int64))
    try:
        subsets, names = val_data.domains()
    except InputError:  # the overall val loss only
        return ids, np.zeros(len(ids), dtype=np.int64), []
    return ids, subsets[ids].astype(np.int64), names  # (int64: index_add_'s index)


@torch.no_grad()
def val_loss(model, val_data, val_set, *, batch_size, rank=0, world_size=1, autocast=None):
    """{'val_loss': mean next-token CE, 'val_loss_se': its standard error over the sequences,
    'val_loss_subsets': {data subset: its mean CE} (with subsets)} of `model` (the GPT, sharded or not; not a
    DDP or compiled wrapper) over the sequences of val_set, which the ranks share. Every rank runs as many
    forwards, as fsdp gathers weights in each: a rank short of batches repeats one, uncounted."""
    ids, subsets, names = val_set
    device = next(model.parameters()).device
    model.eval()
    # per subset: the sequences' CE sums, their mean CE squared, and their count
    sums = torch.zeros(3, max(1, len(names)), dtype=torch.float64, device=device)
    by_position = torch.zeros(val_data.block_size, dtype=torch.float64, device=device)  # CE sums per position
    starts = range(0, len(ids), batch_size)
    mine = starts[rank::world_size]
    for i in range(-(-len(starts) // world_size)):
        first = mine[i] if i < len(mine) else starts[0]
        seqs = val_data.get(ids[first:first + batch_size]).to(device)
        with autocast or nullcontext():
            ce, _ = model(seqs[:, :-1], seqs[:, 1:], reduction='none')
        if i < len(mine):
            subset = torch.as_tensor(subsets[first:first + batch_size], device=device)
            per_sequence = ce.double().mean(dim=1)
            for row, values in enumerate((per_sequence, per_sequence ** 2, torch.ones_like(per_sequence))):
                sums[row].index_add_(0, subset, values)
            by_position += ce.double().sum(dim=0)
    if world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(by_position)
    model.train()
    mean, mean_square, n = sums[0].sum() / sums[2].sum(), sums[1].sum() / sums[2].sum(), sums[2].sum()
    standard_error = ((mean_square - mean ** 2).clamp(min=0) / n).sqrt()  # the sequences have equal lengths
    record = dict(val_loss=mean.item(), val_loss_se=standard_error.item(),
                  in_context_score=in_context_score((by_position / sums[2].sum()).tolist()))
    if names:
        record['val_loss_subsets'] = {name: (sums[0, i] / sums[2, i]).item() for i, name in enumerate(names)
                                      if sums[2, i] > 0}
    return record

# ----------------------------------------------------------------------------------------------------------
# In-context learning: what a model gains from its context (distillation in pre-training can weaken it, arXiv
# 2509.01649). Both scores come from the model's forward alone: any train.py checkpoint or transformers model


def in_context_score(loss_by_position, early=0.08, late=0.78, window=1 / 32):
    """Olsson et al. (2022)'s in-context learning score: the mean CE at a late position of the sequence minus that at
    an early one (tokens 100 and 10 of 128 by default; they took 500 and 50), each averaged over a window of
    positions around it (a single position of a few hundred val sequences is too noisy to compare runs). Negative:
    later tokens, with more context, are predicted better; the more negative, the more the model uses its
    context. loss_by_position: the mean CE of the token predicted at each position (position t predicts t + 1)."""
    length = len(loss_by_position)
    half = max(0, round(window * length / 2))

    def around(fraction):
        centre = min(length - 1, round(fraction * length))
        return float(np.mean(loss_by_position[max(0, centre - half):centre + half + 1]))
    return around(late) - around(early)


INDUCTION_LENGTH = 64  # tokens per copy of the induction score's sequences


@torch.no_grad()
def induction_losses(model, vocab_size, *, sequences=16, length=None, seed=0, batch_size=16, autocast=None):
    """{'induction_loss': the induction score, the mean CE on the second copy of a sequence of uniformly random tokens
    repeated twice, 'first_copy_loss': the same on the first copy}, over `sequences` of them (seeded: the same tokens
    for every model of this vocabulary). Nothing but the first copy predicts the second, so a model that copies from
    its context (induction heads, Olsson et al. 2022) drives the induction loss toward 0, and one that does not stays
    at its first copy's loss: near log(vocab_size) untrained, above it once trained on text, whose token frequencies
    random tokens do not follow. The first token of each copy is left out (no context predicts it), so both
    average the same positions of a copy. length: tokens per copy, 64 by default (half the block where it is
    shorter): a transformers model's block of 8K tokens would make it a long forward for nothing more."""
    length = length or min(INDUCTION_LENGTH, model.config.block_size // 2)
    tokens = torch.randint(0, vocab_size, (sequences, length), generator=torch.Generator().manual_seed(seed))
    repeated = torch.cat([tokens, tokens], dim=1).to(next(model.parameters()).device)
    was_training, totals = model.training, torch.zeros(2, dtype=torch.float64)
    model.eval()
    for first in range(0, sequences, batch_size):
        x = repeated[first:first + batch_size]
        with autocast or nullcontext():
            ce, _ = model(x[:, :-1], x[:, 1:], reduction='none')
        # position t predicts t + 1: each copy from its second token on
        totals += torch.stack([ce[:, :length - 1].double().sum(), ce[:, length:].double().sum()]).cpu()
    model.train(was_training)
    first_copy, second_copy = (totals / (sequences * (length - 1))).tolist()
    return dict(induction_loss=second_copy, first_copy_loss=first_copy)


def induction_loss(model, vocab_size, **settings):
    """induction_losses' induction score alone."""
    return induction_losses(model, vocab_size, **settings)['induction_loss']

# ----------------------------------------------------------------------------------------------------------
# The task files: read and checked once, apart from the scoring


@dataclass
class Example:
    context: str   # the text before the answer
    endings: list  # the candidate answers, each scored as " " + ending after the context (one for a cloze)
    label: int     # index of the right ending


@dataclass
class Task:
    name: str           # 'hellaswag' or 'lambada': says how it is scored
    path: str
    examples: list
    fewshot_path: str = ''
    fewshot: list = field(default_factory=list)  # the examples that --shots draws from


def hellaswag_example(where, obj):
    for key in ('ctx', 'endings', 'label'):
        if key not in obj:
            raise InputError(f'{where}: no "{key}" (a HellaSwag line has "ctx", "endings" and "label")')
    ctx, endings, label = obj['ctx'], obj['endings'], obj['label']
    if not isinstance(ctx, str):
        raise InputError(f'{where}: "ctx" must be a string')
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise InputError(f'{where}: "endings" must be a list of at least 2 strings')
    for i, ending in enumerate(endings):
        if not ending.strip():
            raise InputError(f'{where}: ending {i} is empty')
    if isinstance(label, str) and label.isdigit():  # Hugging Face's copy stores it as a string
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise InputError(f'{where}: "label" {label!r} is not an index of the {len(endings)} endings')
    return Example(ctx, endings, label)


def lambada_example(where, obj):
    text = obj.get('text')
    if not isinstance(text, str):
        raise InputError(f'{where}: no string "text" (a LAMBADA line has "text")')
    if not text.strip():
        raise InputError(f'{where}: empty "text"')
    context, space, word = text.rpartition(' ')  # lm-evaluation-harness: text.split(' ')[-1] is the target
    if not space or not word:
        raise InputError(f'{where}: "text" has no last word after a space to predict')
    return Example(context, [word], 0)


TASKS = {'hellaswag': hellaswag_example, 'lambada': lambada_example}


def parse_task_list(spec):
    """'hellaswag:PATH,lambada:PATH' -> [('hellaswag', PATH), ('lambada', PATH)] (paths without commas)."""
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(','))):
        name, colon, path = item.partition(':')
        if name not in TASKS:
            raise InputError(f"unknown task {name!r} in {item!r}: the tasks are {', '.join(TASKS)} (give TASK:PATH)")
        if not colon or not path:
            raise InputError(f"{item!r}: give TASK:PATH, e.g. {name}:{name}.jsonl")
        if name in (n for n, _ in pairs):
            raise InputError(f"task {name!r} is given twice")
        pairs.append((name, path))
    return pairs


def read_examples(name, path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (the {name} task's jsonl)")
    examples = []
    with open(path, encoding='utf-8') as f:
        number = 0
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue  # a blank line is not an example
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise InputError(f"{path}: line {number}: expected a JSON object")
                examples.append(TASKS[name](f"{path}: line {number}", obj))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {number}: not JSON ({e.msg})") from e
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: line {number + 1}: not UTF-8 text") from e
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples


def read_tasks(spec, fewshot_spec=''):
    """The tasks of 'hellaswag:PATH,lambada:PATH', read and checked; fewshot_spec ('hellaswag:PATH,...') names
    the file each task's few-shot examples are drawn from."""
    tasks = [Task(name, path, read_examples(name, path)) for name, path in parse_task_list(spec)]
    if not tasks:
        raise InputError("no task given: give TASK:PATH, e.g. hellaswag:hellaswag_val.jsonl")
    by_name = {task.name: task for task in tasks}
    for name, path in parse_task_list(fewshot_spec):
        if name not in by_name:
            raise InputError(f"a few-shot file is given for {name!r}, which is not evaluated")
        task = by_name[name]
        if os.path.isfile(path) and os.path.samefile(path, task.path):
            raise InputError(f"{path}: the few-shot examples must come from another file than the {name} examples")
        task.fewshot_path, task.fewshot = path, read_examples(name, path)
    return tasks

# ----------------------------------------------------------------------------------------------------------
# Prompts and token rows


def fewshot_prefix(task, index, shots, seed):
    """The solved examples put before example `index`: each context + " " + its right ending, each followed by
    a blank line (lm-evaluation-harness's fewshot_delimiter "\\n\\n"). Drawn without replacement by a rng of
    their own per example, so a prompt depends on neither the number of ranks nor the other examples."""
    if shots == 0:
        return ''
    rng = random.Random(f"{seed}:{task.name}:{index}")  # a str seed goes through sha512: the same in every process
    return ''.join(f"{ex.context} {ex.endings[ex.label]}\n\n" for ex in rng.sample(task.fewshot, shots))


def prompt(task, index, shots, seed):
    """The full context of example `index`: its few-shot prefix, then its own context."""
    return fewshot_prefix(task, index, shots, seed) + task.examples[index].context


def example_rows(task, index, shots, seed, block_size, tok):
    """The token rows of one example, one per ending: context tokens then continuation tokens, the two
    encoded apart by tok (tokenizer.py) as llm.c does (the same tokens as encoding them together, with GPT-2's
    BPE and the byte-level BPEs of Llama 3, Qwen, SmolLM2 and Pythia, which split before " " + a word). A row
    longer than block_size + 1 is cut from the left, the continuation kept whole: the model reads all but the
    last token, as in lm-evaluation-harness. Returns the rows, as (tokens, number of continuation tokens
    scored), and whether any was cut."""
    context = tok.encode(prompt(task, index, shots, seed)) or [tok.eot]  # as lm-eval: nothing -> EOT
    rows, truncated = [], False
    for ending in task.examples[index].endings:
        continuation = tok.encode(' ' + ending)
        tokens = context + continuation
        truncated |= len(tokens) > block_size + 1
        # an ending longer than the block itself (a tiny model) is scored on its last block_size tokens, which
        # keeps every rank going (an error on one rank would leave the others waiting in the all-reduce)
        rows.append((tokens[-(block_size + 1):], min(len(continuation), block_size)))
    return rows, truncated

# ----------------------------------------------------------------------------------------------------------
# Scoring


GROUP = 1024  # examples tokenized and sorted by length at a time: bounded memory for any file size


@torch.no_grad()
def continuation_scores(model, rows, batch_size, autocast=None):
    """Per row (tokens, n): the summed log-prob of its last n tokens given the ones before, and whether greedy
    decoding reproduces all n (lm-evaluation-harness's is_greedy). Rows are batched longest first (less
    padding) and right-padded, which a causal model never sees. The LM head runs only at the positions that
    predict a continuation token: no (B, T, vocab) logits."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)
    scores = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        idx = torch.zeros(len(batch), len(rows[batch[0]][0]) - 1, dtype=torch.long)
        b_index, t_index, targets = [], [], []
        for b, i in enumerate(batch):
            tokens, n = rows[i]
            idx[b, :len(tokens) - 1] = torch.tensor(tokens[:-1])
            b_index += [b] * n
            t_index += range(len(tokens) - 1 - n, len(tokens) - 1)  # position t predicts token t + 1
            targets += tokens[-n:]
        with autocast or nullcontext():  # the head inside the forward: under fsdp its weight is whole there only
            logits = model(idx.to(device), logits_at=(torch.tensor(b_index, device=device),
                                                      torch.tensor(t_index, device=device)))
        targets = torch.tensor(targets, device=device)
        logprobs = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=1)
        hits = logits.argmax(dim=1) == targets
        counts = [rows[i][1] for i in batch]
        for i, lp, hit in zip(batch, logprobs.double().cpu().split(counts), hits.cpu().split(counts)):
            scores[i] = (lp.sum().item(), bool(hit.all()))
    return scores


def score_examples(model, task, tok, *, shots, seed, batch_size, rank=0, world_size=1, autocast=None,
                   progress=False):
    """This rank's share of the task's examples (every world_size-th), encoded by tok and scored: per example
    (index, per ending (summed log-prob, continuation tokens, greedy), whether its context was cut)."""
    block_size = model.config.block_size
    mine, scored, start, last_print = range(rank, len(task.examples), world_size), [], time.time(), time.time()
    for first in range(0, len(mine), GROUP):
        indices = mine[first:first + GROUP]
        built = [example_rows(task, i, shots, seed, block_size, tok) for i in indices]
        rows = [row for example, _ in built for row in example]
        scores = iter(continuation_scores(model, rows, batch_size, autocast))
        for i, (example, truncated) in zip(indices, built):
            scored.append((i, [(lp, n, greedy) for (_, n), (lp, greedy) in zip(example, scores)], truncated))
        done = first + len(indices)
        if progress and (time.time() - last_print > 10 or done == len(mine)):
            last_print = time.time()
            print(f"{task.name}: {done:,}/{len(mine):,} examples scored on rank {rank} "
                  f"({last_print - start:.1f} s)", flush=True)
    # a sharded (fsdp) model gathers its weights from every rank in each forward: a rank with fewer batches
    # than another runs empty ones, or the other would wait for it forever
    device = next(model.parameters()).device
    for _ in range(max(forwards(task, r, world_size, batch_size) for r in range(world_size))
                   - forwards(task, rank, world_size, batch_size)):
        model(torch.zeros(1, 1, dtype=torch.long, device=device), logits_at=([0], [0]))
    return scored


def forwards(task, rank, world_size, batch_size):
    """How many forwards score_examples runs on `rank`: its examples in groups of GROUP, each group's rows (one
    per ending) in batches."""
    mine = range(rank, len(task.examples), world_size)
    return sum(-(-sum(len(task.examples[i].endings) for i in mine[first:first + GROUP]) // batch_size)
               for first in range(0, len(mine), GROUP))


# What the multiple-choice scores normalize by. Every ending is scored by the summed log-prob of its tokens
# given the context, the continuation being " " + ending, in both harnesses.
# - acc (both): argmax of that sum.
# - acc_norm, lm-evaluation-harness (lm_eval/api/task.py, ConfigurableTask.process_results, output_type
#   multiple_choice): argmax of the sum divided by the ending's length in characters, len(choice) of the
#   choice as doc_to_choice gives it, without the " " target_delimiter.
# - acc_norm_tokens: llm.c's "acc_norm" (dev/data/hellaswag.py, evaluate()): argmin of the mean per-token loss
#   over the ending's tokens, i.e. argmax of the sum divided by the ending's number of tokens.
# Ties go to the first ending, as numpy's argmax and torch's argmin do there.
# Left apart: lm-evaluation-harness's hellaswag task rewrites the context first (activity_label + ": " +
# ctx_a + " " + ctx_b.capitalize(), WikiHow's [title] brackets removed: lm_eval/tasks/hellaswag/utils.py);
# we and llm.c score the "ctx" field as it is, so numbers differ from the harness's a little (llm.c's
# docstring: GPT-2 124M, lm-eval acc 0.2892 acc_norm 0.3114, llm.c 0.2859 and 0.2955). And the harness
# encodes context + continuation as one string and splits it at the context's token count, after moving
# the context's trailing spaces into the continuation (HFLM._encode_pair): with GPT-2's BPE the same tokens
# as encoding the two apart unless the context ends in a space, since its pre-tokenizer always splits
# before " " + a word.
MULTIPLE_CHOICE_SUMS = ('examples', 'truncated', 'chance', 'acc', 'acc_norm', 'acc_norm_tokens')
CLOZE_SUMS = ('examples', 'truncated', 'chance', 'acc', 'logprob')


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)  # the first of ties


def example_sums(task, scored):
    """The sums over this rank's examples that the scores are made of (all-reduced across ranks)."""
    sums = dict.fromkeys(CLOZE_SUMS if task.name == 'lambada' else MULTIPLE_CHOICE_SUMS, 0.0)
    for index, endings, truncated in scored:
        example, logprobs = task.examples[index], [lp for lp, _, _ in endings]
        sums['examples'] += 1
        sums['truncated'] += truncated
        if task.name == 'lambada':  # lm-evaluation-harness's loglikelihood task: acc = is_greedy
            sums['acc'] += endings[0][2]
            sums['logprob'] += logprobs[0]
            continue
        sums['chance'] += 1 / len(endings)
        sums['acc'] += argmax(logprobs) == example.label
        sums['acc_norm'] += argmax([lp / len(e) for lp, e in zip(logprobs, example.endings)]) == example.label
        sums['acc_norm_tokens'] += argmax([lp / n for lp, n, _ in endings]) == example.label
    return sums


def task_scores(name, sums):
    n = sums['examples']
    scores = dict(acc=sums['acc'] / n)
    if name == 'lambada':
        # lm-evaluation-harness's perplexity aggregation: exp(-mean over examples of the target's log-prob)
        scores['ppl'] = math.exp(-sums['logprob'] / n) if -sums['logprob'] / n < 709 else math.inf
    else:
        scores.update(acc_norm=sums['acc_norm'] / n, acc_norm_tokens=sums['acc_norm_tokens'] / n)
    return dict(scores, chance=sums['chance'] / n, examples=int(n), truncated=int(sums['truncated']))


def check_shots(tasks, shots):
    if shots < 0:
        raise InputError(f"shots must be >= 0, got {shots}")
    for task in tasks:
        if shots and len(task.fewshot) < shots:
            raise InputError(f"{shots} shots of {task.name} need a few-shot file of at least {shots} examples: " +
                             (f"{task.fewshot_path} has {len(task.fewshot)}" if task.fewshot_path else
                              f"give --fewshot_file {task.name}:PATH"))


@torch.no_grad()
def evaluate_tasks(model, tasks, tok, *, shots=0, seed=1234, batch_size=16, rank=0, world_size=1, autocast=None,
                   progress=False):
    """Score `model` (an LM, not its DDP or compiled wrapper) on `tasks` (of read_tasks), their text encoded by tok
    (the model's tokenizer: tokenizer.py), on every rank at once
    under torch.distributed, each rank on every world_size-th example. Returns, the same on every rank,
    {task: {'acc', 'acc_norm', 'acc_norm_tokens' (multiple choice) or 'acc', 'ppl' (cloze), 'chance',
    'examples', 'truncated'}}. The model is left in the mode it was found in (train or eval)."""
    check_shots(tasks, shots)
    was_training = model.training
    model.eval()
    try:
        results = {}
        for task in tasks:
            scored = score_examples(model, task, tok, shots=shots, seed=seed, batch_size=batch_size, rank=rank,
                                    world_size=world_size, autocast=autocast, progress=progress)
            sums = example_sums(task, scored)
            if world_size > 1:
                total = torch.tensor(list(sums.values()), dtype=torch.float64, device=next(model.parameters()).device)
                dist.all_reduce(total)
                sums = dict(zip(sums, total.tolist()))
            results[task.name] = task_scores(task.name, sums)
        return results
    finally:
        model.train(was_training)

# ----------------------------------------------------------------------------------------------------------
# CLI


def result_line(name, scores):
    if name == 'lambada':
        line = f"acc {scores['acc']:.4f} ppl {scores['ppl']:.2f} (chance ~0)"
    else:
        line = (f"acc {scores['acc']:.4f} acc_norm {scores['acc_norm']:.4f} acc_norm_tokens "
                f"{scores['acc_norm_tokens']:.4f} (chance {scores['chance']:.4g})")
    return (f"{name}: {line} over {scores['examples']:,} examples ({scores['truncated']:,} contexts cut from the "
            f"left to fit the block size)")


def main(args):
    # bad input fails before anything starts
    tasks = read_tasks(','.join(args.task), ','.join(args.fewshot_file)) if args.task else []
    check_shots(tasks, args.shots)
    tok = salt.model_tokenizer(args.ckpt) if tasks else None
    if tasks and tok is None:
        raise InputError(f"{args.ckpt}: no tokenizer files beside the model, so the tasks' text cannot be encoded")
    val_data = TokenSequences(args.data_dir, 'val', args.block_size) if args.data_dir else None
    distributed, rank, world_size, device = compute_init(args.device)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.startswith('cuda') else None
    if val_data:  # data in the model's vocabulary, in sequences it was made for: checked as a teacher's
        model = salt.load_teacher(args.ckpt, device, tokenizer.data_record(args.data_dir), args.block_size)
    else:
        model = salt.load_model(args.ckpt, device)
    if rank == 0:
        print(f"{args.ckpt}: block_size {model.config.block_size}, " +
              (f"{args.shots}-shot, seed {args.seed}, " if tasks else "") + f"{world_size} rank(s) on {device}",
              flush=True)
    ranks = dict(batch_size=args.batch_size, rank=rank, world_size=world_size, autocast=autocast)
    results = {'val': val_loss(model, val_data, val_set(val_data, args.val_sequences or len(val_data)), **ranks)
               } if val_data else {}
    vocab_size = model.config.vocab_size  # every rank the same few sequences
    results['induction'] = dict(uniform_guess=math.log(vocab_size), **induction_losses(
        model, vocab_size, batch_size=args.batch_size, autocast=autocast))
    results.update(evaluate_tasks(model, tasks, tok, shots=args.shots, seed=args.seed, progress=rank == 0,
                                  **ranks) if tasks else {})
    if rank == 0:
        if val_data:
            print(f"val loss {results['val']['val_loss']:.4f} (standard error {results['val']['val_loss_se']:.4f}) on "
                  f"{min(len(val_data), args.val_sequences or len(val_data)):,} val sequences of {args.block_size} "
                  f"tokens of {args.data_dir}; in-context score {results['val']['in_context_score']:+.4f}")
        induction = results['induction']
        print(f"induction loss {induction['induction_loss']:.4f}, on the first copy {induction['first_copy_loss']:.4f} "
              f"(a uniform guess: {induction['uniform_guess']:.4f}; a model that copies: 0 on the second copy)")
        for name, scores in results.items():
            if name not in ('val', 'induction'):
                print(result_line(name, scores))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            write_json(args.out, dict(
                ckpt=args.ckpt, shots=args.shots, seed=args.seed, batch_size=args.batch_size, world_size=world_size,
                data_dir=args.data_dir or None, block_size=args.block_size if val_data else None,
                device=torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu',
                autocast='bfloat16' if autocast else 'none',
                files={t.name: dict(path=t.path, fewshot_file=t.fewshot_path or None) for t in tasks},
                results=results))
            print(f"wrote {args.out}")
    end_job(distributed)


if __name__ == '__main__':
    report_input_errors()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', required=True,
                        help="a train.py checkpoint, a transformers model's directory, or a GPT-2 name ('gpt2', ...)")
    parser.add_argument('--task', action='append', default=[], help='TASK:PATH (hellaswag or lambada), repeatable')
    parser.add_argument('--data_dir', default='', help="the val loss on this data's val split (the model's tokenizer)")
    parser.add_argument('--block_size', type=int, default=0, help='with --data_dir: tokens per val sequence')
    parser.add_argument('--val_sequences', type=int, default=0,
                        help='with --data_dir: this many sequences spread over the val split (0 = all)')
    parser.add_argument('--shots', type=int, default=0, help='solved examples put before each context')
    parser.add_argument('--fewshot_file', action='append', default=[],
                        help="TASK:PATH, the file a task's few-shot examples are drawn from (repeatable)")
    parser.add_argument('--seed', type=int, default=1234, help='seeds the draw of the few-shot examples')
    parser.add_argument('--batch_size', type=int, default=16, help='rows (context + one ending) per forward pass')
    parser.add_argument('--device', default='', help="'cpu', 'cuda', ... (default: cuda if available)")
    parser.add_argument('--out', default='', help='write the scores and settings to this JSON file')
    args = parser.parse_args()
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.data_dir and args.block_size < 1 or args.val_sequences < 0:
        parser.error(f"--data_dir needs --block_size >= 1 (got {args.block_size}) and --val_sequences >= 0")
    main(args)
