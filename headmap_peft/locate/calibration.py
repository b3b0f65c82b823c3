"""Calibration samples (METHOD.md section 1): the training samples the unmodified model predicts best."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ..data import prompt_target_batches
from .batches import input_device
from .distributed import all_reduce_sum, ensure_initialized, world
from .loss import accepts_logits_to_keep, row_stats
from .search import _eval_mode, _progress


def sample_losses(
    model: nn.Module,
    tokenizer,
    dataset: Any,
    *,
    prompt_field: str = "prompt",
    target_field: str = "target",
    batch_size: int = 8,
    max_length: int | None = None,
    padding_side: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Per record: the mean cross-entropy of its target tokens given its prompt (float64, in dataset order)."""
    records = dataset if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") else list(dataset)
    total = len(records)
    if total == 0:
        raise ValueError("the dataset is empty: give at least one {prompt, target} record")
    ensure_initialized()
    rank, size = world()
    mine = list(range(rank, total, size))
    losses = torch.zeros(total, dtype=torch.float64)
    device = input_device(model)
    keep_logits = accepts_logits_to_keep(model)
    bar = _progress(len(mine), progress and rank == 0, "scoring calibration samples")
    try:
        with _eval_mode(model), torch.no_grad():
            for start in range(0, len(mine), batch_size):
                indices = mine[start : start + batch_size]
                records_part = [records[i] for i in indices]
                (batch,) = prompt_target_batches(
                    records_part, tokenizer, len(indices), prompt_field, target_field, max_length, padding_side
                )
                stats = row_stats(model, {k: v.to(device) for k, v in batch.items()}, only_target_logits=keep_logits)
                losses[indices] = stats.loss_sum / stats.tokens.double()
                bar.update(len(indices))
    finally:
        bar.close()
    return all_reduce_sum(losses)


def select_calibration_samples(
    model: nn.Module,
    tokenizer,
    dataset: Any,
    n: int = 256,
    *,
    prompt_field: str = "prompt",
    target_field: str = "target",
    batch_size: int = 8,
    max_length: int | None = None,
    padding_side: str | None = None,
    progress: bool = True,
) -> Any:
    """The `n` records with the lowest loss of the unmodified model (the paper's calibration set), lowest first.

    A record's loss is the mean cross-entropy of its target tokens given its prompt; ties keep dataset order.
    Returns a ``datasets.Dataset`` for a Dataset (via ``.select``), else a list of the records. Under several
    processes each scores a shard and all return the same selection.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        dataset = list(dataset)
    losses = sample_losses(
        model,
        tokenizer,
        dataset,
        prompt_field=prompt_field,
        target_field=target_field,
        batch_size=batch_size,
        max_length=max_length,
        padding_side=padding_side,
        progress=progress,
    )
    bad = [i for i, v in enumerate(losses.tolist()) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"the loss of sample(s) {bad[:10]} is not finite; a float16 model often overflows: load it in bfloat16 "
            "or float32, and check those samples"
        )
    if n > len(losses):
        warnings.warn(f"n={n} but the dataset has only {len(losses)} samples; using all of them", stacklevel=2)
    order = sorted(range(len(losses)), key=lambda i: (float(losses[i]), i))[:n]
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        return dataset.select(order)
    return [dataset[i] for i in order]
