"""Fine-tune a HeadMap adapter with TRL's SFTTrainer: pass `peft_config=HeadMapConfig(...)` as you would a LoraConfig.

    python examples/train_trl_sft.py                                  # embedded demo model, located circuit
    python examples/train_trl_sft.py --model PATH_OR_ID --circuit circuit.json --max-steps 100

TRL takes prompt-completion datasets (columns "prompt" and "completion"); it tokenises them, appends EOS to the
completion and, for this format, puts the loss on the completion tokens only (`completion_only_loss`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _example_utils import add_common_arguments, check_only_headmap_trainable, eval_loss, load_base, target_heads
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

import headmap_peft  # registers the HeadMap tuner with PEFT
from headmap_peft import HeadMapConfig
from headmap_peft.demo import task_splits
from headmap_peft.hub import update_model_card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, max_steps=60, output_dir="runs/train_trl_sft")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model, tokenizer, _ = load_base(args)
    splits = task_splits(seed=args.seed)
    heads = target_heads(args, model, tokenizer, splits["train"])
    before = eval_loss(model, tokenizer, splits["eval"])

    # TRL's prompt-completion format
    def to_prompt_completion(split):
        return split.rename_column("target", "completion").select_columns(["prompt", "completion"])

    sft_args = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.max_steps // 5),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.no_progress,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # TRL's default bf16 needs a GPU
    )
    config = HeadMapConfig(target_heads=heads, r=args.rank, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=to_prompt_completion(splits["train"]),
        processing_class=tokenizer,
        peft_config=config,  # SFTTrainer calls get_peft_model(model, config)
    )

    peft_model = trainer.model
    assert isinstance(peft_model, PeftModel), type(peft_model)
    assert peft_model.peft_config["default"].peft_type == headmap_peft.HEADMAP
    trainable = check_only_headmap_trainable(peft_model)
    print(f"SFTTrainer wrapped the model in a HeadMap adapter: {trainable:,} trainable parameters, all HeadMap maps")

    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = sum(not torch.equal(start[n], p) for n, p in peft_model.named_parameters() if p.requires_grad)
    after = eval_loss(peft_model, tokenizer, splits["eval"])

    adapter_dir = Path(args.output_dir) / "adapter"
    trainer.save_model(str(adapter_dir))  # PeftModel.save_pretrained: adapter_config.json + adapter weights
    update_model_card(str(adapter_dir), config)

    print("\n| eval loss before | eval loss after | HeadMap tensors changed |")
    print("|---:|---:|---:|")
    print(f"| {before:.4f} | {after:.4f} | {moved} of {len(start)} |")
    print(f"adapter: {adapter_dir}")
    if moved != len(start):
        print("FAILED: some HeadMap maps did not train", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
