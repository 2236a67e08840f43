"""
Memory per device of a training run, before it starts: what train.py prints, and what chooses ddp or fsdp.

  python memory.py --student salt-2.8b --teacher gpt2-xl --batch_size 8 --block_size 2048 --world_size 8 \\
      --grad_accum_steps 8
  python memory.py --student llama-2.8b --vocab_size 50277 --teacher /models/pythia-1.4b-deduped \\
      --batch_size 8 --block_size 2048 --activation_checkpointing

An estimate from the shapes (model.GPTConfig), not a measurement: fp32 weights, gradients and AdamW's two moments
are 16 bytes per parameter, whole on every ddp rank, 1/world_size of them on an fsdp rank, which also holds the
blocks it is gathering (two at a time: one at work, one prefetched) and the root's embeddings, whole from the
forward to the backward, and, with gradient accumulation in bf16, every gradient whole in fp32 between the
micro-batches of a step. A teacher (transformers directory: its config.json alone, on the meta device) counts its
real parameters in their dtype.
"""
import argparse
import os

import torch

from losses import default_chunk_size
from model import GPT, GPTConfig, PRESETS

GiB, MiB = 2 ** 30, 2 ** 20


def memory_plan(student, teacher, *, tokens, world_size, compute_bytes, checkpointing=False, shard_teacher=False,
                device_type='cuda', grad_accum_steps=1):
    """{what: (bytes under ddp, bytes under fsdp)} per device for training `student` (a GPTConfig) with AdamW on
    micro-batches of `tokens` tokens, grad_accum_steps of them a step, and, in SALT's stage 1, a frozen `teacher`
    (an LM, or None) as it is held, its parameters in their own dtype (a GPT or a transformers model; on the meta
    device, shapes only); compute_bytes: 2 for bf16 autocast, 4 for fp32."""
    n, vocab, hidden = student.n_params(non_embedding=False), student.padded_vocab_size, student.n_embd
    block = sum(student.block_params())
    # the rows a chunk of the loss really has: the kernel's own choice, no more than the micro-batch's tokens
    chunk_rows = min(tokens, default_chunk_size(tokens, hidden, vocab, device_type))
    embeddings = vocab * hidden * (1 if student.tie_embeddings else 2)
    plan = {
        'weights (fp32)': (4 * n, 4 * n / world_size),
        'gradients (fp32)': (4 * n, 4 * n / world_size),
        'AdamW moments (fp32)': (8 * n, 8 * n / world_size),
        # ddp: autocast caches a 16-bit copy of each weight it casts; fsdp gathers 16-bit weights instead
        'weights gathered or cast for compute': (n * compute_bytes if compute_bytes < 4 else 0,
                                                 (2 * block + embeddings) * compute_bytes + 2 * block * 4),
        f'activations ({tokens:,} tokens per micro-batch)': (student.activation_bytes(tokens, compute_bytes,
                                                                                     checkpointing),) * 2,
        # the fused loss: fp32 gradient of the LM head, and a chunk's logits, teacher logits and soft labels
        'loss (LM head)': (vocab * hidden * 4 + 3 * chunk_rows * vocab * 4,) * 2,
    }
    if grad_accum_steps > 1 and compute_bytes < 4:
        # FSDP2 reduces once a step; until then each parameter's bf16 gradient is kept whole, in the fp32 reduce
        # dtype (FSDPParam.unsharded_accumulated_grad): the whole model's fp32 gradients on every rank. ddp adds
        # nothing: its gradients accumulate in its buckets (gradient_as_bucket_view)
        plan['gradients accumulated whole between micro-batches (fp32)'] = (0, 4 * n)
    if teacher is not None:  # shard_teacher: each rank its shard of the blocks, the root whole, two blocks gathered
        whole, root, largest = teacher_bytes(teacher)
        plan['teacher (frozen, stage 1)'] = (whole, root + (whole - root) / world_size + 2 * largest if shard_teacher
                                             else whole)
    plan['total'] = tuple(sum(column) for column in zip(*plan.values()))
    return plan


def teacher_bytes(teacher):
    """(all, outside the blocks, the largest block) bytes of an LM's parameters, each in its own dtype."""
    def size(params):
        return sum(p.numel() * p.element_size() for p in params)
    in_blocks = {id(p) for block in teacher.blocks() for p in block.parameters()}
    return (size(teacher.parameters()), size(p for p in teacher.parameters() if id(p) not in in_blocks),
            max(size(block.parameters()) for block in teacher.blocks()))


def start_memory(student, world_size):
    """(bytes under ddp, bytes under fsdp) per device while train.py builds the student (a GPTConfig), before
    training: a ddp rank holds the whole fp32 weights; an fsdp rank its shard of them (the student is built on the
    meta device and sharded first), and the one parameter init_weights has whole at a time, drawn on the CPU and
    cut on the device, the largest of which is the embedding (or an MLP matrix, or the positions)."""
    n, hidden = student.n_params(non_embedding=False), student.n_embd
    positions = student.block_size if student.positions == 'learned' else 0
    mlp_rows = student.mlp_width * (2 if student.mlp == 'swiglu' else 1)
    largest = max(student.padded_vocab_size, positions, mlp_rows) * hidden
    return 4 * n, 4 * n / world_size + 4 * largest


def memory_table(plan, world_size, device_bytes=None, at_start=None):
    """The plan as a markdown table, in GiB, or in MiB where its total is under 1 GiB (a CPU demo's plan); under
    its total, the peak while the student is built (at_start: start_memory's) and the device's memory, if given."""
    rows = dict(plan)
    if at_start:
        rows['at start, building the student (not in the total)'] = at_start
    if device_bytes:
        rows['device memory'] = (device_bytes, device_bytes)
    unit, name = (GiB, 'GiB') if max(plan['total']) >= GiB else (MiB, 'MiB')
    lines = [f"| per device (estimate) | ddp | fsdp over {world_size} |", "|---|---|---|"]
    lines += [f"| {what} | {ddp / unit:.1f} {name} | {fsdp / unit:.1f} {name} |" for what, (ddp, fsdp) in rows.items()]
    return "\n".join(lines)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--student', required=True, choices=PRESETS)
    parser.add_argument('--vocab_size', type=int, default=50257, help="the data's vocabulary (meta.json's)")
    parser.add_argument('--teacher', help="SALT's stage 1: a frozen teacher, a preset or a transformers model's "
                                          "directory (its config.json: shapes only, no weights read)")
    parser.add_argument('--batch_size', type=int, required=True, help='sequences per micro-batch per device')
    parser.add_argument('--block_size', type=int, required=True)
    parser.add_argument('--grad_accum_steps', type=int, default=1, help='micro-batches per step')
    parser.add_argument('--world_size', type=int, default=8)
    parser.add_argument('--dtype', choices=['bfloat16', 'float32'], default='bfloat16')
    parser.add_argument('--activation_checkpointing', action='store_true')
    parser.add_argument('--shard_teacher', action='store_true')
    args = parser.parse_args()
    for name in ('batch_size', 'block_size', 'world_size', 'vocab_size', 'grad_accum_steps'):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.teacher and args.teacher not in PRESETS and not os.path.isfile(os.path.join(args.teacher, 'config.json')):
        parser.error(f"--teacher {args.teacher}: neither a preset ({', '.join(PRESETS)}) nor a transformers directory")
    student = GPTConfig.from_preset(args.student, block_size=args.block_size, vocab_size=args.vocab_size)
    dtype, teacher = getattr(torch, args.dtype), None
    if args.teacher in PRESETS:
        teacher = GPT(GPTConfig.from_preset(args.teacher, block_size=args.block_size, vocab_size=args.vocab_size),
                      device='meta').to(dtype)
    elif args.teacher:
        import hf_model
        teacher = hf_model.shapes(args.teacher, dtype)
    plan = memory_plan(student, teacher, tokens=args.batch_size * args.block_size, world_size=args.world_size,
                       compute_bytes=2 if args.dtype == 'bfloat16' else 4, checkpointing=args.activation_checkpointing,
                       shard_teacher=args.shard_teacher, grad_accum_steps=args.grad_accum_steps)
    print(memory_table(plan, args.world_size, at_start=start_memory(student, args.world_size)))
