"""
Sample from a trained model, as nanoGPT's sample.py does:

  python sample.py --ckpt=out/demo/baseline/ckpt --start="import os" --num_samples=3 --max_new_tokens=100
  python sample.py --ckpt=gpt2 --start=FILE:prompt.txt --temperature=0.8 --top_k=200 --seed=1337

--ckpt is a train.py checkpoint, a transformers model's directory or a GPT-2 name ('gpt2', ...), with its own
tokenizer (a checkpoint's is its data's: tokenizer.py). The prompt is --start, or the text of a file with
--start=FILE:path; empty (the default), a sample starts a new document (the end-of-text token that precedes
every document in training). Each sample is printed, prompt included, followed by a line of dashes.
The same seed gives the same samples on a CPU.
"""
import argparse
import os

import torch

import salt
from common import InputError, report_input_errors


def start_text(start):
    """--start: the text itself, or FILE:path for the text of a file."""
    if not start.startswith('FILE:'):
        return start
    path = start[len('FILE:'):]
    if not os.path.isfile(path):
        raise InputError(f"--start={start}: {path} does not exist")
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"--start={start}: {path} is not UTF-8 text") from e


def generate_samples(model, start_ids, *, num_samples, max_new_tokens, temperature, top_k, seed):
    """(num_samples, len(start_ids) + max_new_tokens) token ids: the prompt and its continuations, all
    samples drawn in one batch from a generator seeded with `seed`."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # seeds the CUDA generators too
    idx = torch.tensor(start_ids, dtype=torch.long, device=device)[None].repeat(num_samples, 1)
    return model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)


def main(args):
    for name, low in (('num_samples', 1), ('max_new_tokens', 0), ('top_k', 1)):
        if getattr(args, name) < low:
            raise InputError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    if not args.temperature > 0:  # 0 would divide by zero; greedy decoding is top_k=1
        raise InputError(f"--temperature must be > 0, got {args.temperature} (for greedy decoding use --top_k=1)")
    tok = salt.model_tokenizer(args.ckpt)
    if tok is None:
        raise InputError(f"{args.ckpt}: no tokenizer files beside the model, so its samples cannot be decoded")
    text = start_text(args.start)
    start_ids = tok.encode(text) if text else [tok.eot]
    model = salt.load_model(args.ckpt, args.device)
    samples = generate_samples(model, start_ids, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for ids in samples.tolist():
        print(tok.decode(ids if text else ids[1:]))  # the start-of-document token is not part of the text
        print('---------------')


if __name__ == '__main__':
    report_input_errors()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', required=True,
                        help="a train.py checkpoint, a transformers model's directory, or a GPT-2 name ('gpt2', ...)")
    parser.add_argument('--start', default='', help='the prompt, or FILE:path (default: a new document)')
    parser.add_argument('--num_samples', type=int, default=10, help='samples to draw')
    parser.add_argument('--max_new_tokens', type=int, default=500, help='tokens generated per sample')
    parser.add_argument('--temperature', type=float, default=0.8, help='< 1 sharper, > 1 more random')
    parser.add_argument('--top_k', type=int, default=200, help='sample among the k most likely tokens only')
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    main(parser.parse_args())
