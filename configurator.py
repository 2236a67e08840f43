"""
train.py's configuration, nanoGPT's way: train.py's globals are the defaults, a config file (plain Python,
e.g. config/demo_student.py) sets any of them, and `--key=value` overrides them, the value read as a Python
literal (or kept as a string):

  python train.py config/demo_student.py --teacher_ckpt=out/demo/slm/ckpt --kd_steps=60

Stricter than nanoGPT's: a key that is not a default, a value of another type than the default's, and a
setting that makes no sense (a learning rate <= 0, kd_weight outside [0, 1], ...) are each refused with one
line naming the key, before anything runs. A default of None ("unset") takes a value of the type OPTIONAL gives:
the model's keys, which override a preset's only when set.
"""
import ast
import os
import re

from common import InputError
from losses import TOKEN_WEIGHTS, divergence
from model import ARCHITECTURES, GPT2_NAMES, PRESETS, GPTConfig

# the keys whose default is None, and the type of their values: the model's shape and switches (model.GPTConfig)
OPTIONAL = {'n_layer': int, 'n_head': int, 'n_embd': int, 'n_kv_head': int, 'positions': str, 'rope_theta': float,
            'norm': str, 'mlp': str, 'mlp_hidden': int, 'bias': bool, 'tie_embeddings': bool}


def configure(defaults, argv):
    """The config: {key: value} of the defaults' plain values (ints, floats, bools, strings; not modules,
    functions or private names), overridden by argv's config files and --key=value arguments, checked."""
    config = {k: v for k, v in defaults.items()
              if not k.startswith('_') and (isinstance(v, (int, float, bool, str)) or k in OPTIONAL)}
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise InputError(f"config file {arg!r} does not exist")
            scope = {}
            exec(open(arg).read(), scope)
            for key, value in scope.items():
                if not key.startswith('__'):
                    set_key(config, key, value, arg)
        else:
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise InputError(f"argument {arg!r}: expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text
            if isinstance(config.get(key), str) and not isinstance(value, str):
                value = text  # a string key's text, also where it reads as numbers: --branch_steps=300,420
            set_key(config, key, value, arg)
    check(config)
    return config


def set_key(config, key, value, source):
    if key not in config:
        raise InputError(f"{source}: unknown config key {key!r} (known: {', '.join(sorted(config))})")
    default = config[key]
    expected = OPTIONAL[key] if default is None and key in OPTIONAL else type(default)
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected and not (default is None and value is None):
        raise InputError(f"{source}: {key}={value!r} is a {type(value).__name__}, expected a {expected.__name__}" +
                         ("" if default is None else f" like the default {default!r}"))
    config[key] = value


def check(c):
    """Refuse, naming the key, settings that make no sense, rather than train on them."""
    steps = c['lr_decay_steps'] or c['max_steps']
    counts = ('batch_size', 'block_size', 'grad_accum_steps', 'max_steps', 'eval_interval', 'eval_batches',
              'log_interval')
    rules = [(key, c[key] >= 1, '>= 1') for key in counts]
    rules += [
        ('ckpt_interval', c['ckpt_interval'] >= 0, '>= 0 (0 = no checkpoint)'),
        ('learning_rate', c['learning_rate'] > 0, '> 0'),
        ('min_lr', 0 <= c['min_lr'] <= c['learning_rate'], 'in [0, learning_rate]'),
        ('lr_decay_steps', c['lr_decay_steps'] >= 0, '>= 0 (0 = max_steps)'),
        ('warmup_steps', 0 <= c['warmup_steps'] <= steps, 'in [0, lr_decay_steps or max_steps]'),
        ('weight_decay', c['weight_decay'] >= 0, '>= 0'), ('beta1', 0 <= c['beta1'] < 1, 'in [0, 1)'),
        ('beta2', 0 <= c['beta2'] < 1, 'in [0, 1)'), ('grad_clip', c['grad_clip'] >= 0, '>= 0 (0 = off)'),
        ('dropout', 0 <= c['dropout'] < 1, 'in [0, 1)'),
        ('train_sequences', c['train_sequences'] >= 0, '>= 0 (0 = all)'),
        ('kd_weight', 0 <= c['kd_weight'] <= 1, 'in [0, 1]'),
        ('teacher_temperature', c['teacher_temperature'] > 0, '> 0'),
        ('kd_token_weight', c['kd_token_weight'] in TOKEN_WEIGHTS,
         f"one of {', '.join(TOKEN_WEIGHTS)} (losses.TOKEN_WEIGHTS)"),
        ('kd_end', c['kd_end'] in ('steps', 'teacher'), "'steps' or 'teacher'"),
        ('select_fraction', 0 <= c['select_fraction'] <= 1, "in [0, 1] (0: what stage 1 reads)"),
        ('role', bool(re.fullmatch(r'\w+', c['role'])), "a word, e.g. 'student' or 'slm'"),
        ('kd_schedule', c['kd_schedule'] in ('constant', 'linear'), "'constant' or 'linear'"),
        ('model_size', c['model_size'] in PRESETS, f"one of {', '.join(PRESETS)}"),
        ('architecture', c['architecture'] in ('',) + tuple(ARCHITECTURES),
         f"'' (model_size's) or one of {', '.join(ARCHITECTURES)}"),
        *[(key, c[key] is None or c[key] >= 1, '>= 1') for key in ('n_layer', 'n_head', 'n_embd', 'n_kv_head')],
        ('init_from', c['init_from'] in ('scratch', 'resume') + GPT2_NAMES,
         f"'scratch', 'resume' or one of {GPT2_NAMES}"),
        # float16 would need loss scaling (a GradScaler); every GPU this is for has bfloat16
        ('dtype', c['dtype'] in ('float32', 'bfloat16'), "'float32' or 'bfloat16' (not float16)"),
        ('parallelism', c['parallelism'] in ('ddp', 'fsdp'), "'ddp' or 'fsdp'"),
        ('compile_scope', c['compile_scope'] in ('blocks', 'model'), "'blocks' or 'model'"),
        ('shard_teacher', not c['shard_teacher'] or c['parallelism'] == 'fsdp',
         "False unless parallelism='fsdp'"),
        ('eval_shots', c['eval_shots'] >= 0 and (c['eval_tasks'] or not c['eval_shots']),
         '>= 0, with eval_tasks'),
        ('skip_nonfinite', c['skip_nonfinite'] >= 0, '>= 0'), ('kd_steps', c['kd_steps'] >= 0, '>= 0'),
        ('ddp_timeout', c['ddp_timeout'] > 0, '> 0'), ('peak_flops', c['peak_flops'] > 0, '> 0'),
        ('lr_schedule', c['lr_schedule'] in ('cosine', 'wsd'), "'cosine' or 'wsd'"),
        ('decay_fraction', 0 <= c['decay_fraction'] <= 1, 'in [0, 1]'),
        ('branch_from', not c['branch_from'] or re.fullmatch(r'.+@\d+', c['branch_from']) and
         int(c['branch_from'].rpartition('@')[2]) < c['max_steps'], "'' or 'DIR@STEP', STEP < max_steps"),
    ]
    for key, ok, expected in rules:
        if not ok:
            raise InputError(f"{key}={c[key]!r}: expected {expected}")
    try:
        divergence(c['kd_loss'])
    except ValueError as error:  # names the divergence or the argument
        raise InputError(str(error)) from error
    branch_steps(c)
    student_config(c)  # the model's keys together: a shape that does not divide, switches that do not go together
    if c['teacher_ckpt'] and not 0 < c['kd_steps'] <= steps:
        raise InputError(f"kd_steps={c['kd_steps']}: with a teacher, 0 < kd_steps <= the run's {steps} steps")
    if c['score_file'] and not c['teacher_ckpt']:
        raise InputError("score_file is set but teacher_ckpt is not: SALT_DS selects data for the KD stage")


def branch_steps(c):
    """The steps of branch_steps ('300,420'), a set of ints >= 1."""
    try:
        steps = {int(step) for step in c['branch_steps'].split(',') if step.strip()}
    except ValueError:
        steps = {0}
    if min(steps, default=1) < 1:
        raise InputError(f"branch_steps={c['branch_steps']!r}: expected steps >= 1 separated by commas, e.g. '300,420'")
    return steps


def student_config(c, **data):
    """The student's GPTConfig of a config: model_size's preset in `architecture` (its own if ''), the model's
    keys that are set overriding it; data: vocab_size, which the data says (meta.json)."""
    config = GPTConfig.from_preset(c['model_size'], architecture=c.get('architecture') or None,
                                   block_size=c['block_size'], dropout=c['dropout'],
                                   **{key: c[key] for key in OPTIONAL if c.get(key) is not None}, **data)
    if config.positions == 'learned' and c.get('rope_theta') is not None:
        raise InputError(f"rope_theta={c['rope_theta']!r} is set but the positions are learned: it is rope's base")
    return config
