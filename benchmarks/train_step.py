"""One training step, HeadMap vs LoRA (r=8 on q_proj+v_proj), on the same Llama-shaped model and batch.

    python benchmarks/train_step.py                          # CUDA if available, else CPU
    python benchmarks/train_step.py --device cpu --steps 10 --layers 8 --hidden 512
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --batch 8 --seq 512

A step is forward + backward + AdamW step + zero_grad on a fixed random batch; step time is the median of `--steps`
steps after `--warmup` steps. Each method runs in its own subprocess so that one's memory does not count for the
other. Peak memory: on CUDA, torch.cuda.max_memory_allocated during the steps minus the memory allocated before
them; on CPU, the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs just before the steps)
minus the resident set size before them. Both cover activations, gradients and optimizer state; the CPU figure also
includes allocator caching, so compare methods, not absolute numbers across devices.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch
from _bench_utils import (
    add_model_arguments,
    build_model,
    circuit,
    machine,
    markdown_table,
    median,
    model_line,
    random_batch,
    setup,
    timed,
)

METHODS = ("headmap", "lora")


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def attach(model: torch.nn.Module, method: str, args: argparse.Namespace) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    import headmap_peft  # noqa: F401  (registers the HeadMap tuner)
    from headmap_peft import HeadMapConfig

    if method == "headmap":
        config = HeadMapConfig(target_heads=circuit(args), r=args.rank, task_type="CAUSAL_LM")
    else:
        config = LoraConfig(r=args.rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def worker(method: str, args: argparse.Namespace) -> dict:
    """Measure `method` in this process; returns the numbers as a dict."""
    setup(args)
    model = attach(build_model(args), method, args)
    total = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = random_batch(args)
    model.train()

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        memory_method = "cuda max_memory_allocated"
    else:
        before = (_status_kib("VmRSS") or 0) * 1024
        memory_method = "peak RSS (VmHWM reset)" if _reset_peak_rss() else "peak RSS (ru_maxrss, not reset)"
    times = [timed(step, args.device) for _ in range(args.warmup + args.steps)][args.warmup :]
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        hwm = _status_kib("VmHWM")
        if hwm is None:  # not Linux: the lifetime peak, which may include model construction
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = hwm * 1024 - before
    return {
        "method": method,
        "trainable": trainable,
        "total": total,
        "step_s": times,
        "peak_bytes": peak,
        "memory_method": memory_method,
        "machine": machine(args.device),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate the methods' subprocesses this often (evens out a busy machine)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    passthrough = list(argv if argv is not None else sys.argv[1:])
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.rounds):
        for method in args.methods:
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", method],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = [
        dict(
            rs[0],
            step_median_s=median([t for r in rs for t in r["step_s"]]),
            step_min_s=min(t for r in rs for t in r["step_s"]),
            peak_bytes=max(r["peak_bytes"] for r in rs),
        )
        for rs in runs.values()
    ]

    rows = [
        [
            "HeadMap" if r["method"] == "headmap" else "LoRA",
            f"{r['trainable']:,}",
            f"{100 * r['trainable'] / r['total']:.3f}%",
            f"{1000 * r['step_median_s']:.1f}",
            f"{1000 * r['step_min_s']:.1f}",
            f"{r['peak_bytes'] / 2**20:.1f}",
        ]
        for r in results
    ]
    print(f"Machine: {results[0]['machine']}")
    print(f"Model: {model_line(args)}")
    print(
        f"Step = forward + backward + AdamW; median and min of {args.steps} steps after {args.warmup} warmup "
        f"(x {args.rounds} alternating rounds of subprocesses); "
        f"memory = {results[0]['memory_method']} during the steps, minus the memory before them (max over rounds).\n"
    )
    header = ["method", "trainable params", "of model", "step ms (median)", "step ms (min)", "peak memory MiB"]
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
