"""`Circuit`: the located heads, their scores, the model shape and settings; saved as versioned JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import resolve_architecture
from ..config import HeadMapConfig, normalize_target_heads

FORMAT = "headmap-peft circuit"
VERSION = 1


@dataclass
class Circuit:
    """A located knowledge circuit.

    Attributes:
        heads: ``{layer: [heads]}``, each layer's heads in the order they were selected (highest loss first).
        scores: float32 tensor ``[num_layers, num_heads]``: the calibration loss with that head masked, given the
            heads selected in earlier layers. NaN where a head was not evaluated: layers outside the searched
            ``layers``, and heads off the shortlist of ``method="shortlist"``. For ``method="attribution"`` they are
            first-order estimates of that loss.
        model: the shape of the model it was located on (``num_layers``, ``num_heads``, ``head_dim``,
            ``model_type``, ``attention_output_module``, ``num_attention_heads`` override).
        settings: how it was located (method, heads_per_layer, layers, data size and digest, ...).
    """

    heads: dict[int, list[int]]
    scores: torch.Tensor
    model: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = normalize_target_heads(self.heads, what="circuit heads")
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32)
        for key in ("num_layers", "num_heads", "head_dim"):
            value = self.model.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"circuit model.{key} must be a positive integer, got {value!r}")
        shape = (self.num_layers, self.num_heads)
        if tuple(self.scores.shape) != shape:
            raise ValueError(f"circuit scores have shape {tuple(self.scores.shape)}, expected {shape} (layers, heads)")
        for layer, heads in self.heads.items():
            if layer >= self.num_layers or any(h >= self.num_heads for h in heads):
                raise ValueError(
                    f"circuit heads {{{layer}: {heads}}} do not fit the recorded model shape "
                    f"({self.num_layers} layers x {self.num_heads} heads)"
                )

    @property
    def num_layers(self) -> int:
        return self.model["num_layers"]

    @property
    def num_heads(self) -> int:
        return self.model["num_heads"]

    @property
    def num_selected_heads(self) -> int:
        return sum(len(h) for h in self.heads.values())

    def __repr__(self) -> str:
        method = self.settings.get("method", "?")
        return (
            f"Circuit({self.num_selected_heads} heads in {len(self.heads)} of {self.num_layers} layers, "
            f"method={method!r}, heads={self.heads})"
        )

    def check_model(self, model: nn.Module) -> None:
        """Raise a ValueError if `model`'s shape (layers, heads, head size) differs from the one it was located on."""
        arch = resolve_architecture(
            model, self.model.get("attention_output_module"), self.model.get("num_attention_heads")
        )
        mine = (self.num_layers, self.num_heads, self.model["head_dim"])
        theirs = (arch.num_layers, arch.num_heads, arch.head_dim)
        if mine != theirs:
            source = self.model.get("name_or_path") or self.model.get("model_type") or "another model"
            raise ValueError(
                f"this circuit was located on {source!r} with {mine[0]} layers x {mine[1]} heads of size {mine[2]}, "
                f"but the model has {theirs[0]} layers x {theirs[1]} heads of size {theirs[2]}; "
                "locate a circuit for this model with headmap_peft.locate_circuit"
            )

    def to_config(self, **kwargs: Any) -> HeadMapConfig:
        """A `HeadMapConfig` with ``target_heads`` set to this circuit (other fields from `kwargs`)."""
        if "target_heads" in kwargs:
            raise TypeError("to_config sets target_heads from the circuit; do not pass it")
        for key in ("attention_output_module", "num_attention_heads"):
            if self.model.get(key) is not None:
                kwargs.setdefault(key, self.model[key])
        return HeadMapConfig(target_heads={k: list(v) for k, v in self.heads.items()}, **kwargs)

    # ---- JSON ----------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        scores = [[None if math.isnan(v) else v for v in row] for row in self.scores.tolist()]
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": dict(self.model),
            "heads": {str(k): list(v) for k, v in self.heads.items()},
            "scores": scores,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "circuit") -> Circuit:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f'{source} is not a HeadMap circuit (no "format": {FORMAT!r}); write one with Circuit.save or '
                "`headmap locate`"
            )
        version = data.get("version")
        if not isinstance(version, int) or version > VERSION or version < 1:
            raise ValueError(
                f"{source} has circuit format version {version!r}, this headmap-peft reads version 1..{VERSION}; "
                "upgrade headmap-peft to read newer files"
            )
        missing = [k for k in ("model", "heads", "scores") if k not in data]
        if missing:
            raise ValueError(f"{source} is missing {missing}; the file is damaged, locate the circuit again")
        try:
            scores = torch.tensor(
                [[math.nan if v is None else float(v) for v in row] for row in data["scores"]], dtype=torch.float32
            )
            return cls(
                heads=data["heads"],
                scores=scores,
                model=dict(data["model"]),
                settings=dict(data.get("settings") or {}),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source} is not a valid HeadMap circuit: {error}") from error

    def save(self, path: str | os.PathLike) -> None:
        """Write the circuit as JSON (atomically: a temporary file replaced into place)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> Circuit:
        """Read a circuit written by `save`; with `model`, also check that it fits that model's shape."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{os.fspath(path)} is not valid JSON ({error}); is it a HeadMap circuit file?") from None
        circuit = cls.from_dict(data, source=os.fspath(path))
        if model is not None:
            circuit.check_model(model)
        return circuit

    # ---- plot -------------------------------------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Save a layers x heads heatmap of the scores with the selected heads marked by their selection rank."""
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "Circuit.plot needs matplotlib, which is not installed: pip install matplotlib "
                "(or pip install 'headmap-peft[plot]')"
            ) from error
        import matplotlib
        from matplotlib.patches import Rectangle

        scores = self.scores.numpy()
        width = min(5 + 0.3 * self.num_heads, 24)
        height = min(2.5 + 0.25 * self.num_layers, 24)
        fig = Figure(figsize=(width, height), layout="constrained")
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        image = ax.imshow(scores, aspect="auto", cmap=cmap, interpolation="nearest", origin="lower")
        fig.colorbar(image, ax=ax, label="loss with the head masked")
        small = self.num_layers * self.num_heads <= 1024
        for layer, heads in self.heads.items():
            for rank, head in enumerate(heads, start=1):
                ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
                if small:
                    ax.text(head, layer, str(rank), ha="center", va="center", color="white", fontsize=7)
        step = max(1, self.num_heads // 16), max(1, self.num_layers // 16)
        ax.set_xticks(range(0, self.num_heads, step[0]))
        ax.set_yticks(range(0, self.num_layers, step[1]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        method = self.settings.get("method", "?")
        k = self.settings.get("heads_per_layer", "?")
        ax.set_title(
            title or f"HeadMap circuit: {method}, {k} heads per layer\n(red: selected, number: selection order)",
            fontsize=10,
        )
        fig.savefig(os.fspath(path), dpi=120)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON to a temporary file next to `path`, then move it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
