"""Prompt/target samples: tokenisation with labels on the target only, padding and batching.

Shared by the locating pre-step, the examples and the quickstart: a sample's loss is the mean token cross-entropy
over its target tokens (labels are -100 on the prompt and on padding).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


def encode_prompt_target(tokenizer, prompt: str, target: str, max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids of ``prompt + target`` with labels on the target tokens only.

    The prompt and the target are tokenised separately (the target without special tokens) so the boundary is exact.
    If `max_length` cuts the sequence, the prompt is shortened from the left so the target stays whole.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"the target {target!r} has no tokens; every sample needs at least one target token")
    if max_length is not None and len(prompt_ids) + len(target_ids) > max_length:
        keep = max_length - len(target_ids)
        if keep < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for the prompt of a sample whose target has "
                f"{len(target_ids)} tokens; raise max_length"
            )
        prompt_ids = prompt_ids[-keep:]
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def pad_batch(
    features: list[Mapping[str, Any]], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad ``input_ids``/``labels`` lists to a batch with an attention mask (labels -100 on padding)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(f["input_ids"]) for f in features)
    ids, labels, mask = [], [], []
    for f in features:
        n = len(f["input_ids"])
        pad = length - n
        row_ids = list(f["input_ids"])
        row_labels = list(f.get("labels", f["input_ids"]))
        if padding_side == "right":
            ids.append(row_ids + [pad_token_id] * pad)
            labels.append(row_labels + [IGNORE_INDEX] * pad)
            mask.append([1] * n + [0] * pad)
        else:
            ids.append([pad_token_id] * pad + row_ids)
            labels.append([IGNORE_INDEX] * pad + row_labels)
            mask.append([0] * pad + [1] * n)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return pad


@dataclass
class PromptTargetCollator:
    """A data collator (for transformers.Trainer or a DataLoader) over encoded prompt/target features."""

    tokenizer: Any
    padding_side: str | None = None

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        side = self.padding_side or getattr(self.tokenizer, "padding_side", "right")
        return pad_batch(features, _pad_token_id(self.tokenizer), side)


def prompt_target_batches(
    records: Iterable[Mapping[str, Any]],
    tokenizer,
    batch_size: int = 8,
    prompt_field: str = "prompt",
    target_field: str = "target",
    max_length: int | None = None,
    padding_side: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Batches (input_ids, attention_mask, labels) from records with a prompt and a target field."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features = []
    for i, record in enumerate(records):
        for name in (prompt_field, target_field):
            if name not in record:
                raise KeyError(
                    f"record {i} has no field {name!r} (it has {sorted(record)}); set prompt_field/target_field"
                )
        features.append(encode_prompt_target(tokenizer, record[prompt_field], record[target_field], max_length))
    collate = PromptTargetCollator(tokenizer, padding_side)
    return [collate(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]
