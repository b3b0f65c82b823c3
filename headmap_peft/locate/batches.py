"""Calibration data for the locating pre-step: normalise the accepted inputs to validated batches.

`locate_circuit` and `ablation_table` accept tokenised batches (dicts with ``input_ids``, ``attention_mask`` and
``labels``, labels -100 outside the target), tokenised single samples (which are padded here), or prompt/target
records (a ``datasets.Dataset`` or a list of dicts) together with a tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..data import IGNORE_INDEX, _pad_token_id, pad_batch, prompt_target_batches

Batch = dict[str, torch.Tensor]


def _is_sequence_of_ints(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and (not value or isinstance(value[0], int))


def as_batches(
    samples_or_batches: Any,
    tokenizer=None,
    *,
    batch_size: int = 8,
    prompt_field: str = "prompt",
    target_field: str = "target",
    max_length: int | None = None,
    padding_side: str | None = None,
    what: str = "samples_or_batches",
) -> list[Batch]:
    """Validated batches (``input_ids``, ``attention_mask``, ``labels`` as 2-D tensors) from any accepted input."""
    if samples_or_batches is None or isinstance(samples_or_batches, (str, bytes, Mapping)):
        raise TypeError(
            f"{what} must be an iterable of batches (dicts with input_ids, attention_mask, labels) or of "
            f"{{{prompt_field!r}, {target_field!r}}} records, got {type(samples_or_batches).__name__}"
        )
    items = list(samples_or_batches)
    if not items:
        raise ValueError(f"{what} is empty: give at least one calibration sample or batch")
    first = items[0]
    if not isinstance(first, Mapping):
        raise TypeError(
            f"{what} must hold dicts (batches or {{{prompt_field!r}, {target_field!r}}} records), "
            f"got {type(first).__name__}"
        )
    if "input_ids" in first:
        ids = first["input_ids"]
        one_sample = _is_sequence_of_ints(ids) or (isinstance(ids, torch.Tensor) and ids.dim() == 1)
        if one_sample:  # tokenised single samples: pad them into batches
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            pad_id = _pad_token_id(tokenizer) if tokenizer is not None else 0
            side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
            features = []
            for i, item in enumerate(items):
                if "labels" not in item:
                    raise ValueError(_no_labels_message(what, i, item))
                features.append({k: _as_list(item[k]) for k in ("input_ids", "labels")})
            items = [
                pad_batch(features[i : i + batch_size], pad_id, side) for i in range(0, len(features), batch_size)
            ]
        return [_check_batch(item, i, what) for i, item in enumerate(items)]
    if prompt_field in first or target_field in first:
        if tokenizer is None:
            raise TypeError(
                f"{what} holds {{{prompt_field!r}, {target_field!r}}} records, which need a tokenizer: "
                "pass tokenizer=... (or pass tokenised batches)"
            )
        batches = prompt_target_batches(
            items, tokenizer, batch_size, prompt_field, target_field, max_length, padding_side
        )
        return [_check_batch(b, i, what) for i, b in enumerate(batches)]
    raise ValueError(
        f"{what}[0] has keys {sorted(first)}; expected a batch with input_ids and labels, or a record with "
        f"{prompt_field!r} and {target_field!r} fields (set prompt_field/target_field for other names)"
    )


def _as_list(value) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def _no_labels_message(what: str, index: int, item: Mapping) -> str:
    return (
        f"{what}[{index}] has no labels (keys: {sorted(item)}); labels must hold the target token ids and -100 "
        "elsewhere, e.g. from headmap_peft.data.prompt_target_batches"
    )


def _check_batch(item: Mapping, index: int, what: str) -> Batch:
    if not isinstance(item, Mapping):
        raise TypeError(f"{what}[{index}] must be a dict, got {type(item).__name__}")
    if "input_ids" not in item:
        raise ValueError(f"{what}[{index}] has no input_ids (keys: {sorted(item)})")
    if "labels" not in item:
        raise ValueError(_no_labels_message(what, index, item))
    input_ids = torch.as_tensor(item["input_ids"])
    labels = torch.as_tensor(item["labels"])
    if input_ids.dim() == 1:
        input_ids, labels = input_ids[None], labels[None]
    if input_ids.dim() != 2 or input_ids.shape != labels.shape:
        raise ValueError(
            f"{what}[{index}]: input_ids and labels must both be [batch, sequence] tensors of the same shape, got "
            f"{tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    mask = item.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask).reshape(input_ids.shape)
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise ValueError(
            f"{what}[{index}] has no target token: every label after the first position is -100. Labels must hold "
            "the target token ids (-100 only on the prompt and padding); check how the batch was built"
        )
    extra = {k: v for k, v in item.items() if k not in ("input_ids", "attention_mask", "labels")}
    for key, value in extra.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{what}[{index}] has an extra field {key!r} that is not a tensor with one row per sequence; "
                "remove it (only input_ids, attention_mask, labels and per-row tensors are passed to the model)"
            )
    return {
        "input_ids": input_ids.long(),
        "attention_mask": mask.long(),
        "labels": labels.long(),
        **extra,
    }


def target_token_count(batches: Iterable[Batch]) -> int:
    """The number of predicted target tokens (labels shifted by one, as in causal LM training)."""
    return int(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches))


def fingerprint(batches: Iterable[Batch]) -> str:
    """A sha256 of the batches' token ids, masks and labels (to refuse a checkpoint written for other data)."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            tensor = batch[key].to("cpu", torch.int64).contiguous()
            digest.update(repr(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def input_device(model: nn.Module) -> torch.device:
    """Where the model wants its input ids (the execution device of the embedding under accelerate hooks)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        hook = getattr(embeddings, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        weight = getattr(embeddings, "weight", None)
        if weight is not None and weight.device.type != "meta":
            return weight.device
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def select_rows(batch: Batch, rows: slice, repeat: int = 1) -> Batch:
    """Rows `rows` of every per-row tensor of `batch`, the block repeated `repeat` times (candidate-major)."""
    out = {}
    for key, value in batch.items():
        block = value[rows]
        out[key] = block.repeat(repeat, *([1] * (block.dim() - 1))) if repeat > 1 else block
    return out
