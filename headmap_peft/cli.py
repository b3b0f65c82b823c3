"""`headmap` command line: locate a circuit, ablate it, plot it.

```
headmap locate --model MODEL --data train.jsonl --samples 256 --heads-per-layer 8 --output circuit.json
headmap ablate --model MODEL --data test.jsonl --circuit circuit.json --draws 5
headmap plot   --circuit circuit.json --output heatmap.png
```
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DTYPES = ("auto", "float32", "bfloat16", "float16")


class CommandError(Exception):
    """A usage error the command reports in one line (exit status 2)."""


def _layers(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                first, last = part.split("-", 1)
                layers.extend(range(int(first), int(last) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes indices and ranges like '0-3,7', got {text!r}") from None
    return layers


def load_records(path: str, split: str = "train", prompt_field: str = "prompt", target_field: str = "target"):
    """A ``datasets.Dataset`` read from a json/jsonl/csv/parquet file, checked for the prompt and target fields."""
    file = Path(path)
    kind = DATA_FORMATS.get(file.suffix.lower())
    if kind is None:
        raise CommandError(f"--data {path!r}: unknown file type {file.suffix!r}; use one of {sorted(DATA_FORMATS)}")
    if not file.is_file():
        raise CommandError(f"--data {path!r}: no such file")
    import datasets

    records = []
    if file.stat().st_size:
        try:
            records = datasets.load_dataset(kind, data_files=str(file), split=split)
        except Exception as error:  # datasets raises many kinds for a malformed file
            cause = error.__cause__ or error
            raise CommandError(f"--data {path!r} cannot be read as {kind}: {type(cause).__name__}: {cause}") from None
    if len(records) == 0:
        raise CommandError(f"--data {path!r} holds no records; give a file with at least one prompt/target record")
    missing = [f for f in (prompt_field, target_field) if f not in records.column_names]
    if missing:
        raise CommandError(
            f"--data {path!r} has no field(s) {missing} (it has {records.column_names}); "
            "set --prompt-field/--target-field"
        )
    return records


def load_model(args: argparse.Namespace):
    """Model and tokenizer from a local path or hub id, as the options ask."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if args.dtype != "auto":
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.device_map:
        kwargs["device_map"] = args.device_map
    if args.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if not args.device_map and not args.load_in_8bit and args.device:
        model = model.to(args.device)
    return model.eval(), tokenizer


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="model path or hub id (AutoModelForCausalLM)")
    group.add_argument("--tokenizer", help="tokenizer path or hub id (default: --model)")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: as saved)")
    group.add_argument("--device", help="device to move the model to, e.g. cuda (default: where it loads)")
    group.add_argument("--device-map", help="accelerate device_map for from_pretrained, e.g. auto")
    group.add_argument("--load-in-8bit", action="store_true", help="load the model 8-bit with bitsandbytes")
    group.add_argument("--attention-output-module", help="override: attention output projection inside a layer")
    group.add_argument("--num-attention-heads", type=int, help="override: query heads per layer")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, help="json, jsonl, csv or parquet file of prompt/target records")
    group.add_argument("--split", default="train", help="split to read (default: train)")
    group.add_argument("--prompt-field", default="prompt")
    group.add_argument("--target-field", default="target")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--max-length", type=int, help="cut prompts from the left to this many tokens in all")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headmap", description="HeadMap: locate, ablate and plot a model's knowledge circuit."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    locate = commands.add_parser("locate", help="locate the knowledge circuit (the pre-step of HeadMap fine-tuning)")
    _add_model_options(locate)
    _add_data_options(locate)
    search = locate.add_argument_group("search")
    search.add_argument("--samples", type=int, default=256, help="calibration samples (default: 256, as the paper)")
    search.add_argument(
        "--selection",
        choices=("lowest-loss", "first"),
        default="lowest-loss",
        help="which samples: the lowest-loss ones of the unmodified model (the paper) or the first ones",
    )
    search.add_argument("--heads-per-layer", type=int, default=8)
    search.add_argument("--engine", choices=("exact", "naive", "attribution", "shortlist"), default="exact")
    search.add_argument("--shortlist", type=int, help="candidates per layer for --engine shortlist")
    search.add_argument("--layers", type=_layers, help="layers to search, e.g. '0-15' (default: all)")
    search.add_argument("--max-rows-per-pass", type=int, help="memory budget: sequences per forward pass")
    search.add_argument("--checkpoint", help="JSON checkpoint written after each layer; a rerun resumes from it")
    search.add_argument("--output", required=True, help="where to write the circuit (JSON)")
    search.add_argument("--plot", help="also write a heatmap PNG here")

    ablate = commands.add_parser("ablate", help="loss and exact match with no heads, the circuit, random heads masked")
    _add_model_options(ablate)
    _add_data_options(ablate)
    ablate.add_argument("--circuit", required=True, help="circuit JSON from `headmap locate`")
    ablate.add_argument("--samples", type=int, help="evaluate the first N records (default: all)")
    ablate.add_argument("--draws", type=int, default=5, help="random head sets to average over (default: 5)")
    ablate.add_argument("--seed", type=int, default=0)

    plot = commands.add_parser("plot", help="heatmap of a circuit's scores with the selected heads marked")
    plot.add_argument("--circuit", required=True, help="circuit JSON from `headmap locate`")
    plot.add_argument("--output", required=True, help="PNG path")
    plot.add_argument("--title")
    return parser


def _check_output(path: str, option: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise CommandError(f"{option} {path!r}: the folder {str(parent)!r} does not exist")


def _positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise CommandError(f"{option} must be >= 1, got {value}")


def run_locate(args: argparse.Namespace) -> int:
    from .locate import locate_circuit, select_calibration_samples
    from .locate.search import check_search_arguments

    _check_output(args.output, "--output")
    if args.plot:
        _check_output(args.plot, "--plot")
    _positive(args.samples, "--samples")
    _positive(args.batch_size, "--batch-size")
    records = load_records(args.data, args.split, args.prompt_field, args.target_field)
    model, tokenizer = load_model(args)
    search_options = dict(
        layers=args.layers,
        method=args.engine,
        shortlist=args.shortlist,
        max_rows_per_pass=args.max_rows_per_pass,
        attention_output_module=args.attention_output_module,
        num_attention_heads=args.num_attention_heads,
    )
    check_search_arguments(model, args.heads_per_layer, **search_options)  # fail before the slow sample scoring
    data_options = dict(
        prompt_field=args.prompt_field,
        target_field=args.target_field,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    if args.selection == "lowest-loss":
        if args.samples > len(records):
            print(f"--samples {args.samples}: the data has {len(records)} records; using all", file=sys.stderr)
        samples = select_calibration_samples(
            model, tokenizer, records, n=min(args.samples, len(records)), progress=not args.no_progress, **data_options
        )
    else:
        samples = records.select(range(min(args.samples, len(records))))
    circuit = locate_circuit(
        model,
        samples,
        args.heads_per_layer,
        tokenizer=tokenizer,
        checkpoint=args.checkpoint,
        progress=not args.no_progress,
        **search_options,
        **data_options,
    )
    circuit.save(args.output)
    if args.plot:
        circuit.plot(args.plot)
    print(f"{circuit.num_selected_heads} heads in {len(circuit.heads)} layers, written to {args.output}")
    for layer, heads in circuit.heads.items():
        print(f"  layer {layer}: {heads}")
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from .locate import Circuit, ablation_table, format_ablation_table

    _positive(args.samples, "--samples")
    _positive(args.draws, "--draws")
    _positive(args.batch_size, "--batch-size")
    circuit = Circuit.load(args.circuit)
    records = load_records(args.data, args.split, args.prompt_field, args.target_field)
    if args.samples is not None:
        records = records.select(range(min(args.samples, len(records))))
    model, tokenizer = load_model(args)
    rows = ablation_table(
        model,
        records,
        circuit,
        draws=args.draws,
        seed=args.seed,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        prompt_field=args.prompt_field,
        target_field=args.target_field,
        max_length=args.max_length,
        attention_output_module=args.attention_output_module,
        num_attention_heads=args.num_attention_heads,
    )
    print(f"{len(records)} samples, circuit {args.circuit} ({circuit.num_selected_heads} heads)\n")
    print(format_ablation_table(rows))
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from .locate import Circuit

    _check_output(args.output, "--output")
    circuit = Circuit.load(args.circuit)
    circuit.plot(args.output, title=args.title)
    print(f"heatmap written to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `headmap` command; returns the exit status (2 for bad input, with a one-line error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"locate": run_locate, "ablate": run_ablate, "plot": run_plot}[args.command]
    if getattr(args, "no_progress", False):
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    try:
        return command(args)
    except (CommandError, ValueError, TypeError, KeyError, OSError, FloatingPointError, ImportError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"headmap {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
