"""Shared by the benchmarks: a Llama-shaped model from a config, the machine description, timing, markdown tables."""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch

# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in every get_peft_model (LoRA too)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model shape, batch and device options both benchmarks take."""
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (fewer: grouped-query attention)")
    parser.add_argument("--intermediate", type=int, default=1376, help="MLP width")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads-per-layer", type=int, default=2, help="HeadMap circuit: heads per layer (k)")
    parser.add_argument("--rank", type=int, default=8, help="r of HeadMap and of LoRA")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)


def setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA GPU; use --device cpu")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM of the requested shape (seeded), on the device, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, 2 * args.seq),
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    return model.eval()


def circuit(args: argparse.Namespace) -> dict[int, list[int]]:
    """A fixed pseudo-random circuit: `heads_per_layer` heads in every layer (so gradients reach every layer)."""
    rng = random.Random(args.seed)
    return {layer: sorted(rng.sample(range(args.heads), args.heads_per_layer)) for layer in range(args.layers)}


def random_batch(args: argparse.Namespace, seq: int | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, seq or args.seq), generator=gen).to(args.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of `fn` takes (device work included)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine(device: str) -> str:
    """One line: OS, CPU (and GPU), torch and library versions, threads."""
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [
        platform.platform(),
        f"CPU {cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
    ]
    if str(device).startswith("cuda"):
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    return "; ".join(parts)


def model_line(args: argparse.Namespace, lora: bool = True) -> str:
    """The model, batch and adapter settings, in words."""
    text = (
        f"LlamaForCausalLM from config: {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
        f"({args.kv_heads} kv), MLP {args.intermediate}, vocab {args.vocab}, {args.dtype} on {args.device}; "
        f"batch {args.batch} x {args.seq} tokens; "
        f"HeadMap {args.heads_per_layer} heads/layer in all layers, r={args.rank}"
    )
    return text + (f"; LoRA r={args.rank} on q_proj+v_proj" if lora else "")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A markdown table; `align` is one char per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
