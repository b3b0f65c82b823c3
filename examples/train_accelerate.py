"""Fine-tune a HeadMap adapter in a plain PyTorch loop under 🤗 Accelerate (data-parallel on any number of processes).

    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --expect-processes 2  # 2 CPU or GPU
    accelerate launch --num_processes 4 examples/train_accelerate.py --model PATH_OR_ID --circuit circuit.json
    python examples/train_accelerate.py                              # one process works too

On a machine without a GPU, `--multi_gpu` (accelerate's torchrun launcher) starts CPU processes with a gloo process
group; `torchrun --nproc_per_node 2 examples/train_accelerate.py` does the same. Note that
`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is installed (accelerate launches
several CPU processes only through mpirun); `--expect-processes 2` turns that into an error instead of a silent
single-process run.

Every process ends with the same adapter weights (DDP averages the gradients of the HeadMap maps, the only trainable
parameters); the script checks this by gathering a SHA-256 of each process's adapter weights and exits non-zero if
any differ.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
from pathlib import Path

import torch
from _example_utils import add_common_arguments, check_only_headmap_trainable, eval_loss, load_base, target_heads
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader

import headmap_peft  # noqa: F401  (registers the HeadMap tuner with PEFT)
from headmap_peft import HeadMapConfig
from headmap_peft.data import PromptTargetCollator, encode_prompt_target
from headmap_peft.demo import task_splits


def adapter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the trainable (adapter) weights, by name, as float32 bytes: equal iff bitwise equal."""
    digest = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, max_steps=60, output_dir="runs/train_accelerate")
    parser.add_argument("--expect-processes", type=int, help="fail unless the launcher started this many processes")
    args = parser.parse_args(argv)

    # accelerate counts torchrun-started processes without a GPU as distributed only when told to use the CPU
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=multi_cpu)
    if args.expect_processes is not None and accelerator.num_processes != args.expect_processes:
        print(
            f"expected {args.expect_processes} processes but this is 1 of {accelerator.num_processes}; without MPI "
            "`accelerate launch --cpu` starts one process: use `accelerate launch --multi_gpu --num_processes N` "
            "or `torchrun --nproc_per_node N`",
            file=sys.stderr,
        )
        return 2
    set_seed(args.seed)  # the same adapter init on every process (DDP also broadcasts rank 0's weights)
    args.no_progress |= not accelerator.is_main_process
    log = accelerator.print  # prints on the main process only

    with accelerator.main_process_first():  # the first process builds the demo model (if needed), the others wait
        model, tokenizer, _ = load_base(args)
    splits = task_splits(seed=args.seed)
    # every process gets the same circuit: locate_circuit shards the calibration data across processes and sums
    heads = target_heads(args, model, tokenizer, splits["train"], log)

    model = get_peft_model(model, HeadMapConfig(target_heads=heads, r=args.rank, task_type="CAUSAL_LM"))
    log(f"{check_only_headmap_trainable(model):,} trainable parameters (HeadMap maps only)")
    before = eval_loss(model, tokenizer, splits["eval"]) if accelerator.is_main_process else float("nan")

    train = splits["train"].map(
        lambda r: encode_prompt_target(tokenizer, r["prompt"], r["target"]),
        remove_columns=splits["train"].column_names,
    )
    # batch_size is per process: the global batch is batch_size * num_processes
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=PromptTargetCollator(tokenizer))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # as many epochs as max_steps needs
    for step, batch in zip(range(1, args.max_steps + 1), batches):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % max(1, args.max_steps // 5) == 0 or step == args.max_steps:
            mean_loss = accelerator.gather(loss.detach()[None]).mean().item()
            log(f"step {step}/{args.max_steps}: train loss {mean_loss:.4f} (mean over {accelerator.num_processes})")

    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    digest = adapter_digest(model)
    print(f"rank {accelerator.process_index}: adapter sha256 {digest}", flush=True)
    digests = gather_object([digest])
    agree = len(set(digests)) == 1

    adapter_dir = Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process:
        after = eval_loss(model, tokenizer, splits["eval"])
        print("\n| processes | eval loss before | eval loss after | adapter weights identical on all ranks |")
        print("|---:|---:|---:|---|")
        print(f"| {accelerator.num_processes} | {before:.4f} | {after:.4f} | {'yes' if agree else 'NO'} |")
        print(f"adapter: {adapter_dir}")
    accelerator.end_training()
    if not agree:
        print(f"FAILED: the processes ended with different adapter weights: {digests}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
