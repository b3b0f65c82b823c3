"""Head masking: zero the slices of chosen heads in the input of the attention output projection."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..architectures import Architecture, resolve_architecture
from ..config import normalize_target_heads


def add_head_mask(module: nn.Module, keep: torch.Tensor, head_dim: int) -> RemovableHandle:
    """Zero heads of `module`'s input with a forward pre-hook; returns the handle that removes it.

    `keep` is a boolean tensor whose last dimension is the number of heads and whose leading dimensions broadcast
    against the input's (e.g. ``[H]`` for one mask, ``[B, 1, H]`` for one mask per batch row).
    """
    keep_columns = keep.to(torch.bool).repeat_interleave(head_dim, dim=-1)
    drop_columns = ~keep_columns

    def hook(_module, args, kwargs):
        x, *rest = args
        return (x.masked_fill(drop_columns.to(x.device), 0), *rest), kwargs

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def keep_mask(heads: Iterable[int], num_heads: int, device=None) -> torch.Tensor:
    """A boolean [num_heads] vector that is False at `heads`."""
    keep = torch.ones(num_heads, dtype=torch.bool, device=device)
    keep[list(heads)] = False
    return keep


@contextmanager
def mask_heads(
    model: nn.Module,
    heads: Mapping[int, Iterable[int]],
    *,
    architecture: Architecture | None = None,
    attention_output_module: str | None = None,
    num_attention_heads: int | None = None,
) -> Iterator[nn.Module]:
    """Evaluate `model` with the given heads masked (``{layer: [heads]}`` or a `Circuit`), e.g. without its circuit.

    ```python
    with mask_heads(model, circuit.heads):
        loss = model(**batch).loss
    ```
    A `Circuit` is first checked against the model's shape.
    """
    if hasattr(heads, "check_model") and hasattr(heads, "heads"):  # a Circuit (duck-typed: no import cycle)
        if architecture is None:
            heads.check_model(model)
            attention_output_module = attention_output_module or heads.model.get("attention_output_module")
            num_attention_heads = num_attention_heads or heads.model.get("num_attention_heads")
        heads = heads.heads
    arch = architecture or resolve_architecture(model, attention_output_module, num_attention_heads)
    heads = normalize_target_heads(heads, allow_empty=True, what="heads")
    arch.check_heads(heads, what="heads")
    handles: list[RemovableHandle] = []
    try:
        for layer, layer_heads in heads.items():
            module = arch.attention_output(model, layer)
            handles.append(add_head_mask(module, keep_mask(layer_heads, arch.num_heads), arch.head_dim))
        yield model
    finally:
        for handle in handles:
            handle.remove()
