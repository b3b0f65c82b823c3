"""The calibration loss: token cross-entropy over the target tokens, computed in float32 whatever the model dtype.

The loss over a set of batches is the token-weighted mean: the sum of the cross-entropies of all target tokens
divided by the number of target tokens (every target token counts the same, whichever batch or row it is in).
Per-row sums are returned in float64 so that sums over many batches, chunks and processes do not drift.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from .batches import Batch


class RowStats(NamedTuple):
    loss_sum: torch.Tensor  # [rows] float64: sum of the target tokens' cross-entropy
    tokens: torch.Tensor  # [rows] int64: number of target tokens
    correct: torch.Tensor | None  # [rows] bool: every target token is the argmax (teacher-forced exact match)


def accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def row_stats(
    model: nn.Module,
    batch: Batch,
    *,
    only_target_logits: bool = False,
    exact_match: bool = False,
) -> RowStats:
    """Per-row target-token loss sums (and optionally exact match) of one forward pass of `model` over `batch`.

    With `only_target_logits`, the model is asked (``logits_to_keep``) for the logits of the target positions only,
    which skips most of the output projection; the values are the same.
    """
    labels = batch["labels"]
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX  # [rows, seq - 1]: positions whose next token is a target token
    keep = F.pad(valid, (0, 1), value=False)  # [rows, seq]: positions whose logits are needed
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if only_target_logits:
        inputs["logits_to_keep"] = keep
    logits = model(**inputs, use_cache=False).logits
    device = logits.device
    keep, valid, target = keep.to(device), valid.to(device), target.to(device)
    if logits.dim() == 3 and logits.shape[:2] == keep.shape:
        logits = logits[keep]
    elif logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)} for a batch of shape {tuple(keep.shape)}")
    wanted = target[valid]
    token_loss = F.cross_entropy(logits.float(), wanted, reduction="none")
    rows = keep.nonzero()[:, 0]
    loss_sum = torch.zeros(labels.shape[0], dtype=torch.float64, device=device)
    loss_sum.index_add_(0, rows, token_loss.double())
    correct = None
    if exact_match:
        wrong = (logits.argmax(-1) != wanted).long()
        errors = torch.zeros(labels.shape[0], dtype=torch.long, device=device).index_add_(0, rows, wrong)
        correct = (errors == 0).cpu()
    return RowStats(loss_sum.cpu(), valid.sum(1).cpu(), correct)
