"""The paper's key evidence: masking the circuit hurts the task far more than masking as many random heads."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import Architecture, resolve_architecture
from ..config import normalize_target_heads
from .batches import Batch, as_batches, input_device
from .circuit import Circuit
from .distributed import all_reduce_sum, ensure_initialized, world
from .loss import accepts_logits_to_keep, row_stats
from .masking import mask_heads
from .search import _eval_mode


@dataclass
class AblationRow:
    """One line of the ablation table; for random heads the mean and standard deviation over the draws."""

    condition: str
    heads_masked: int
    loss: float
    accuracy: float
    loss_std: float | None = None
    accuracy_std: float | None = None
    draws: int = 1


def evaluate_masked(
    model: nn.Module,
    batches: list[Batch],
    heads: Mapping[int, list[int]] | None = None,
    *,
    architecture: Architecture | None = None,
) -> tuple[float, float]:
    """(loss, exact-match accuracy) on `batches` with `heads` masked.

    The loss is the token-weighted mean target cross-entropy (as in `locate_circuit`); a sample counts as correct
    when the argmax at every target position, given the prompt and the true target prefix, is the target token
    (the same as greedy decoding producing the target). Under several processes each evaluates a shard.
    """
    arch = architecture or resolve_architecture(model)
    rank, size = world()
    device = input_device(model)
    keep_logits = accepts_logits_to_keep(model)
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, tokens, correct samples, samples
    with _eval_mode(model), torch.no_grad(), mask_heads(model, heads or {}, architecture=arch):
        for batch in batches[rank::size]:
            stats = row_stats(
                model, {k: v.to(device) for k, v in batch.items()}, only_target_logits=keep_logits, exact_match=True
            )
            totals += torch.tensor(
                [
                    stats.loss_sum.sum().item(),
                    stats.tokens.sum().item(),
                    stats.correct.sum().item(),
                    len(stats.tokens),
                ],
                dtype=torch.float64,
            )
    totals = all_reduce_sum(totals)
    return float(totals[0] / totals[1]), float(totals[2] / totals[3])


def random_heads(heads: Mapping[int, list[int]], num_heads: int, rng: random.Random) -> dict[int, list[int]]:
    """As many heads as `heads` has in each of its layers, drawn uniformly at random in that layer."""
    return {layer: sorted(rng.sample(range(num_heads), len(chosen))) for layer, chosen in heads.items()}


def ablation_table(
    model: nn.Module,
    samples_or_batches: Any,
    circuit: Circuit | Mapping[int, list[int]],
    draws: int = 5,
    seed: int = 0,
    *,
    tokenizer=None,
    batch_size: int = 8,
    prompt_field: str = "prompt",
    target_field: str = "target",
    max_length: int | None = None,
    padding_side: str | None = None,
    attention_output_module: str | None = None,
    num_attention_heads: int | None = None,
) -> list[AblationRow]:
    """Loss and exact-match accuracy with no heads masked, the circuit masked, and random heads masked.

    The random rows mask, in each of the circuit's layers, as many heads as the circuit has there, drawn uniformly
    (with `seed`); they report the mean and standard deviation over `draws` draws.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    if isinstance(circuit, Circuit):
        circuit.check_model(model)
        attention_output_module = attention_output_module or circuit.model.get("attention_output_module")
        num_attention_heads = num_attention_heads or circuit.model.get("num_attention_heads")
        heads = circuit.heads
    else:
        heads = normalize_target_heads(circuit, what="circuit")
    arch = resolve_architecture(model, attention_output_module, num_attention_heads)
    arch.check_heads(heads, what="circuit")
    batches = as_batches(
        samples_or_batches,
        tokenizer,
        batch_size=batch_size,
        prompt_field=prompt_field,
        target_field=target_field,
        max_length=max_length,
        padding_side=padding_side,
    )
    ensure_initialized()
    count = sum(len(h) for h in heads.values())
    rows = []
    loss, accuracy = evaluate_masked(model, batches, None, architecture=arch)
    rows.append(AblationRow("no heads masked", 0, loss, accuracy))
    loss, accuracy = evaluate_masked(model, batches, heads, architecture=arch)
    rows.append(AblationRow("circuit masked", count, loss, accuracy))
    rng = random.Random(seed)
    results = [
        evaluate_masked(model, batches, random_heads(heads, arch.num_heads, rng), architecture=arch)
        for _ in range(draws)
    ]
    losses, accuracies = [r[0] for r in results], [r[1] for r in results]
    spread = (lambda v: statistics.stdev(v)) if draws > 1 else (lambda v: 0.0)
    rows.append(
        AblationRow(
            f"random heads masked ({draws} draw{'s' if draws > 1 else ''})",
            count,
            statistics.fmean(losses),
            statistics.fmean(accuracies),
            spread(losses),
            spread(accuracies),
            draws,
        )
    )
    return rows


def format_ablation_table(rows: list[AblationRow]) -> str:
    """The rows as a markdown table."""

    def cell(value: float, std: float | None, percent: bool = False) -> str:
        scale, unit = (100.0, "%") if percent else (1.0, "")
        if math.isnan(value):
            return "nan"
        text = f"{value * scale:.{1 if percent else 4}f}{unit}"
        if std is not None:
            text += f" ± {std * scale:.{1 if percent else 4}f}{unit}"
        return text

    lines = [
        "| condition | heads masked | loss | exact match |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.condition} | {row.heads_masked} | {cell(row.loss, row.loss_std)} | "
            f"{cell(row.accuracy, row.accuracy_std, percent=True)} |"
        )
    return "\n".join(lines)
