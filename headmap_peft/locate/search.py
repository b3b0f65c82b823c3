"""`locate_circuit`: the layer-conditioned search of METHOD.md section 2 (Algorithm 1 of the HeadMap paper)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import Architecture, resolve_architecture
from .batches import as_batches, fingerprint, input_device, target_token_count
from .circuit import Circuit, write_json_atomic
from .distributed import all_reduce_sum, barrier, ensure_initialized, world
from .engine import PrefixCache, naive_layer
from .loss import accepts_logits_to_keep

METHODS = ("exact", "naive", "attribution", "shortlist")
CHECKPOINT_FORMAT = "headmap-peft locate checkpoint"
CHECKPOINT_VERSION = 1


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_layers(layers: Any, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"layers must be a list of layer indices, got {layers!r}") from None
    if not layers:
        raise ValueError("layers is empty: give at least one layer index, or None for all layers")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must hold integer layer indices, got {layer!r}")
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"layers has layer {layer} but the model has {num_layers} layers (0..{num_layers - 1}); "
                "use layer indices in that range"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers lists a layer more than once: {layers}")
    return sorted(layers)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="eval", dynamic_ncols=True)


def _select(scores: torch.Tensor, candidates: Sequence[int], k: int) -> list[int]:
    """The `k` candidates with the highest score (float32, as reported); ties go to the lower head index."""
    return sorted(candidates, key=lambda h: (-float(scores[h]), h))[:k]


def _check_finite(scores: torch.Tensor, candidates: Sequence[int], layer: int, selected: dict, what: str) -> None:
    for head in candidates:
        value = float(scores[head])
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the {what} with head {head} of layer {layer} masked (and the {sum(map(len, selected.values()))} "
                f"heads selected in earlier layers) is {value}; HeadMap does not rank non-finite losses. A float16 "
                "model often overflows: load it in bfloat16 or float32, and check the calibration data."
            )


def _read_checkpoint(path: Path, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint {os.fspath(path)} cannot be read ({error}); delete it to start over") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{os.fspath(path)} is not a locate_circuit checkpoint; pass another checkpoint path or delete the file"
        )
    if data.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {os.fspath(path)} has version {data.get('version')!r}, this headmap-peft writes "
            f"{CHECKPOINT_VERSION}; delete it to start over"
        )
    theirs = data.get("settings", {})
    different = sorted(k for k in set(settings) | set(theirs) if settings.get(k) != theirs.get(k))
    if different:
        details = "; ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {settings.get(k)!r}" for k in different)
        raise ValueError(
            f"checkpoint {os.fspath(path)} was written by a run with other settings ({details}); rerun with the "
            "same model, data and arguments to resume, or pass another checkpoint path (or delete the file) to start "
            "over"
        )
    done = {}
    for key, entry in data.get("layers", {}).items():
        done[int(key)] = {
            "heads": [int(h) for h in entry["heads"]],
            "scores": [math.nan if v is None else float(v) for v in entry["scores"]],
        }
    return done


def check_search_arguments(
    model: nn.Module,
    heads_per_layer: int,
    *,
    layers: Sequence[int] | None = None,
    method: str = "exact",
    shortlist: int | None = None,
    max_rows_per_pass: int | None = None,
    attention_output_module: str | None = None,
    num_attention_heads: int | None = None,
) -> tuple[Architecture, list[int], int | None]:
    """Check `locate_circuit`'s search options against `model` before any work: (architecture, layers, shortlist)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    arch = resolve_architecture(model, attention_output_module, num_attention_heads)
    _positive_int(heads_per_layer, "heads_per_layer")
    if heads_per_layer > arch.num_heads:
        raise ValueError(
            f"heads_per_layer={heads_per_layer} but the model has {arch.num_heads} heads per layer; "
            f"use 1..{arch.num_heads}"
        )
    if method == "shortlist":
        shortlist = min(arch.num_heads, 2 * heads_per_layer) if shortlist is None else shortlist
        _positive_int(shortlist, "shortlist")
        if not heads_per_layer <= shortlist <= arch.num_heads:
            raise ValueError(
                f"shortlist={shortlist} must lie between heads_per_layer={heads_per_layer} and the "
                f"{arch.num_heads} heads per layer"
            )
    elif shortlist is not None:
        raise ValueError(f"shortlist is an option of method='shortlist', not of method={method!r}")
    if max_rows_per_pass is not None:
        _positive_int(max_rows_per_pass, "max_rows_per_pass")
    layers = _check_layers(layers, arch.num_layers)
    return arch, layers, shortlist


def locate_circuit(
    model: nn.Module,
    samples_or_batches: Any,
    heads_per_layer: int = 8,
    *,
    tokenizer=None,
    layers: Sequence[int] | None = None,
    method: str = "exact",
    shortlist: int | None = None,
    max_rows_per_pass: int | None = None,
    cache_device: str | torch.device | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 8,
    prompt_field: str = "prompt",
    target_field: str = "target",
    max_length: int | None = None,
    padding_side: str | None = None,
    attention_output_module: str | None = None,
    num_attention_heads: int | None = None,
) -> Circuit:
    """Locate the model's knowledge circuit for the calibration data (HeadMap's layer-conditioned search).

    Layers are visited in increasing order; at layer ``l`` every head is masked in turn, together with the heads
    already selected in earlier layers, and the `heads_per_layer` heads whose masking gives the highest calibration
    loss are selected (ties to the lower head index). The loss is the token-weighted mean cross-entropy over all
    target tokens of all batches, in float32 (sums in float64).

    Args:
        model: A causal LM (any family of `ATTENTION_OUTPUT_MODULES`, or give the two overrides below).
        samples_or_batches: Batches (dicts with ``input_ids``, ``attention_mask``, ``labels``; labels -100 outside
            the target), tokenised single samples, or prompt/target records (a ``datasets.Dataset`` or list of dicts)
            together with `tokenizer` (then `batch_size`, `prompt_field`, `target_field`, `max_length` and
            `padding_side` apply). Pass the same full data on every process: each process takes its own shard.
        heads_per_layer: Heads selected per layer (k), ``1..num_heads``.
        layers: The layers to search (default all); the others keep no selected heads.
        method: ``"exact"`` (default: the paper's result, computed with a cached prefix and batched candidates),
            ``"naive"`` (the plain loop, one forward pass per candidate; the reference), ``"attribution"``
            (first-order estimates from one forward and backward pass per layer and batch; approximate) or
            ``"shortlist"`` (attribution picks `shortlist` candidates per layer, the exact engine ranks them).
        shortlist: Candidates per layer for ``method="shortlist"`` (default ``2 * heads_per_layer``, at most all).
        max_rows_per_pass: Memory budget of the exact engine: the most sequences (candidates x batch rows) in one
            forward pass. Default: all candidates of a batch at once on an accelerator (halved automatically, with a
            warning, on out-of-memory), and about 2048 tokens per pass (at least one batch) on a CPU, where that
            runs faster. The result does not depend on it.
        cache_device: Where the cached hidden states live (default: where they are computed), e.g. ``"cpu"`` to
            save accelerator memory.
        checkpoint: A JSON file written atomically after each layer; a rerun with the same model, data and
            arguments resumes from it and returns the identical circuit. Settings that differ are refused.
        progress: Show a tqdm progress bar with ETA (on the first process only).
        attention_output_module, num_attention_heads: Overrides for models the architecture table does not know.

    Returns:
        A `Circuit` (``.heads``, ``.scores``, ``.save``, ``.to_config``, ``.plot``).
    """
    arch, layers, shortlist = check_search_arguments(
        model,
        heads_per_layer,
        layers=layers,
        method=method,
        shortlist=shortlist,
        max_rows_per_pass=max_rows_per_pass,
        attention_output_module=attention_output_module,
        num_attention_heads=num_attention_heads,
    )
    batches = as_batches(
        samples_or_batches,
        tokenizer,
        batch_size=batch_size,
        prompt_field=prompt_field,
        target_field=target_field,
        max_length=max_length,
        padding_side=padding_side,
    )
    num_tokens = target_token_count(batches)

    config = getattr(model, "config", None)
    model_info = {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "num_layers": arch.num_layers,
        "num_heads": arch.num_heads,
        "head_dim": arch.head_dim,
        "attention_output_module": attention_output_module,
        "num_attention_heads": num_attention_heads,
    }
    settings = {
        "method": method,
        "heads_per_layer": heads_per_layer,
        "layers": layers,
        "shortlist": shortlist,
        "num_batches": len(batches),
        "num_sequences": sum(b["input_ids"].shape[0] for b in batches),
        "num_target_tokens": num_tokens,
        "data_sha256": fingerprint(batches),
        "loss": "token-weighted mean cross-entropy over all target tokens",
    }
    checkpoint_settings = {**settings, **{f"model_{k}": v for k, v in model_info.items() if k != "name_or_path"}}

    ensure_initialized()
    rank, size = world()
    shard = batches[rank::size]
    selected: dict[int, list[int]] = {}
    scores = torch.full((arch.num_layers, arch.num_heads), math.nan, dtype=torch.float32)
    path = Path(checkpoint) if checkpoint is not None else None
    done: dict[int, dict[str, Any]] = {}
    if path is not None and path.exists():
        done = _read_checkpoint(path, checkpoint_settings)
    barrier()
    for layer, entry in done.items():
        selected[layer] = entry["heads"]
        scores[layer] = torch.tensor(entry["scores"], dtype=torch.float32)

    todo = [layer for layer in layers if layer not in done]
    rows = sum(b["input_ids"].shape[0] for b in shard)
    per_layer = {
        "naive": arch.num_heads * rows,
        "exact": arch.num_heads * rows,
        "attribution": rows,
        "shortlist": rows + (shortlist or 0) * rows,
    }[method]
    device = input_device(model)
    cache = PrefixCache(
        model,
        arch,
        shard,
        device,
        cache_device=cache_device,
        max_rows_per_pass=max_rows_per_pass,
        only_target_logits=accepts_logits_to_keep(model),
    )
    all_heads = list(range(arch.num_heads))
    bar = _progress(len(todo) * per_layer, progress and rank == 0 and bool(todo), f"locating heads ({method})")
    try:
        with _eval_mode(model):
            for layer in todo:
                bar.set_postfix_str(f"layer {layer}")
                row = torch.full((arch.num_heads,), math.nan, dtype=torch.float32)
                if method == "naive":
                    sums = naive_layer(model, arch, shard, selected, layer, all_heads, device, bar.update)
                    row[:] = (all_reduce_sum(sums) / num_tokens).float()
                    candidates = all_heads
                else:
                    cache.advance(selected, layer)
                    if method == "exact":
                        candidates = all_heads
                        row[:] = (all_reduce_sum(cache.exact_layer(layer, all_heads, bar.update)) / num_tokens).float()
                    else:
                        loss_sum, grads = cache.attribution_layer(layer, bar.update)
                        reduced = all_reduce_sum(torch.cat([loss_sum[None], grads]))
                        estimates = ((reduced[0] - reduced[1:]) / num_tokens).float()
                        _check_finite(estimates, all_heads, layer, selected, "estimated loss")
                        if method == "attribution":
                            candidates, row[:] = all_heads, estimates
                        else:
                            candidates = sorted(_select(estimates, all_heads, shortlist))
                            sums = all_reduce_sum(cache.exact_layer(layer, candidates, bar.update))
                            row[candidates] = (sums / num_tokens).float()
                _check_finite(row, candidates, layer, selected, "loss")
                selected[layer] = _select(row, candidates, heads_per_layer)
                scores[layer] = row
                done[layer] = {"heads": selected[layer], "scores": row.tolist()}
                if path is not None and rank == 0:
                    _write_checkpoint(path, checkpoint_settings, done)
    finally:
        bar.close()
    barrier()
    return Circuit(
        heads={layer: selected[layer] for layer in layers},
        scores=scores,
        model=model_info,
        settings=settings,
    )


def _write_checkpoint(path: Path, settings: dict[str, Any], done: dict[int, dict[str, Any]]) -> None:
    layers = {
        str(layer): {
            "heads": entry["heads"],
            "scores": [None if math.isnan(v) else v for v in entry["scores"]],
        }
        for layer, entry in sorted(done.items())
    }
    write_json_atomic(
        path,
        {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "settings": settings, "layers": layers},
    )
