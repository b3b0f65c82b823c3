"""The HeadMap adapter layer around an attention output projection."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import (
    BaseTunerLayer,
    _get_in_out_features,
    check_adapters_to_merge,
)
from peft.utils import resolve_quantization_backend
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from .architectures import head_columns


class HeadMapLayer(BaseTunerLayer):
    """State shared by HeadMap layers: per adapter, the selected heads, their map and where its output goes."""

    adapter_layer_names = ("headmap_down", "headmap_up")
    other_param_names = (
        "headmap_heads",
        "headmap_columns",
        "r",
        "scaling",
        "placement",
    )

    def __init__(self, base_layer: nn.Module, head_dim: int, **kwargs) -> None:
        self.base_layer = base_layer
        self.head_dim = head_dim
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.headmap_down = nn.ModuleDict({})
        self.headmap_up = nn.ModuleDict({})
        self.headmap_columns = BufferDict({}, persistent=False)
        self.headmap_heads: dict[str, list[int]] = {}
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.placement: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        # block_output placement: the delta waits here until the decoder layer's forward hook adds it
        self._block_delta: torch.Tensor | None = None
        self._block_hook: RemovableHandle | None = None

        base = self.get_base_layer()
        self.in_features, self.out_features = _get_in_out_features(base)
        if self.in_features is None or not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"HeadMap cannot wrap a {type(base).__name__}; supported attention output projections are "
                "torch.nn.Linear, transformers Conv1D and bitsandbytes Linear8bitLt / Linear4bit."
            )
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D stores its weight as [in, out]

    @property
    def base_has_bias(self) -> bool:
        return getattr(self.get_base_layer(), "bias", None) is not None

    def update_layer(
        self,
        adapter_name: str,
        heads: list[int],
        r: int,
        scaling: float,
        bias: bool | str,
        placement: str,
        init_weights: bool,
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        use_bias = self.base_has_bias if bias == "auto" else bool(bias)
        width = len(heads) * self.head_dim
        self.headmap_heads[adapter_name] = list(heads)
        self.headmap_columns[adapter_name] = head_columns(heads, self.head_dim)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = float(scaling)
        self.placement[adapter_name] = placement
        self.headmap_down[adapter_name] = nn.Linear(width, r, bias=use_bias)
        self.headmap_up[adapter_name] = nn.Linear(r, self.out_features, bias=use_bias)
        self.reset_headmap_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_headmap_parameters(self, adapter_name: str, init_weights: bool) -> None:
        down, up = self.headmap_down[adapter_name], self.headmap_up[adapter_name]
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        if down.bias is not None:
            bound = 1 / math.sqrt(down.in_features)
            nn.init.uniform_(down.bias, -bound, bound)
        if init_weights:
            nn.init.zeros_(up.weight)
            if up.bias is not None:
                nn.init.zeros_(up.bias)
        else:
            # random, clearly non-zero maps so that tests can see the adapter act
            nn.init.normal_(up.weight, std=1 / math.sqrt(up.in_features))
            if up.bias is not None:
                nn.init.normal_(up.bias, std=0.1)

    def map_heads(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``scaling * W_up(W_down(x_S))`` for the selected heads' slices x_S of the projection input `x`."""
        down = self.headmap_down[adapter_name]
        selected = x.index_select(-1, self.headmap_columns[adapter_name])
        selected = self._cast_input_dtype(selected, down.weight.dtype)
        return self.headmap_up[adapter_name](down(selected)) * self.scaling[adapter_name]

    def get_delta(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The exact change of the projection's weight ([out, in], float32) and bias ([out] or None)."""
        down, up = self.headmap_down[adapter_name], self.headmap_up[adapter_name]
        scale = self.scaling[adapter_name]
        up_w, down_w = up.weight.float(), down.weight.float()
        delta_w = torch.zeros(self.out_features, self.in_features, device=up_w.device, dtype=torch.float32)
        delta_w[:, self.headmap_columns[adapter_name].to(up_w.device)] = scale * (up_w @ down_w)
        delta_b = None
        if up.bias is not None:
            delta_b = scale * (up_w @ down.bias.float() + up.bias.float())
        return delta_w, delta_b

    def check_mergeable(self, adapter_name: str) -> None:
        """Raise a ValueError saying why `adapter_name` cannot be merged into this layer, if it cannot."""
        if self.placement[adapter_name] != "attention_output":
            raise ValueError(
                f"adapter {adapter_name!r} uses placement='block_output': its output is added after the MLP, so it "
                "cannot be folded into any existing weight. Use it unmerged (it works as is, and unload() removes "
                "it), or train with placement='attention_output' for a mergeable adapter."
            )
        if self.headmap_up[adapter_name].bias is not None and not self.base_has_bias:
            raise ValueError(
                f"adapter {adapter_name!r} has biases (bias=True) but the projection it maps into has none, so the "
                "merged bias would be lost when the merged model is saved and reloaded. Use the adapter unmerged, "
                "or train with bias='auto' (or False) for a mergeable adapter."
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.headmap_down]
        for name in adapter_names:
            self.check_mergeable(name)
        base = self.get_base_layer()
        for name in adapter_names:
            if self.quantization_backend is not None:
                warnings.warn(
                    "Merging a HeadMap adapter into a quantized layer dequantizes, adds and requantizes: "
                    "outputs can differ slightly by rounding.",
                    stacklevel=2,
                )
            delta_w, delta_b = self.get_delta(name)
            weight = self.get_base_weight()
            new_weight = (weight.float() + self._orient(delta_w).to(weight.device)).to(weight.dtype)
            new_bias = None
            if delta_b is not None:
                new_bias = (base.bias.data.float() + delta_b.to(base.bias.device)).to(base.bias.dtype)
            if safe_merge and not (
                torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
            ):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self.set_base_weight(new_weight)
            if new_bias is not None:
                base.bias.data = new_bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.headmap_down:
                continue
            delta_w, delta_b = self.get_delta(name)
            weight = self.get_base_weight()
            self.set_base_weight((weight.float() - self._orient(delta_w).to(weight.device)).to(weight.dtype))
            if delta_b is not None:
                base.bias.data = (base.bias.data.float() - delta_b.to(base.bias.device)).to(base.bias.dtype)

    def _orient(self, delta_w: torch.Tensor) -> torch.Tensor:
        return delta_w.T if self.fan_in_fan_out else delta_w

    # block_output placement ------------------------------------------------------------------------------------

    def attach_block_hook(self, block: nn.Module) -> None:
        """Add pending block_output deltas to `block`'s output (the decoder layer that holds this projection)."""
        if self._block_hook is None:
            self._block_hook = block.register_forward_hook(self._add_block_delta)

    def detach_block_hook(self) -> None:
        if self._block_hook is not None:
            self._block_hook.remove()
            self._block_hook = None
        self._block_delta = None

    def _add_block_delta(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        delta, self._block_delta = self._block_delta, None
        if delta is None:
            return output
        if torch.is_grad_enabled() and not delta.requires_grad and self._block_maps_need_grad():
            # transformers checkpoints a layer's forward, not its hooks: with reentrant checkpointing the delta was
            # computed under no_grad inside the checkpoint, and its gradient would silently be lost
            raise RuntimeError(
                "placement='block_output' does not work with reentrant gradient checkpointing (its gradient would be "
                "lost). Use model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
                "False}) (the transformers default), or placement='attention_output'."
            )
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype), *output[1:])
        return output + delta.to(output.dtype)

    def _block_maps_need_grad(self) -> bool:
        return any(
            p.requires_grad
            for name in self.active_adapters
            if self.placement.get(name) == "block_output"
            for p in self.headmap_up[name].parameters()
        )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if "block_output" not in self.placement.values():
            self.detach_block_hook()


class HeadMapLinear(nn.Module, HeadMapLayer):
    """HeadMap around a linear attention output projection: nn.Linear, transformers Conv1D, bitsandbytes 8/4-bit."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, head_dim: int, **kwargs) -> None:
        super().__init__()
        HeadMapLayer.__init__(self, base_layer, head_dim=head_dim)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        block_delta = None
        for name in self.active_adapters:
            if name not in self.headmap_down or name in self.merged_adapters:
                continue
            delta = self.map_heads(x, name)
            if self.placement[name] == "attention_output":
                result = result + delta.to(result.dtype)
            else:
                block_delta = delta if block_delta is None else block_delta + delta
        self._block_delta = block_delta
        return result

    def __repr__(self) -> str:
        return "headmap." + super().__repr__()
