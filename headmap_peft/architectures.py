"""Where the decoder layers, the attention output projection and the heads live, per model family.

One table (`ATTENTION_OUTPUT_MODULES`) maps a transformers ``model_type`` to the name of the attention output
projection inside a decoder layer. Everything else is read off the model itself: the decoder layers are the numbered
modules that hold that projection, the head count comes from the model config (or an override) and the head size
from the projection's input width. Both the locating pre-step and the adapter resolve models through
`resolve_architecture`, so a model is understood the same way by both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# model_type -> attention output projection, relative to one decoder layer. Its input is the concatenation of the
# query heads' outputs (head h owns columns [h * head_dim, (h + 1) * head_dim)).
ATTENTION_OUTPUT_MODULES: dict[str, str] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "phi3",
            "starcoder2",
            "olmo",
            "olmo2",
            "cohere",
            "granite",
            "smollm3",
            "stablelm",
        ],
        "self_attn.o_proj",
    ),
    "phi": "self_attn.dense",
    "gpt2": "attn.c_proj",
    "gpt_bigcode": "attn.c_proj",
    "gpt_neox": "attention.dense",
    "gptj": "attn.out_proj",
    "opt": "self_attn.out_proj",
    "falcon": "self_attention.dense",
    "bloom": "self_attention.dense",
}

OVERRIDE_HINT = (
    "pass the attention output projection's name inside a decoder layer and the number of query heads yourself, "
    "e.g. HeadMapConfig(..., attention_output_module='self_attn.o_proj', num_attention_heads=32) "
    "(locate_circuit takes the same two keyword arguments)"
)


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder as HeadMap sees it. Module names are relative to the model it was resolved on."""

    layers_name: str  # the ModuleList of decoder layers ("model.layers", "transformer.h", ...)
    attention_output_module: str  # projection name inside one decoder layer ("self_attn.o_proj", ...)
    num_layers: int
    num_heads: int
    head_dim: int

    def layer_name(self, layer: int) -> str:
        return f"{self.layers_name}.{layer}" if self.layers_name else str(layer)

    def attention_output_name(self, layer: int) -> str:
        return f"{self.layer_name(layer)}.{self.attention_output_module}"

    def layer_of(self, module_name: str) -> int | None:
        """The layer index whose attention output projection is called `module_name`, else None."""
        prefix = f"{self.layers_name}." if self.layers_name else ""
        if not module_name.startswith(prefix) or not module_name.endswith("." + self.attention_output_module):
            return None
        index = module_name[len(prefix) : -len(self.attention_output_module) - 1]
        return int(index) if index.isdigit() and int(index) < self.num_layers else None

    def decoder_layer(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.layer_name(layer))

    def attention_output(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.attention_output_name(layer))

    def check_heads(self, target_heads: dict[int, list[int]], what: str = "target_heads") -> None:
        """Raise a ValueError naming the first layer or head index this model does not have."""
        for layer, heads in target_heads.items():
            if not 0 <= layer < self.num_layers:
                raise ValueError(
                    f"{what} has layer {layer} but the model has {self.num_layers} layers "
                    f"(0..{self.num_layers - 1}); use layer indices in that range."
                )
            for head in heads:
                if not 0 <= head < self.num_heads:
                    raise ValueError(
                        f"{what} has head {head} in layer {layer} but the model has {self.num_heads} query heads "
                        f"per layer (0..{self.num_heads - 1}); use head indices in that range."
                    )


def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        # a PeftModel / BaseTuner forwards attribute access, but be explicit for plain wrappers
        inner = getattr(model, "model", None)
        config = getattr(inner, "config", None)
    return config


def _text_config(config):
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _in_features(module: nn.Module) -> int:
    base = module
    while hasattr(base, "base_layer"):  # a PEFT tuner layer wraps the projection
        base = base.base_layer
    if isinstance(base, nn.Linear):  # includes bitsandbytes Linear8bitLt / Linear4bit
        return base.in_features
    weight = getattr(base, "weight", None)
    if type(base).__name__ == "Conv1D" and weight is not None:  # transformers GPT-2 style, weight is [in, out]
        return weight.shape[0]
    raise TypeError(
        f"the attention output projection is a {type(base).__name__}, which HeadMap cannot read head slices from; "
        "supported are torch.nn.Linear, transformers Conv1D and bitsandbytes 8-bit/4-bit linear layers."
    )


def resolve_architecture(
    model: nn.Module,
    attention_output_module: str | None = None,
    num_attention_heads: int | None = None,
) -> Architecture:
    """Find the decoder layers, attention output projections, head count and head size of `model`.

    `attention_output_module` and `num_attention_heads` override the built-in table for models it does not know.
    """
    config = _model_config(model)
    text_config = _text_config(config)
    model_types = [getattr(c, "model_type", None) for c in (config, text_config) if c is not None]

    suffix = attention_output_module
    if suffix is None:
        suffix = next(
            (ATTENTION_OUTPUT_MODULES[t] for t in model_types if t in ATTENTION_OUTPUT_MODULES),
            None,
        )
    if suffix is None:
        known = ", ".join(sorted(ATTENTION_OUTPUT_MODULES))
        shown = model_types[0] if model_types else type(model).__name__
        raise ValueError(
            f"HeadMap does not know where the attention heads of model type {shown!r} live (known: {known}); "
            f"{OVERRIDE_HINT}."
        )

    pattern = re.compile(rf"^(?:(.*)\.)?(\d+)\.{re.escape(suffix)}$")
    groups: dict[str, dict[int, nn.Module]] = {}
    for name, module in model.named_modules():
        match = pattern.match(name)
        if match:
            groups.setdefault(match.group(1) or "", {})[int(match.group(2))] = module
    if not groups:
        raise ValueError(
            f"no module named '<layers>.<index>.{suffix}' was found in the model; {OVERRIDE_HINT} "
            "with the name your model uses."
        )
    expected_layers = getattr(text_config, "num_hidden_layers", None)
    if len(groups) > 1:
        matching = {k: v for k, v in groups.items() if len(v) == expected_layers}
        if len(matching) != 1:
            raise ValueError(
                f"several stacks of layers hold a '{suffix}' module ({sorted(groups)}); HeadMap needs exactly one. "
                f"Pass attention_output_module with a name that only the decoder's layers have."
            )
        groups = matching
    ((layers_name, modules),) = groups.items()
    num_layers = len(modules)
    if sorted(modules) != list(range(num_layers)):
        raise ValueError(f"the layers under {layers_name!r} are not numbered 0..{num_layers - 1}: {sorted(modules)}")

    num_heads = num_attention_heads
    if num_heads is None:
        num_heads = getattr(text_config, "num_attention_heads", None)
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(
            f"could not read the number of query heads from the model config (got {num_heads!r}); {OVERRIDE_HINT}."
        )
    width = _in_features(modules[0])
    if width % num_heads:
        raise ValueError(
            f"the attention output projection takes {width} features, which is not a multiple of "
            f"{num_heads} heads; check num_attention_heads."
        )
    return Architecture(
        layers_name=layers_name,
        attention_output_module=suffix,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=width // num_heads,
    )


def head_columns(heads: list[int] | tuple[int, ...], head_dim: int, device=None) -> torch.Tensor:
    """Indices of the columns of the attention output projection's input that belong to `heads`, in head order."""
    offsets = torch.arange(head_dim, device=device)
    starts = torch.as_tensor(list(heads), dtype=torch.long, device=device) * head_dim
    return (starts[:, None] + offsets[None, :]).reshape(-1)
