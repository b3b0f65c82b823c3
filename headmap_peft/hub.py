"""Model cards for HeadMap adapters: the circuit summary PEFT's own card does not write."""

from __future__ import annotations

import os

from .config import HeadMapConfig

SECTION_HEADING = "## HeadMap circuit"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def circuit_summary(config: HeadMapConfig) -> str:
    """A markdown section describing the adapter's circuit and map."""
    heads = config.target_heads
    rows = "\n".join(f"| {layer} | {', '.join(map(str, layer_heads))} |" for layer, layer_heads in heads.items())
    return (
        f"{SECTION_HEADING}\n\n"
        f"This is a [HeadMap](https://openreview.net/forum?id=jUsrbOuQ5e) adapter (headmap-peft): the selected "
        f"attention heads of {_count(len(heads), 'layer')} ({_count(config.num_selected_heads, 'head')} in all) "
        f"are mapped into the "
        f"residual stream by two linear layers of rank {config.r} (scaling {config.scaling}, placement "
        f"`{config.placement}`). Load it with `import headmap_peft` before `PeftModel.from_pretrained`.\n\n"
        f"| layer | heads (in selection order) |\n|---:|---|\n{rows}\n"
    )


def update_model_card(output_dir: str, config: HeadMapConfig) -> str:
    """Add (or replace) the circuit section in the README.md that ``save_pretrained`` wrote; returns its path."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; call model.save_pretrained({output_dir!r}) first")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if SECTION_HEADING in text:
        start = text.index(SECTION_HEADING)
        end = text.find("\n## ", start + len(SECTION_HEADING))
        text = text[:start] + (text[end + 1 :] if end != -1 else "")
    text = text.rstrip("\n") + "\n\n" + circuit_summary(config)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
