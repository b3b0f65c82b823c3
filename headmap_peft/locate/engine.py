"""The locating engines: how the losses of one layer's candidate heads are computed.

- `naive_layer`: the plain loop of METHOD.md section 2, one full forward pass per candidate and batch. The reference.
- `PrefixCache.exact_layer`: the same numbers, cheaper. The hidden state entering layer ``l`` does not depend on
  layer ``l``'s candidates, and neither do the heads' outputs inside layer ``l`` (masking acts after them), so both
  are computed once per batch (with the heads selected so far masked) and cached; the candidates then share batched
  passes that replicate each batch once per candidate, with a per-row head mask at layer ``l``'s attention output
  projection, and run only the rest of layer ``l`` and layers ``l+1..L-1`` for real. Layers ``0..l-1`` are
  temporarily swapped, in their ModuleList, for a small module that replays the cached state, and layer ``l``'s
  attention block for one that applies the real output projection to the cached heads' outputs (only where the
  model's attention block is checked to return exactly its projection's output). The model's own forward runs
  unchanged around them.
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
CPU_TOKENS_PER_PASS = 2048


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


class _StandIn(nn.Module):
    """Temporarily stands in for a module of the model. Attribute reads it does not have (``attention_type`` and the
    like, read by some models' layer loops) fall through to the module it replaces, which is not registered as a
    submodule (so it is neither moved nor counted twice)."""

    def __init__(self, replaced: nn.Module, structure: _OutputStructure, source: torch.Tensor | None) -> None:
        super().__init__()
        self.__dict__["_replaced"] = replaced
        self.__dict__["_structure"] = structure
        self.__dict__["_source"] = source

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_replaced"], name)


class _Replay(_StandIn):
    """Stands in for a decoder layer: returns `source` (or its own input) instead of computing anything."""

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._source is not None:
            hidden = self._source.to(hidden.device)
        return self._structure.wrap(hidden)


def _repeat(tensor: torch.Tensor, times: int) -> torch.Tensor:
    return tensor.repeat(times, *([1] * (tensor.dim() - 1))) if times > 1 else tensor


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


class _AttentionReplay(_StandIn):
    """Stands in for layer ``l``'s attention block: returns ``output_projection(source)``.

    `source` is the cached input of the attention output projection (the heads' outputs), which does not depend on
    the candidate masked at layer ``l``, so the queries, keys, values and attention weights need not be recomputed
    for every candidate. The real projection module is called, so head masks and gates on it apply as usual.
    """

    def __init__(
        self, attention: nn.Module, projection: nn.Module, structure: _OutputStructure, source: torch.Tensor
    ) -> None:
        super().__init__(attention, structure, source)
        self.__dict__["_projection"] = projection

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return self._structure.wrap(self._projection(self._source.to(hidden.device)))


class PrefixCache:
    """Per batch, what layer `position` receives with the selected heads masked in earlier layers.

    That is the hidden state entering the layer and, where the model allows it, the input of the layer's attention
    output projection (the heads' outputs), so candidate passes replay both instead of recomputing them.
    """

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
        self.head_outputs: list[torch.Tensor | None] = [None] * len(batches)
        self.structure: _OutputStructure | None = None
        self.attention_structure: _OutputStructure | None = None
        # the attention block is replayed only where its output is exactly its output projection's output
        parent, _, _ = arch.attention_output_module.rpartition(".")
        self.attention_name = parent or None

    def _store(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor.to(self.cache_device) if self.cache_device is not None else tensor

    @contextmanager
    def _replayed(
        self, upto: int, source: torch.Tensor | None, head_outputs: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Swap layers ``0..upto-1`` for replays (layer ``upto-1`` returns `source`, the others pass through) and,
        with `head_outputs`, layer `upto`'s attention block for one that projects them."""
        container = self.model.get_submodule(self.arch.layers_name)
        originals = [container[i] for i in range(upto)]
        attention_parent = attention_name = attention = None
        try:
            for i, layer in enumerate(originals):
                container[i] = _Replay(layer, self.structure, source if i == upto - 1 else None)
            if head_outputs is not None:
                layer = self.arch.decoder_layer(self.model, upto)
                parent_name, _, attention_name = self.attention_name.rpartition(".")
                attention_parent = layer.get_submodule(parent_name) if parent_name else layer
                attention = getattr(attention_parent, attention_name)
                projection = self.arch.attention_output(self.model, upto)
                replay = _AttentionReplay(attention, projection, self.attention_structure, head_outputs)
                setattr(attention_parent, attention_name, replay)
            yield
        finally:
            if attention is not None:
                setattr(attention_parent, attention_name, attention)
            for i, layer in enumerate(originals):
                container[i] = layer

    def advance(self, selected: dict[int, list[int]], to_layer: int) -> None:
        """Move the cache to layer `to_layer`: run layers ``position..to_layer-1`` with `selected` masked, and layer
        `to_layer`'s attention (nothing masked there) to cache its heads' outputs."""
        if to_layer < self.position:
            raise RuntimeError(f"the prefix cache is at layer {self.position} and cannot go back to {to_layer}")
        missing_heads = self.attention_name is not None and any(h is None for h in self.head_outputs)
        if to_layer == self.position and not missing_heads:
            return
        masks = {k: v for k, v in selected.items() if self.position <= k < to_layer}
        captured: dict[str, object] = {}
        handles = []

        def capture_layer(_module, _args, output):
            captured["layer"] = output
            if self.attention_name is None:
                raise _Stop

        def capture_heads(_module, args, kwargs):
            captured["heads"] = args[0] if args else next(iter(kwargs.values()))

        def capture_projection(_module, _args, output):
            captured["projection"] = output

        def capture_attention(_module, _args, output):
            captured["attention"] = output
            raise _Stop

        if to_layer > self.position:
            handles.append(self.arch.decoder_layer(self.model, to_layer - 1).register_forward_hook(capture_layer))
        if self.attention_name is not None:
            projection = self.arch.attention_output(self.model, to_layer)
            attention = self.arch.decoder_layer(self.model, to_layer).get_submodule(self.attention_name)
            handles.append(projection.register_forward_pre_hook(capture_heads, with_kwargs=True))
            handles.append(projection.register_forward_hook(capture_projection))
            handles.append(attention.register_forward_hook(capture_attention))
        states, head_outputs = list(self.states), [None] * len(self.batches)
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
                    if to_layer > self.position:
                        if "layer" not in captured:
                            raise RuntimeError(
                                f"decoder layer {to_layer - 1} was not called in the model's forward pass; the fast "
                                "engines need the layers to run in order. Use method='naive' for this model."
                            )
                        if self.structure is None:
                            self.structure = _OutputStructure(captured["layer"])
                        states[i] = self._store(self.structure.hidden(captured["layer"]))
                    if self.attention_name is not None:
                        head_outputs[i] = self._attention_output_is_projection(captured)
                        if head_outputs[i] is None:  # the block does more after its projection: never replay it
                            self.attention_name = None
                            head_outputs = [None] * len(self.batches)
        finally:
            for handle in handles:
                handle.remove()
        self.states, self.head_outputs, self.position = states, head_outputs, to_layer

    def _attention_output_is_projection(self, captured: dict) -> torch.Tensor | None:
        """The heads' outputs to cache, if the attention block returned exactly its projection's output."""
        if not {"heads", "projection", "attention"} <= set(captured):
            return None
        try:
            structure = _OutputStructure(captured["attention"])
        except TypeError:
            return None
        output = structure.hidden(captured["attention"])
        if output is not captured["projection"] and not torch.equal(output, captured["projection"]):
            return None
        self.attention_structure = structure
        return self._store(captured["heads"])

    def exact_layer(
        self, layer: int, candidates: Sequence[int], advance: Callable[[int], None] = lambda n: None
    ) -> torch.Tensor:
        """Per candidate head of `layer`: the sum of target-token losses with it masked (given the cached prefix)."""
        self._check_position(layer)
        sums = torch.zeros(len(candidates), dtype=torch.float64)
        for i, batch in enumerate(self.batches):
            rows, length = batch["input_ids"].shape
            budget = self.max_rows or len(candidates) * rows
            if self.max_rows is None and self.device.type == "cpu":
                # on a CPU, passes of a few thousand tokens run faster than one huge pass (caches)
                budget = min(budget, max(rows, CPU_TOKENS_PER_PASS // max(1, length)))
            while True:
                try:
                    with torch.no_grad():
                        sums += self._exact_batch(i, layer, candidates, budget)
                    break
                except _OOM:
                    if budget <= 1:
                        raise
                    budget = max(1, min(budget, len(candidates) * rows) // 2)
                    self.max_rows = budget  # later batches and layers start from the budget that fits
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
        batch, state, head_outputs = self.batches[index], self.states[index], self.head_outputs[index]
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
                source = None if state is None else _repeat(state[part], len(group))
                heads_source = None if head_outputs is None else _repeat(head_outputs[part], len(group))
                handle = add_head_mask(module, keep, self.arch.head_dim)
                try:
                    with self._replayed(layer, source, heads_source):
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
                with torch.enable_grad(), self._replayed(layer, self.states[i], self.head_outputs[i]):
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
