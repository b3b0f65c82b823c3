"""Boilerplate shared by the training examples: command line, base model, task data, the circuit to train.

The training code a user copies lives in each example; this file only holds what every example does the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from headmap_peft.data import prompt_target_batches

# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in every get_peft_model (LoRA too)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def add_common_arguments(parser: argparse.ArgumentParser, max_steps: int = 60, output_dir: str = "runs/x") -> None:
    """The options every example takes."""
    parser.add_argument("--model", help="local path or hub id of a causal LM (default: the embedded demo model)")
    parser.add_argument("--cache-dir", help="demo model cache root (default: $HEADMAP_CACHE or ~/.cache/headmap_peft)")
    circuit = parser.add_mutually_exclusive_group()
    circuit.add_argument("--circuit", help="a circuit.json written by Circuit.save or `headmap locate`")
    circuit.add_argument("--target-heads", help="the circuit as JSON, e.g. '{\"1\": [0, 2]}' (layer -> heads)")
    parser.add_argument(
        "--heads-per-layer", type=int, default=2, help="heads per layer when locating the circuit (no --circuit)"
    )
    parser.add_argument("--calibration-samples", type=int, default=32, help="lowest-loss samples used to locate")
    parser.add_argument("--rank", type=int, default=8, help="rank r of the HeadMap maps")
    parser.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0, help="task split, adapter init and data order")
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_base(args: argparse.Namespace, **from_pretrained: Any) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, source)``: `--model` or the demo model; `source` is the path/id to load it again from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model:
        source = args.model
    else:
        from headmap_peft.demo import default_model_path, is_cached, load_default_model

        if not is_cached(args.cache_dir):
            print("first run: pretraining the embedded demo model (a few minutes; cached for later runs)")
        load_default_model(args.cache_dir, progress=not args.no_progress)
        source = str(default_model_path(args.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, **from_pretrained)
    return model.eval(), tokenizer, source


def target_heads(
    args: argparse.Namespace, model: nn.Module, tokenizer, train: Any, log: Callable[[str], None] = print
) -> dict[int, list[int]]:
    """The circuit to train: `--circuit`, `--target-heads`, else located on the lowest-loss train samples."""
    from headmap_peft import Circuit, locate_circuit, select_calibration_samples

    if args.circuit:
        heads = Circuit.load(args.circuit, model).heads
        log(f"circuit from {args.circuit}: {heads}")
        return heads
    if args.target_heads:
        heads = {int(layer): list(h) for layer, h in json.loads(args.target_heads).items()}
        log(f"circuit from --target-heads: {heads}")
        return heads
    progress = not args.no_progress
    calibration = select_calibration_samples(
        model, tokenizer, train, n=min(args.calibration_samples, len(train)), batch_size=32, progress=progress
    )
    circuit = locate_circuit(
        model, calibration, heads_per_layer=args.heads_per_layer, tokenizer=tokenizer, batch_size=32, progress=progress
    )
    log(f"located circuit ({circuit.num_selected_heads} heads on {len(calibration)} samples): {circuit.heads}")
    return circuit.heads


@torch.no_grad()
def eval_loss(model: nn.Module, tokenizer, records: Sequence[Mapping[str, str]], batch_size: int = 64) -> float:
    """Mean cross-entropy per target token over `records` (prompt/target)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in prompt_target_batches(records, tokenizer, batch_size):
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**{k: v.to(device) for k, v in batch.items()}).loss.item() * n
        tokens += n
    model.train(was_training)
    return total / tokens if tokens else math.nan


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require gradients."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def check_only_headmap_trainable(model: nn.Module) -> int:
    """Raise if anything but HeadMap maps is trainable; return the number of trainable parameters."""
    names = trainable_names(model)
    others = [n for n in names if ".headmap_down." not in n and ".headmap_up." not in n]
    if not names or others:
        raise RuntimeError(f"expected only HeadMap parameters to be trainable, got {others[:5] or 'none at all'}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
