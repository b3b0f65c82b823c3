"""HeadMapConfig: the PEFT configuration of a HeadMap adapter."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._registry import HEADMAP

PLACEMENTS = ("attention_output", "block_output")


def _as_index(value, what: str) -> int:
    """An int from an int or (JSON keys are strings) a string of digits; anything else is a TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    try:  # numpy / torch integer scalars
        import operator

        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


def normalize_target_heads(
    target_heads, *, allow_empty: bool = False, what: str = "target_heads"
) -> dict[int, list[int]]:
    """Validate ``{layer: [heads]}`` and return it with int keys in increasing order and heads in the given order."""
    if not isinstance(target_heads, Mapping):
        raise TypeError(
            f"{what} must be a mapping from layer index to a list of head indices, e.g. {{3: [0, 5]}}; "
            f"got {type(target_heads).__name__}"
        )
    if not target_heads and not allow_empty:
        raise ValueError(f"{what} is empty: give at least one layer with its heads, e.g. {{3: [0, 5]}}")
    result: dict[int, list[int]] = {}
    for key, heads in target_heads.items():
        layer = _as_index(key, f"{what} layer index {key!r}")
        if layer < 0:
            raise ValueError(f"{what} has layer {layer}; layer indices start at 0")
        if layer in result:
            raise ValueError(f"{what} names layer {layer} twice (as {key!r}); give each layer once")
        if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
            raise TypeError(f"{what}[{layer}] must be a list of head indices, got {heads!r}")
        head_list = [_as_index(h, f"{what}[{layer}] head index {h!r}") for h in heads]
        if not head_list and not allow_empty:
            raise ValueError(f"{what}[{layer}] is empty: give it at least one head or leave layer {layer} out")
        if any(h < 0 for h in head_list):
            raise ValueError(f"{what}[{layer}] has a negative head index: {head_list}; head indices start at 0")
        if len(set(head_list)) != len(head_list):
            duplicates = sorted({h for h in head_list if head_list.count(h) > 1})
            raise ValueError(f"{what}[{layer}] lists head(s) {duplicates} more than once: {head_list}")
        result[layer] = head_list
    return dict(sorted(result.items()))


@dataclass
class HeadMapConfig(PeftConfig):
    """Configuration of a HeadMap adapter (ICLR 2025): map a few attention heads per layer into the residual stream.

    For every layer ``l`` in `target_heads`, the selected heads' slices ``x_l`` of the attention output projection's
    input are mapped by ``delta_l = scaling * W_up(W_down(x_l))`` (``W_down: k * head_dim -> r``,
    ``W_up: r -> hidden``) and added to the attention output (`placement="attention_output"`, mergeable) or to the
    decoder layer's output (`placement="block_output"`, not mergeable).

    Args:
        target_heads: The circuit, ``{layer index: [head indices]}`` (e.g. from `locate_circuit`).
        r: Rank of the map.
        scaling: Constant factor ``s`` on the map's output.
        bias: Whether the two maps have biases. ``"auto"`` (default) gives them biases exactly when the attention
            output projection has one, so the adapter always merges (Llama's o_proj has none, GPT-2's c_proj has
            one). ``True`` trains biases anyway; such an adapter on a bias-less projection cannot be merged, since the
            merged bias would be dropped when the merged model is saved and reloaded.
        placement: ``"attention_output"`` or ``"block_output"`` (see above).
        init_weights: ``True`` starts as the identity (W_up zero). ``False`` starts from random non-zero maps, for
            tests of merge, unload and disable.
        attention_output_module: Override for models the built-in table does not know: the attention output
            projection's name inside one decoder layer, e.g. ``"self_attn.o_proj"``.
        num_attention_heads: Override for the number of query heads per layer.
        modules_to_save: Modules besides the adapter to train and save, as in other PEFT methods.
    """

    target_heads: dict[int, list[int]] = field(
        default=None, metadata={"help": "The circuit: {layer index: [head indices]}."}
    )
    r: int = field(default=8, metadata={"help": "Rank of the head map."})
    scaling: float = field(default=1.0, metadata={"help": "Constant scaling s of the map's output."})
    bias: bool | Literal["auto"] = field(
        default="auto",
        metadata={"help": "Biases on W_down/W_up: True, False or 'auto' (only where the projection has a bias)."},
    )
    placement: Literal["attention_output", "block_output"] = field(
        default="attention_output",
        metadata={"help": "Where the map's output is added: 'attention_output' (mergeable) or 'block_output'."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: start as the identity; False: random maps (for tests)."},
    )
    attention_output_module: str | None = field(
        default=None,
        metadata={"help": "Override: the attention output projection's name inside a decoder layer."},
    )
    num_attention_heads: int | None = field(
        default=None,
        metadata={"help": "Override: the number of query heads per layer."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the adapter to set as trainable and save."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HEADMAP
        if self.target_heads is None:
            raise ValueError(
                "HeadMapConfig needs target_heads, the circuit as {layer: [heads]}; find one with "
                "headmap_peft.locate_circuit(model, batches).to_config(...) or give it by hand."
            )
        self.target_heads = normalize_target_heads(self.target_heads)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if (
            isinstance(self.scaling, bool)
            or not isinstance(self.scaling, (int, float))
            or not math.isfinite(self.scaling)
        ):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")
        if self.bias not in (True, False, "auto") or not isinstance(self.bias, (bool, str)):
            raise ValueError(f"bias must be True, False or 'auto', got {self.bias!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.attention_output_module is not None and (
            not isinstance(self.attention_output_module, str) or not self.attention_output_module
        ):
            raise ValueError(
                f"attention_output_module must be a module name such as 'self_attn.o_proj', "
                f"got {self.attention_output_module!r}"
            )
        if self.num_attention_heads is not None and (
            isinstance(self.num_attention_heads, bool)
            or not isinstance(self.num_attention_heads, int)
            or self.num_attention_heads < 1
        ):
            raise ValueError(f"num_attention_heads must be an integer >= 1, got {self.num_attention_heads!r}")

    @property
    def target_modules(self) -> None:
        # PEFT's injection reads `target_modules`; HeadMap targets modules through `target_heads` instead.
        return None

    @property
    def num_selected_heads(self) -> int:
        return sum(len(heads) for heads in self.target_heads.values())
