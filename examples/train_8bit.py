"""Fine-tune a HeadMap adapter on an 8-bit (bitsandbytes) base, save it, reload it onto a fresh 8-bit base, merge it.

    python examples/train_8bit.py                                     # embedded demo model, located circuit
    python examples/train_8bit.py --model PATH_OR_ID --target-heads '{"1": [0, 2]}' --max-steps 100

bitsandbytes >= 0.45 runs 8-bit layers on the CPU too. The base is quantised while loading (`from_pretrained` with
`BitsAndBytesConfig(load_in_8bit=True)`), so it is loaded from a saved path or hub id. Merging into an 8-bit base
dequantises the attention output projection, adds the HeadMap map and quantises it again (as PEFT's LoRA does), so
the merged model matches the unmerged one up to int8 rounding: the script reports how far.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import warnings
from pathlib import Path

import torch
from _example_utils import add_common_arguments, check_only_headmap_trainable, eval_loss, load_base, target_heads
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import headmap_peft  # noqa: F401  (registers the HeadMap tuner with PEFT)
from headmap_peft import HeadMapConfig
from headmap_peft.data import prompt_target_batches
from headmap_peft.demo import task_splits

# bitsandbytes logs on every 8-bit matmul of a float32 model that it quantises float16 copies of the inputs
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, max_steps=60, output_dir="runs/train_8bit")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    quantization = BitsAndBytesConfig(load_in_8bit=True)
    model, tokenizer, source = load_base(args, quantization_config=quantization)
    print(f"8-bit base from {source}: {model.get_memory_footprint() / 2**20:.1f} MiB")
    splits = task_splits(seed=args.seed)
    heads = target_heads(args, model, tokenizer, splits["train"])  # locating works on the 8-bit model itself
    before = eval_loss(model, tokenizer, splits["eval"])

    # the usual k-bit recipe: freeze the base, keep norms/embeddings in float32, optionally checkpoint activations
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    config = HeadMapConfig(target_heads=heads, r=args.rank, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    check_only_headmap_trainable(model)
    model.print_trainable_parameters()

    # a plain training loop (Trainer / SFTTrainer work the same way on an 8-bit base)
    batches = prompt_target_batches(splits["train"].shuffle(seed=args.seed), tokenizer, args.batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for step, batch in zip(range(1, args.max_steps + 1), itertools.cycle(batches)):
        loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % max(1, args.max_steps // 5) == 0 or step == args.max_steps:
            print(f"step {step}/{args.max_steps}: train loss {loss.item():.4f}")
    model.eval()
    after = eval_loss(model, tokenizer, splits["eval"])

    adapter_dir = Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter_dir)

    # reload onto a fresh 8-bit base, then merge into it
    def fresh_base():
        return AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization).eval()

    (probe,) = prompt_target_batches(list(splits["eval"])[:16], tokenizer, 16)
    probe = {k: v.to(model.device) for k, v in probe.items() if k != "labels"}
    with torch.no_grad():
        trained = model(**probe).logits.float()
        reloaded = PeftModel.from_pretrained(fresh_base(), adapter_dir).eval()
        unmerged = reloaded(**probe).logits.float()
        with warnings.catch_warnings():  # HeadMap warns that merging into an 8-bit base requantises the weight
            warnings.simplefilter("ignore", UserWarning)
            merged_model = reloaded.merge_and_unload()
        merged = merged_model(**probe).logits.float()
        base = fresh_base()(**probe).logits.float()
    reload_diff = (unmerged - trained).abs().max().item()
    merge_diff = (merged - unmerged).abs().max().item()
    adapter_effect = (unmerged - base).abs().max().item()
    real = probe["attention_mask"].bool()
    same_argmax = (merged.argmax(-1) == unmerged.argmax(-1))[real].float().mean().item()

    print(
        "\n| eval loss before | eval loss after | reloaded vs trained | merged vs unmerged | adapter vs base "
        "| merged argmax = unmerged |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {before:.4f} | {after:.4f} | {reload_diff:.2e} | {merge_diff:.2e} | {adapter_effect:.2e} "
        f"| {same_argmax:.1%} |"
    )
    print("(max abs difference of the logits, and argmax agreement, over all positions of 16 eval questions)")
    print(f"adapter: {adapter_dir}")
    if reload_diff > 1e-5:
        print("FAILED: the reloaded adapter does not reproduce the trained model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
