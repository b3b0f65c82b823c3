"""The embedded default model: pretrained once on first use, cached in the user's cache directory, reused after."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from .corpus import QUESTIONS, TEMPLATES, VALUES, make_people, vocabulary
from .pretrain import DemoConfig, fact_accuracy, pretrain
from .tokenizer import build_tokenizer

#: bump when the pretraining recipe changes in a way the config does not capture
RECIPE_VERSION = 1
CACHE_ENV = "HEADMAP_CACHE"
MARKER = "demo.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where demo models live: `cache_dir`, else ``$HEADMAP_CACHE``, else ``$XDG_CACHE_HOME/headmap_peft``
    (``~/.cache/headmap_peft``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "headmap_peft"


def version_hash(config: DemoConfig) -> str:
    """A short hash of everything that determines the demo model: config, corpus content and recipe version."""
    payload = json.dumps(
        {
            "config": config.to_dict(),
            "recipe": RECIPE_VERSION,
            "vocabulary": vocabulary(),
            "templates": TEMPLATES,
            "values": VALUES,
            "questions": QUESTIONS,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_model_path(cache_dir: str | os.PathLike | None = None, config: DemoConfig | None = None) -> Path:
    """The directory the demo model of `config` is (or will be) saved in: ``<cache root>/demo-<hash>``."""
    config = config or DemoConfig()
    return cache_root(cache_dir) / f"demo-{version_hash(config)}"


def is_cached(cache_dir: str | os.PathLike | None = None, config: DemoConfig | None = None) -> bool:
    """Whether the demo model of `config` is already built in the cache."""
    return (default_model_path(cache_dir, config) / MARKER).is_file()


def build_default_model(
    cache_dir: str | os.PathLike | None = None, config: DemoConfig | None = None, progress: bool = True
) -> Path:
    """Pretrain the demo model and save it (model, tokenizer, ``demo.json``) atomically; returns its directory.

    The model is written to a temporary directory next to the final one and renamed into place, so an interrupted
    build leaves no half-written model behind and concurrent builds settle on one copy.
    """
    config = config or DemoConfig()
    final = default_model_path(cache_dir, config)
    if (final / MARKER).is_file():
        return final
    if final.exists():
        raise FileExistsError(
            f"{final} exists but holds no complete demo model ({MARKER} is missing); delete it and run again"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    people = make_people(config.num_people, config.world_seed)
    start = time.perf_counter()
    model = pretrain(config, tokenizer, people, progress=progress)
    seconds = time.perf_counter() - start
    info = {
        "config": config.to_dict(),
        "recipe": RECIPE_VERSION,
        "pretrain_seconds": round(seconds, 1),
        "fact_accuracy_seen_phrasings": round(fact_accuracy(model, tokenizer, people, held_out=False), 4),
        "fact_accuracy_held_out_phrasings": round(fact_accuracy(model, tokenizer, people, held_out=True), 4),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():  # not a concurrent build that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_default_model(
    cache_dir: str | os.PathLike | None = None, progress: bool = True, config: DemoConfig | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The demo model and its tokenizer, pretrained on first use (a few minutes on 2 CPU cores) and cached after.

    `cache_dir` overrides the cache root (else ``$HEADMAP_CACHE``, else ``~/.cache/headmap_peft``); `config` picks
    another size (tests use a micro one). The model is returned in eval mode.
    """
    path = build_default_model(cache_dir, config, progress)
    model = LlamaForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def demo_info(path: str | os.PathLike) -> dict:
    """The build record (config, pretraining time, fact recall) stored next to a cached demo model."""
    return json.loads((Path(path) / MARKER).read_text())
