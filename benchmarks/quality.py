"""Eval accuracy on the quickstart task: no fine-tuning, LoRA, HeadMap on the located circuit, HeadMap on as many
random heads (the paper's control), over several seeds; prints a markdown table with the machine it ran on.

    python benchmarks/quality.py                 # the embedded demo model, 3 seeds
    python benchmarks/quality.py --quick         # micro model, a smoke run

Each seed draws its own train/eval split of people, calibration set, circuit, random heads and training batches;
LoRA and both HeadMap runs of a seed see the same batches in the same order. Accuracy is exact match (the greedy
continuation equals the target), computed in one teacher-forced pass.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
import warnings

# idle OpenMP threads sleep instead of spinning: on shared or busy CPUs spinning slows small models down many
# times over (must be set before torch is imported; an explicit setting wins)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model

import headmap_peft
from headmap_peft import HeadMapConfig, locate_circuit, resolve_architecture, select_calibration_samples
from headmap_peft.demo import DemoConfig, accuracy, finetune, load_default_model, task_splits
from headmap_peft.locate import random_heads

METHODS = ("no fine-tuning", "LoRA (q_proj, v_proj)", "HeadMap, located circuit", "HeadMap, random heads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (lowest loss)")
    parser.add_argument("--heads-per-layer", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--cache-dir", help="demo model cache root (default: $HEADMAP_CACHE or ~/.cache/headmap_peft)")
    parser.add_argument("--quick", action="store_true", help="micro demo model and a few steps (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.samples, args.steps = min(args.seeds, 2), min(args.samples, 8), min(args.steps, 5)
    return args


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_seed(args: argparse.Namespace, seed: int, demo_config: DemoConfig) -> dict[str, tuple[float, int, str]]:
    """{method: (eval accuracy, trainable parameters, note)} for one seed."""
    model, tokenizer = load_default_model(args.cache_dir, progress=False, config=demo_config)
    arch = resolve_architecture(model)
    splits = task_splits(seed=seed, config=demo_config)
    train, evaluation = list(splits["train"]), list(splits["eval"])
    calibration = select_calibration_samples(
        model, tokenizer, splits["train"], n=args.samples, batch_size=64, progress=False
    )
    circuit = locate_circuit(
        model, calibration, heads_per_layer=args.heads_per_layer, tokenizer=tokenizer, batch_size=64, progress=False
    )
    control = random_heads(circuit.heads, arch.num_heads, random.Random(seed))
    results = {METHODS[0]: (accuracy(model, tokenizer, evaluation), 0, "")}
    configs = {
        METHODS[1]: LoraConfig(r=args.rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        METHODS[2]: HeadMapConfig(target_heads=circuit.heads, r=args.rank, task_type="CAUSAL_LM"),
        METHODS[3]: HeadMapConfig(target_heads=control, r=args.rank, task_type="CAUSAL_LM"),
    }
    notes = {METHODS[2]: str(circuit.heads), METHODS[3]: str(control)}
    for method, config in configs.items():
        fresh, _ = load_default_model(args.cache_dir, progress=False, config=demo_config)
        torch.manual_seed(seed)  # the adapter's initialisation depends on the seed only
        tuned = get_peft_model(fresh, config)
        finetune(tuned, tokenizer, train, args.steps, args.batch_size, args.lr, seed, progress=False)
        results[method] = (accuracy(tuned, tokenizer, evaluation), trainable(tuned), notes.get(method, ""))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    demo_config = DemoConfig.micro() if args.quick else DemoConfig()
    load_default_model(args.cache_dir, progress=True, config=demo_config)  # build once if not cached (not timed)
    start = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        per_seed.append(run_seed(args, seed, demo_config))
        print(f"seed {seed}: " + ", ".join(f"{m} {r[0]:.1%}" for m, r in per_seed[-1].items()), file=sys.stderr)
    seconds = time.perf_counter() - start

    print(f"## Quality on the quickstart task ({args.seeds} seeds)\n")
    print(
        f"Demo model: {demo_config.num_layers} layers x {demo_config.num_heads} heads, "
        f"hidden {demo_config.hidden_size}; {args.heads_per_layer} heads/layer in the circuit; r={args.rank}; "
        f"{args.steps} steps, batch {args.batch_size}, lr {args.lr}, same for every method; "
        f"{args.samples} calibration samples.\n"
    )
    print("| method | trainable params | eval accuracy (mean ± std) | per seed |")
    print("|---|---:|---:|---|")
    for method in METHODS:
        values = [r[method][0] for r in per_seed]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        params = per_seed[0][method][1]
        cells = ", ".join(f"{v:.1%}" for v in values)
        print(f"| {method} | {params:,} | {statistics.fmean(values):.1%} ± {spread:.1%} | {cells} |")
    print()
    for seed, result in enumerate(per_seed):
        print(f"- seed {seed}: circuit {result[METHODS[2]][2]}, random heads {result[METHODS[3]][2]}")
    print(
        f"\nMachine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"peft {peft.__version__}, headmap-peft {headmap_peft.__version__}. Wall time {seconds:.0f}s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
