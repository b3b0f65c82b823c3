"""Inference speed: the base model vs HeadMap unmerged vs HeadMap merged (merge_and_unload), forward and generation.

    python benchmarks/inference.py                           # CUDA if available, else CPU
    python benchmarks/inference.py --device cpu --repeats 5 --new-tokens 32
    python benchmarks/inference.py --device cuda --dtype bfloat16 --batch 16 --seq 512

Forward: tokens/s of one forward pass over `--batch` x `--seq` tokens (no KV cache). Generation: greedy decoding
of exactly `--new-tokens` tokens per sequence after a `--prompt` token prompt (KV cache on); tokens/s counts the new
tokens. Each figure is the median of `--repeats` runs after one warmup run; the three models take turns in every
repeat, so a busy machine slows all of them alike. The HeadMap maps start random (`init_weights=False`), and the
table also reports how far the merged model's logits are from the unmerged one's.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from _bench_utils import (
    add_model_arguments,
    build_model,
    circuit,
    machine,
    markdown_table,
    median,
    model_line,
    random_batch,
    setup,
    timed,
)
from peft import get_peft_model

import headmap_peft  # noqa: F401  (registers the HeadMap tuner)
from headmap_peft import HeadMapConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens for generation")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    args = parser.parse_args(argv)
    setup(args)

    base = build_model(args)
    config = HeadMapConfig(target_heads=circuit(args), r=args.rank, init_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    unmerged = get_peft_model(copy.deepcopy(base), config).eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    models = {"base": base, "HeadMap unmerged": unmerged, "HeadMap merged": merged}

    batch = random_batch(args)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    prompt = {k: v[:, : args.prompt] for k, v in inputs.items()}
    generation = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )

    with torch.inference_mode():
        logits = {name: m(**inputs, use_cache=False).logits.float() for name, m in models.items()}
        texts = {name: m.generate(**prompt, **generation) for name, m in models.items()}
        forward_s: dict[str, list[float]] = {name: [] for name in models}
        generate_s: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, m in models.items():
                forward_s[name].append(timed(lambda m=m: m(**inputs, use_cache=False), args.device))
                generate_s[name].append(timed(lambda m=m: m.generate(**prompt, **generation), args.device))

    assert all(t.shape[1] == args.prompt + args.new_tokens for t in texts.values())
    rows = []
    for name in models:
        diff = (logits[name] - logits["HeadMap unmerged"]).abs().max().item()
        same = torch.equal(texts[name], texts["HeadMap unmerged"])
        rows.append(
            [
                name,
                f"{args.batch * args.seq / median(forward_s[name]):,.0f}",
                f"{args.batch * args.new_tokens / median(generate_s[name]):,.1f}",
                f"{diff:.1e}",
                "yes" if same else "no",
            ]
        )
    print(f"Machine: {machine(args.device)}")
    print(f"Model: {model_line(args, lora=False)}")
    print(
        f"Forward: {args.batch} x {args.seq} tokens, no cache. Generation: greedy, {args.batch} x {args.new_tokens} "
        f"new tokens after {args.prompt} prompt tokens. Median of {args.repeats} runs (models interleaved).\n"
    )
    header = [
        "model",
        "forward tokens/s",
        "generation tokens/s",
        "max abs logit diff vs unmerged",
        "same greedy tokens as unmerged",
    ]
    print(markdown_table(header, rows, align="lrrrl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
