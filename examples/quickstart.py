"""HeadMap end to end: locate a task's knowledge circuit, fine-tune along it, compare with LoRA, save/reload/merge.

    python examples/quickstart.py                   # the embedded demo model (pretrained on first run, then cached)
    python examples/quickstart.py --model PATH_OR_ID
    python examples/quickstart.py --quick           # tiny settings: a smoke test in seconds

The task is question answering over the demo world's facts ("Q: Where does Alice Smith live? A:" -> " Paris"),
split into train and eval by person. The demo model learned the facts from declarative sentences only, so the
question format is new to it. Accuracy is exact match: the share of eval questions whose whole target is the
model's greedy continuation, computed in one teacher-forced pass (argmax at every target position).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

# idle OpenMP threads sleep instead of spinning: on shared or busy CPUs spinning slows small models down many
# times over (must be set before torch is imported; an explicit setting wins)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import headmap_peft  # noqa: F401  (registers the HeadMap tuner with PEFT)
from headmap_peft import locate_circuit, mask_heads, resolve_architecture, select_calibration_samples
from headmap_peft.demo import (
    DemoConfig,
    accuracy,
    default_model_path,
    fact_accuracy,
    finetune,
    is_cached,
    load_default_model,
    make_people,
    predictions,
    task_splits,
)
from headmap_peft.locate import ablation_table, random_heads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local path or hub id of a causal LM (default: the embedded demo model)")
    parser.add_argument("--output-dir", default="runs/quickstart", help="where the heatmap and adapter go")
    parser.add_argument("--cache-dir", help="demo model cache root (default: $HEADMAP_CACHE or ~/.cache/headmap_peft)")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (lowest loss)")
    parser.add_argument("--heads-per-layer", type=int, default=2, help="circuit heads per layer (k)")
    parser.add_argument("--rank", type=int, default=8, help="rank r of HeadMap and of LoRA")
    parser.add_argument("--steps", type=int, default=400, help="training steps for HeadMap and for LoRA")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate for both methods")
    parser.add_argument("--random-draws", type=int, default=3, help="random head sets in the ablation")
    parser.add_argument("--seed", type=int, default=0, help="task split and training seed")
    parser.add_argument("--quick", action="store_true", help="tiny settings (micro demo model, a few steps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.steps, args.random_draws = min(args.samples, 8), min(args.steps, 10), 1
    return args


def pct(value: float) -> str:
    return f"{value:.1%}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the output to this script's own progress bars
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    progress = not args.no_progress
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    def stage(number: int, text: str) -> None:
        print(f"[{number}/6] {text}  (at {time.perf_counter() - start:.0f}s)")

    # 1. Base model ------------------------------------------------------------------------------------------------
    stage(1, "base model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo_config = DemoConfig.micro() if args.quick else DemoConfig()
    if args.model:
        source = args.model
        tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        source = str(default_model_path(args.cache_dir, demo_config))
        if not is_cached(args.cache_dir, demo_config):
            print(f"  first run: pretraining the demo model into {source} (cached for later runs)")
        _, tokenizer = load_default_model(args.cache_dir, progress=progress, config=demo_config)

    def load_base():
        return AutoModelForCausalLM.from_pretrained(source).eval()

    model = load_base()
    arch = resolve_architecture(model)
    total_params = sum(p.numel() for p in model.parameters())
    print(f"  {source}: {arch.num_layers} layers x {arch.num_heads} heads, {total_params:,} parameters")

    # 2. Task -------------------------------------------------------------------------------------------------------
    stage(2, "task: question answering over the demo facts, split by person")
    splits = task_splits(seed=args.seed, config=demo_config)
    train, evaluation = list(splits["train"]), list(splits["eval"])
    print(f"  train {len(train)} questions, eval {len(evaluation)} questions about other people")
    print(f"  e.g. {evaluation[0]['prompt']!r} -> {evaluation[0]['target']!r}")

    # 3. Calibration, locating, ablation ----------------------------------------------------------------------------
    stage(3, f"locate the circuit: {args.samples} lowest-loss train samples, {args.heads_per_layer} head(s)/layer")
    t = time.perf_counter()
    calibration = select_calibration_samples(
        model, tokenizer, splits["train"], n=args.samples, batch_size=64, progress=progress
    )
    circuit = locate_circuit(
        model, calibration, heads_per_layer=args.heads_per_layer, tokenizer=tokenizer, batch_size=64, progress=progress
    )
    locate_seconds = time.perf_counter() - t
    heatmap = out / "circuit.png"
    circuit.plot(heatmap)
    circuit.save(out / "circuit.json")
    circuit_size = circuit.num_selected_heads
    total_heads = arch.num_layers * arch.num_heads
    print(f"  circuit ({circuit_size} of {total_heads} heads, located in {locate_seconds:.1f}s): {circuit.heads}")

    # the paper's evidence: masking the circuit hurts far more than masking as many random heads (same draws below)
    ablation = {
        name: ablation_table(
            model, data, circuit, draws=args.random_draws, seed=args.seed, tokenizer=tokenizer, batch_size=64
        )
        for name, data in (("eval", evaluation), ("calibration", calibration))
    }
    header = ["condition", "heads masked", "eval loss", "eval accuracy", "calibration accuracy"]
    recall = None
    if not args.model:  # the demo model also states its facts declaratively: does the circuit hold them?
        people = make_people(demo_config.num_people, demo_config.world_seed)
        rng = random.Random(args.seed)
        masks = [{}, circuit.heads] + [
            random_heads(circuit.heads, arch.num_heads, rng) for _ in range(args.random_draws)
        ]
        recall = []
        for heads in masks:
            with mask_heads(model, heads):
                recall.append(fact_accuracy(model, tokenizer, people))
        recall = recall[:2] + [statistics.fmean(recall[2:])]
        header.append("fact recall (declarative)")
    rows = []
    for i, (row, cal) in enumerate(zip(ablation["eval"], ablation["calibration"])):
        rows.append([row.condition, str(row.heads_masked), f"{row.loss:.3f}", pct(row.accuracy), pct(cal.accuracy)])
        if recall is not None:
            rows[-1].append(pct(recall[i]))
    print("\nAblation: exact match with heads masked (random: mean over the draws)")
    print(table(header, rows))

    # 4. HeadMap vs LoRA ---------------------------------------------------------------------------------------------
    print()
    stage(4, f"fine-tune HeadMap and LoRA: same data, {args.steps} steps, batch {args.batch_size}, lr {args.lr}")
    torch.manual_seed(args.seed)  # each adapter's initialisation depends on the seed only
    headmap = get_peft_model(load_base(), circuit.to_config(r=args.rank, task_type="CAUSAL_LM"))
    t = time.perf_counter()
    finetune(headmap, tokenizer, train, args.steps, args.batch_size, args.lr, args.seed, progress, "HeadMap")
    headmap_seconds = time.perf_counter() - t
    lora_targets = ["q_proj", "v_proj"] if any(n.endswith("q_proj") for n, _ in model.named_modules()) else None
    torch.manual_seed(args.seed)
    lora = get_peft_model(
        load_base(), LoraConfig(r=args.rank, target_modules=lora_targets, task_type="CAUSAL_LM")
    )  # target_modules=None: PEFT's default for the model family (q_proj/v_proj on Llama)
    t = time.perf_counter()
    finetune(lora, tokenizer, train, args.steps, args.batch_size, args.lr, args.seed, progress, "LoRA")
    lora_seconds = time.perf_counter() - t
    trainable = {
        name: sum(p.numel() for p in m.parameters() if p.requires_grad)
        for name, m in (("headmap", headmap), ("lora", lora))
    }
    results = {
        "base": accuracy(model, tokenizer, evaluation),
        "headmap": accuracy(headmap, tokenizer, evaluation),
        "lora": accuracy(lora, tokenizer, evaluation),
    }
    print(
        f"  eval accuracy: base {results['base']:.1%} -> HeadMap {results['headmap']:.1%}, LoRA {results['lora']:.1%}"
    )
    del lora

    # 5. Save, reload, merge: all three must predict exactly the same ------------------------------------------------
    stage(5, "save_pretrained, PeftModel.from_pretrained, merge_and_unload")
    adapter_dir = out / "headmap_adapter"
    headmap.save_pretrained(str(adapter_dir))
    reloaded = PeftModel.from_pretrained(load_base(), str(adapter_dir)).eval()
    merged = PeftModel.from_pretrained(load_base(), str(adapter_dir)).merge_and_unload().eval()
    trained_predictions = predictions(headmap, tokenizer, evaluation)
    encoded = tokenizer([r["prompt"] + r["target"] for r in evaluation[:32]], return_tensors="pt", padding=True)
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    with torch.no_grad():
        reference = headmap(**batch).logits
        gaps = {
            name: (m(**batch).logits - reference).abs().max().item()
            for name, m in (("reloaded", reloaded), ("merged", merged))
        }
    ok = True
    for name, m in (("reloaded", reloaded), ("merged", merged)):
        same = predictions(m, tokenizer, evaluation) == trained_predictions
        ok &= same
        verdict = "OK" if same else "MISMATCH"
        print(
            f"  check {name} == trained: {verdict} (identical predictions on {len(evaluation)} eval questions, "
            f"max |logit diff| {gaps[name]:.2e})"
        )

    # 6. Results ------------------------------------------------------------------------------------------------------
    print()
    stage(6, "results")
    circuit_desc = f"{circuit_size} heads"
    print(
        table(
            ["model", "trainable params", "eval accuracy", "train time"],
            [
                ["base (no fine-tuning)", "0", f"{results['base']:.1%}", "-"],
                [
                    f"LoRA r={args.rank} ({', '.join(lora_targets or ['PEFT default'])})",
                    f"{trainable['lora']:,}",
                    f"{results['lora']:.1%}",
                    f"{lora_seconds:.1f}s",
                ],
                [
                    f"HeadMap r={args.rank} (circuit, {circuit_desc})",
                    f"{trainable['headmap']:,}",
                    f"{results['headmap']:.1%}",
                    f"{headmap_seconds:.1f}s",
                ],
            ],
        )
    )
    summary = {
        "model": source,
        "circuit": {str(k): v for k, v in circuit.heads.items()},
        "ablation": {"columns": header, "rows": rows},
        "eval_accuracy": results,
        "trainable_parameters": trainable,
        "checks_passed": ok,
        "max_abs_logit_diff": gaps,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nheatmap: {heatmap}\ncircuit: {out / 'circuit.json'}")
    print(f"adapter: {adapter_dir}\nresults: {out / 'results.json'}")
    print(f"total {summary['seconds']:.0f}s")
    if not ok:
        print("FAILED: the reloaded or merged model does not predict what the trained model did", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
