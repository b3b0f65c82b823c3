"""Exact-match accuracy and a small fine-tuning loop over prompt/target records, shared by the quickstart and the
quality benchmark."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data import IGNORE_INDEX, PromptTargetCollator, encode_prompt_target, prompt_target_batches


@torch.no_grad()
def predictions(
    model: nn.Module, tokenizer, records: Sequence[Mapping[str, Any]], batch_size: int = 64
) -> list[tuple[int, ...]]:
    """Per record, the model's argmax token at every target position given the prompt and the true target prefix.

    All of a record's predicted tokens equal its target tokens exactly when greedy decoding from the prompt produces
    the target (as tokenised separately from the prompt), so this is exact-match accuracy in one forward pass.
    """
    was_training = model.training
    model.eval()
    out: list[tuple[int, ...]] = []
    try:
        for batch in prompt_target_batches(records, tokenizer, batch_size=batch_size, padding_side="right"):
            device = _device(model)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            predicted = logits[:, :-1].argmax(-1).cpu()
            labels = batch["labels"][:, 1:]
            for row in range(labels.shape[0]):
                keep = labels[row] != IGNORE_INDEX
                out.append(tuple(predicted[row][keep].tolist()))
    finally:
        model.train(was_training)
    return out


def targets(tokenizer, records: Sequence[Mapping[str, Any]]) -> list[tuple[int, ...]]:
    """The target token ids of each record, tokenised as `predictions` sees them."""
    return [
        tuple(t for t in encode_prompt_target(tokenizer, r["prompt"], r["target"])["labels"] if t != IGNORE_INDEX)
        for r in records
    ]


def accuracy(model: nn.Module, tokenizer, records: Sequence[Mapping[str, Any]], batch_size: int = 64) -> float:
    """Exact-match accuracy: the share of records whose whole target is the model's greedy continuation."""
    predicted = predictions(model, tokenizer, records, batch_size)
    expected = targets(tokenizer, records)
    return sum(p == t for p, t in zip(predicted, expected)) / max(1, len(expected))


def finetune(
    model: nn.Module,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    desc: str = "training",
) -> list[float]:
    """Train `model`'s trainable parameters on the target tokens of `records` (AdamW, warm-up + cosine decay).

    Batches are drawn by a seeded generator, so two models trained with the same arguments see the same batches
    in the same order. Returns the loss of every step.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    features = [encode_prompt_target(tokenizer, r["prompt"], r["target"]) for r in records]
    if not features:
        raise ValueError("no training records")
    collate = PromptTargetCollator(tokenizer, padding_side="right")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
    losses: list[float] = []
    model.train()
    order = torch.randperm(len(features), generator=generator).tolist()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(features), generator=generator).tolist()
        chunk, order = order[:batch_size], order[batch_size:]
        batch = {k: v.to(device) for k, v in collate([features[i] for i in chunk]).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return losses


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
