"""Speed of the locating engines against the plain loop, and how often the approximate ones pick the exact heads.

    python benchmarks/locate_speed.py                      # CPU, 8-layer model, the numbers in the issue note
    python benchmarks/locate_speed.py --device cuda        # on a GPU

Builds a Llama-style model from a config (8 layers, 8 heads, GQA), briefly trains it on a synthetic prompt/target
task so its heads do something (recall the prompt's first token after an end marker), then locates
its circuit with every engine over the same calibration batches and prints a markdown table: engine, wall time,
speed-up over the naive loop, and head overlap with the exact engine (the share of the exact circuit's
(layer, head) pairs the engine also selected). Each engine runs `--repeat` times, interleaved; the best wall and
CPU (process) times are reported. On a shared machine the CPU time is the steadier measure of the work done.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headmap_peft import locate_circuit
from headmap_peft.data import IGNORE_INDEX, pad_batch

MARKER = 3
ANSWERS = 16


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} thread(s) (torch {torch.__version__})"


def task_batches(n: int, batch_size: int, seq: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Prompts of random tokens ending in a marker; the target is the prompt's first token, one of `ANSWERS` tokens
    (a recall across the whole prompt, which some attention heads have to learn)."""
    gen = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq, (1,), generator=gen))
        prompt = torch.randint(4 + ANSWERS, vocab, (length,), generator=gen).tolist()
        prompt[0] = 4 + int(torch.randint(0, ANSWERS, (1,), generator=gen))
        ids = [1, *prompt, MARKER, prompt[0]]
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - 1) + [prompt[0]]})
    return [pad_batch(features[i : i + batch_size], 0, "right") for i in range(0, n, batch_size)]


def build_model(args) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        max_position_embeddings=4 * args.seq,
    )
    model = LlamaForCausalLM(config).to(args.device)
    if args.train_steps:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data = task_batches(args.train_steps * 32, 32, args.seq, args.vocab, seed=args.seed + 1)
        for step, batch in enumerate(data):
            loss = model(**{k: v.to(args.device) for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % 25 == 0 or step == len(data) - 1:
                print(f"  train step {step}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heads-per-layer", type=int, default=2)
    parser.add_argument("--shortlist", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"building and training the model ({args.train_steps} steps)...", flush=True)
    model = build_model(args)
    batches = task_batches(args.samples, args.batch_size, args.seq, args.vocab, seed=args.seed + 2)
    runs = [
        ("naive", dict(method="naive")),
        ("exact", dict(method="exact")),
        ("attribution", dict(method="attribution")),
        (f"shortlist (m={args.shortlist})", dict(method="shortlist", shortlist=args.shortlist)),
    ]
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    circuits = {}
    for _ in range(args.repeat):  # interleaved, so a busy spell on a shared machine hits every engine alike
        for name, options in runs:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            circuits[name] = locate_circuit(model, batches, args.heads_per_layer, progress=False, **options)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            wall[name] = min(wall.get(name, float("inf")), seconds)
            cpu[name] = min(cpu.get(name, float("inf")), cpu_seconds)
            print(f"  {name}: {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU", flush=True)
    results = {name: (wall[name], circuits[name]) for name, _ in runs}
    exact = results["exact"][1]
    exact_pairs = {(layer, h) for layer, heads in exact.heads.items() for h in heads}
    naive_time = results["naive"][0]
    print()
    print(f"machine: {machine(args.device)}")
    print(
        f"model: Llama-style, {args.layers} layers x {args.heads} heads (GQA {args.heads // 2} kv), hidden "
        f"{args.hidden}, vocab {args.vocab}, float32; {args.samples} calibration samples of <= {args.seq + 2} tokens "
        f"in batches of {args.batch_size}; {args.heads_per_layer} heads per layer"
    )
    print()
    print("| engine | wall time (s) | speed-up vs naive | CPU time (s) | CPU speed-up | head overlap with exact |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (seconds, circuit) in results.items():
        pairs = {(layer, h) for layer, heads in circuit.heads.items() for h in heads}
        overlap = len(pairs & exact_pairs) / len(exact_pairs)
        print(
            f"| {name} | {seconds:.2f} | {naive_time / seconds:.2f}x | {cpu[name]:.2f} | "
            f"{cpu['naive'] / cpu[name]:.2f}x | {overlap:.0%} |"
        )
    same = results["naive"][1].heads == exact.heads
    drift = (results["naive"][1].scores - exact.scores).abs().max().item()
    print(f"\nnaive and exact select the same heads in the same order: {same}; max score difference {drift:.2e}")


if __name__ == "__main__":
    main()
