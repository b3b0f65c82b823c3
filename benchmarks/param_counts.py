"""Trainable parameters of HeadMap vs LoRA on a Llama-7B-shaped model, counted on the meta device (no weights).

python benchmarks/param_counts.py [--heads-per-layer 8] [--r 8]
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import headmap_peft  # noqa: F401
from headmap_peft import HeadMapConfig

SHAPES = {
    "LLaMA-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "LLaMA3-8B": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
    "LLaMA-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count(shape: dict, config) -> tuple[int, int]:
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32000, **shape))
        total = sum(p.numel() for p in base.parameters())
        return trainable(get_peft_model(base, config)), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads-per-layer", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()
    print("| model | method | trainable params | % of base |")
    print("|---|---|---:|---:|")
    for name, shape in SHAPES.items():
        layers = shape["num_hidden_layers"]
        circuit = {layer: list(range(args.heads_per_layer)) for layer in range(layers)}
        methods = {
            f"HeadMap (k={args.heads_per_layer} heads x {layers} layers, r={args.r})": HeadMapConfig(
                target_heads=circuit, r=args.r
            ),
            f"LoRA (r={args.r}, q_proj+v_proj)": LoraConfig(r=args.r, target_modules=["q_proj", "v_proj"]),
        }
        for label, config in methods.items():
            n, total = count(shape, config)
            print(f"| {name} | {label} | {n:,} | {100 * n / total:.4f} |")


if __name__ == "__main__":
    main()
