"""The locating engines: how the losses of one layer's candidate heads are computed.

- `naive_layer`: the plain loop of METHOD.md section 2, one full forward pass per candidate and batch. The reference.
- `PrefixCache.exact_layer`: the same numbers, cheaper. The hidden state entering layer ``l`` does not depend on
  layer ``l``'s candidates, so it is computed once per batch (with the heads selected so far masked) and cached; the
  candidates then share batched passes that replicate each batch once per candidate, with a per-row head mask at
  layer ``l``, and run only layers ``l..L-1`` for real. Layers ``0..l-1`` are temporarily swapped, in their
  ModuleList, for a small module that replays the cached state (the model's own forward runs unchanged around it).
- `PrefixCache.attribution_layer`: first-order estimates from one forward and backward pass per batch, through a
  differentiable gate on the heads of layer ``l``.

No transformers forward function is copied or patched: only hooks and the temporary layer swap, undone in `finally`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..architectures import Architecture
from .batches import Batch, select_rows
from .loss import row_stats
from .masking import add_head_mask, mask_heads

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class _Stop(Exception):
    """Raised from a forward hook to end a forward pass once the wanted hidden state has been captured."""


class _OutputStructure:
    """How a decoder layer returns its hidden state: a bare tensor or the first element of a tuple."""

    def __init__(self, output) -> None:
        if isinstance(output, torch.Tensor):
            self.length = None
        elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            self.length = len(output)
        else:
            raise TypeError(
                f"a decoder layer returned {type(output).__name__}; HeadMap's fast engine expects a tensor or a tuple "
                "starting with the hidden state. Use method='naive' for this model."
            )

    def hidden(self, output) -> torch.Tensor:
        return output if self.length is None else output[0]

    def wrap(self, hidden: torch.Tensor):
        return hidden if self.length is None else (hidden,) + (None,) * (self.length - 1)


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns `source` (or its own input) instead of computing anything.

    Attribute reads it does not have (``attention_type`` and the like, read by some models' layer loops) fall
    through to the layer it replaces, which is not registered as a submodule.
    """

    def __init__(self, layer: nn.Module, structure: _OutputStructure, source: torch.Tensor | None) -> None:
        super().__init__()
        self.__dict__["_replaced"] = layer
        self.__dict__["_structure"] = structure
        self.__dict__["_source"] = source

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_replaced"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._source is not None:
            hidden = self._source.to(hidden.device)
        return self._structure.wrap(hidden)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def naive_layer(
    model: nn.Module,
    arch: Architecture,
    batches: Sequence[Batch],
    selected: dict[int, list[int]],
    layer: int,
    candidates: Sequence[int],
    device: torch.device,
    advance: Callable[[int], None] = lambda n: None,
) -> torch.Tensor:
    """Per candidate head of `layer`: the sum of target-token losses with `selected` and that head masked."""
    sums = torch.zeros(len(candidates), dtype=torch.float64)
    for j, head in enumerate(candidates):
        with mask_heads(model, {**selected, layer: [head]}, architecture=arch), torch.no_grad():
            for batch in batches:
                sums[j] += row_stats(model, _to(batch, device)).loss_sum.sum()
                advance(batch["input_ids"].shape[0])
    return sums


class PrefixCache:
    """The hidden state entering layer `position` for each batch, with the selected heads masked before it."""

    def __init__(
        self,
        model: nn.Module,
        arch: Architecture,
        batches: Sequence[Batch],
        device: torch.device,
        *,
        cache_device: torch.device | str | None = None,
        max_rows_per_pass: int | None = None,
        only_target_logits: bool = True,
    ) -> None:
        self.model = model
        self.arch = arch
        self.batches = batches
        self.device = device
        self.cache_device = cache_device
        self.max_rows = max_rows_per_pass
        self.only_target_logits = only_target_logits
        self.position = 0
        self.states: list[torch.Tensor | None] = [None] * len(batches)
        self.structure: _OutputStructure | None = None

    @contextmanager
    def _replayed(self, upto: int, source: torch.Tensor | None) -> Iterator[None]:
        """Swap layers ``0..upto-1`` for replays; layer ``upto-1`` returns `source`, the others pass through."""
        if upto == 0:
            yield
            return
        container = self.model.get_submodule(self.arch.layers_name)
        originals = [container[i] for i in range(upto)]
        try:
            for i, layer in enumerate(originals):
                container[i] = _Replay(layer, self.structure, source if i == upto - 1 else None)
            yield
        finally:
            for i, layer in enumerate(originals):
                container[i] = layer

    def advance(self, selected: dict[int, list[int]], to_layer: int) -> None:
        """Move the cache to the input of `to_layer`: run layers ``position..to_layer-1`` with `selected` masked."""
        if to_layer < self.position:
            raise RuntimeError(f"the prefix cache is at layer {self.position} and cannot go back to {to_layer}")
        if to_layer == self.position:
            return
        last = self.arch.decoder_layer(self.model, to_layer - 1)
        masks = {k: v for k, v in selected.items() if self.position <= k < to_layer}
        captured: list = []

        def capture(_module, _args, output):
            captured.append(output)
            raise _Stop

        handle = last.register_forward_hook(capture)
        try:
            with mask_heads(self.model, masks, architecture=self.arch), torch.no_grad():
                for i, batch in enumerate(self.batches):
                    captured.clear()
                    inputs = _to({k: v for k, v in batch.items() if k != "labels"}, self.device)
                    with self._replayed(self.position, self.states[i]):
                        try:
                            self.model(**inputs, use_cache=False)
                        except _Stop:
                            pass
                    if not captured:
                        raise RuntimeError(
                            f"decoder layer {to_layer - 1} was not called in the model's forward pass; HeadMap's fast "
                            "engine needs the layers to run in order. Use method='naive' for this model."
                        )
                    if self.structure is None:
                        self.structure = _OutputStructure(captured[0])
                    state = self.structure.hidden(captured[0]).detach()
                    self.states[i] = state.to(self.cache_device) if self.cache_device is not None else state
        finally:
            handle.remove()
        self.position = to_layer

    def exact_layer(
        self, layer: int, candidates: Sequence[int], advance: Callable[[int], None] = lambda n: None
    ) -> torch.Tensor:
        """Per candidate head of `layer`: the sum of target-token losses with it masked (given the cached prefix)."""
        self._check_position(layer)
        sums = torch.zeros(len(candidates), dtype=torch.float64)
        for i, batch in enumerate(self.batches):
            rows = batch["input_ids"].shape[0]
            budget = self.max_rows or len(candidates) * rows
            while True:
                try:
                    with torch.no_grad():
                        sums += self._exact_batch(i, layer, candidates, budget)
                    break
                except _OOM:
                    if budget <= 1:
                        raise
                    budget = max(1, min(budget, len(candidates) * rows) // 2)
                    warnings.warn(
                        f"out of memory while evaluating layer {layer}'s candidate heads; retrying with at most "
                        f"{budget} sequences per pass (set max_rows_per_pass={budget} to start there)",
                        stacklevel=2,
                    )
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            advance(len(candidates) * rows)
        return sums

    def _exact_batch(self, index: int, layer: int, candidates: Sequence[int], budget: int) -> torch.Tensor:
        batch, state = self.batches[index], self.states[index]
        rows = batch["input_ids"].shape[0]
        heads, module = self.arch.num_heads, self.arch.attention_output(self.model, layer)
        sums = torch.zeros(len(candidates), dtype=torch.float64)
        block = min(rows, budget)
        group_size = max(1, budget // block)
        for start in range(0, rows, block):
            part = slice(start, min(rows, start + block))
            n = part.stop - part.start
            for first in range(0, len(candidates), group_size):
                group = list(candidates[first : first + group_size])
                keep = torch.ones(len(group), heads, dtype=torch.bool)
                keep[torch.arange(len(group)), torch.tensor(group)] = False
                keep = keep.repeat_interleave(n, dim=0)[:, None, :]  # [group * n, 1, heads], candidate-major
                sub = _to(select_rows(batch, part, repeat=len(group)), self.device)
                source = None if state is None else state[part].repeat(len(group), *([1] * (state.dim() - 1)))
                handle = add_head_mask(module, keep, self.arch.head_dim)
                try:
                    with self._replayed(layer, source):
                        stats = row_stats(self.model, sub, only_target_logits=self.only_target_logits)
                finally:
                    handle.remove()
                sums[first : first + len(group)] += stats.loss_sum.view(len(group), n).sum(1)
        return sums

    def attribution_layer(
        self, layer: int, advance: Callable[[int], None] = lambda n: None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss sum with no head of `layer` masked and its gradient with respect to each head's gate.

        With a gate ``g`` multiplying each head's slice (``g = 1`` is the model), masking head ``h`` sets
        ``g_h = 0``, so to first order the masked loss sum is ``loss_sum - grad[h]``.
        """
        self._check_position(layer)
        heads, head_dim = self.arch.num_heads, self.arch.head_dim
        module = self.arch.attention_output(self.model, layer)
        loss_total = torch.zeros((), dtype=torch.float64)
        grad_total = torch.zeros(heads, dtype=torch.float64)
        for i, batch in enumerate(self.batches):
            gate = torch.ones(heads, dtype=torch.float32, device=self.device, requires_grad=True)

            def apply_gate(_module, args, kwargs, gate=gate):
                x, *rest = args
                scale = gate.to(x.device).repeat_interleave(head_dim).to(x.dtype)
                return (x * scale, *rest), kwargs

            handle = module.register_forward_pre_hook(apply_gate, with_kwargs=True)
            try:
                with torch.enable_grad(), self._replayed(layer, self.states[i]):
                    stats = row_stats(self.model, _to(batch, self.device), only_target_logits=self.only_target_logits)
                    total = stats.loss_sum.sum()
                    (grad,) = torch.autograd.grad(total, gate)
            finally:
                handle.remove()
            loss_total += total.detach()
            grad_total += grad.detach().double().cpu()
            advance(batch["input_ids"].shape[0])
        return loss_total, grad_total

    def _check_position(self, layer: int) -> None:
        if self.position != layer:
            raise RuntimeError(f"the prefix cache is at layer {self.position}, not {layer}; call advance first")
