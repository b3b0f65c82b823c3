"""Fine-tune a HeadMap adapter with transformers.Trainer on a datasets.Dataset, save it, reload it.

    python examples/train_trainer.py                                  # embedded demo model, located circuit
    python examples/train_trainer.py --model PATH_OR_ID --target-heads '{"1": [0, 2]}' --max-steps 100

The HeadMap part is two lines: `import headmap_peft` and `get_peft_model(model, HeadMapConfig(...))`; the rest is an
ordinary Trainer script. Eval loss is the mean cross-entropy of the target tokens of the held-out questions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _example_utils import add_common_arguments, check_only_headmap_trainable, load_base, target_heads
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import headmap_peft  # noqa: F401  (registers the HeadMap tuner with PEFT)
from headmap_peft import HeadMapConfig
from headmap_peft.data import PromptTargetCollator, encode_prompt_target
from headmap_peft.demo import task_splits
from headmap_peft.hub import update_model_card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, max_steps=60, output_dir="runs/train_trainer")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model, tokenizer, source = load_base(args)
    splits = task_splits(seed=args.seed)
    heads = target_heads(args, model, tokenizer, splits["train"])

    config = HeadMapConfig(target_heads=heads, r=args.rank, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    check_only_headmap_trainable(model)

    def encode(record: dict) -> dict:
        return encode_prompt_target(tokenizer, record["prompt"], record["target"])

    columns = splits["train"].column_names
    train = splits["train"].map(encode, remove_columns=columns)
    evaluation = splits["eval"].map(encode, remove_columns=columns)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.max_steps // 5),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.no_progress,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=PromptTargetCollator(tokenizer),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    adapter_dir = Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter_dir)
    update_model_card(str(adapter_dir), config)  # adds the circuit to the README.md that PEFT wrote

    # reload onto a fresh base: the same outputs as the trained model
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), adapter_dir).eval()
    model.eval()
    batch = PromptTargetCollator(tokenizer)([evaluation[i] for i in range(min(16, len(evaluation)))])
    batch = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        diff = (reloaded.to(model.device)(**batch).logits - model(**batch).logits).abs().max().item()

    print("\n| eval loss before | eval loss after | reloaded vs trained max abs logit diff |")
    print("|---:|---:|---:|")
    print(f"| {before:.4f} | {after:.4f} | {diff:.2e} |")
    print(f"adapter: {adapter_dir}")
    if diff > 1e-5:
        print("FAILED: the reloaded adapter does not reproduce the trained model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
