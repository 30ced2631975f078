"""Training step time by model shape, side by side: each shape in turn within each repeat, on the same real
Multi30k batches (forward, label-smoothed loss, backward, Adam, with glibc holding freed memory as `translator
train` does), under the precision `train.precision: auto` picks on this device. For choosing a shape at a fixed
time budget: the steps a shape can afford are the budget over its step time.

    python benchmarks/train_shapes.py --data-dir ../shared/data --steps 20 --repeats 2 \
        --shape small= --shape d128_ff256_4x4=d_model=128,d_ff=256,n_encoder_layers=4,n_decoder_layers=4
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402
from train_throughput import make_batches, time_training  # noqa: E402

from translator import ModelConfig, build_model  # noqa: E402
from translator.memory import hold_freed_memory  # noqa: E402
from translator.training import resolve_precision  # noqa: E402


def parse_shape(text: str) -> tuple[str, dict]:
    """NAME=KEY=VALUE,KEY=VALUE (overrides of the `small` preset, values read as in
    recipe overrides; NAME= alone is the preset)."""
    name, _, overrides = text.partition("=")
    pairs = [item.split("=", 1) for item in overrides.split(",") if item]
    if not name or any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--shape {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    return name, {key: yaml.safe_load(value) for key, value in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per shape and repeat (after 4 untimed)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shape", action="append", required=True, metavar="NAME=KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--name", default="train_shapes_cpu")
    args = parser.parse_args()

    hold_freed_memory()
    precision = resolve_precision("auto", "cpu")
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    batches, vocab = make_batches(args.data_dir, args.max_tokens, args.steps + 4, 8000, "cpu")
    shapes = dict(parse_shape(s) for s in args.shape)
    times: dict[str, list[float]] = {name: [] for name in shapes}
    parameters: dict[str, int] = {}
    for repeat in range(args.repeats):
        for name, overrides in shapes.items():
            torch.manual_seed(0)
            model = build_model(ModelConfig.from_name("small", vocab_size=vocab, **overrides)).train()
            parameters[name] = sum(p.numel() for p in model.parameters())
            steps = time_training(lambda b: model.logits(model.states(b["src"], b["tgt_in"])), model.parameters(),
                                  batches, "cpu", dtype)
            times[name].append(round(statistics.median(steps[4:]) * 1e3, 1))  # the first steps touch new memory
            print(f"repeat {repeat + 1}, {name:24s} {parameters[name] / 1e6:5.2f}M parameters, median step "
                  f"{times[name][-1]:7.1f} ms", flush=True)
    first = next(iter(shapes))
    metrics = {"max_tokens": args.max_tokens, "steps": args.steps, "precision": precision,
               "shapes": {name: {"overrides": shapes[name], "parameters": parameters[name], "median_step_ms": times[name],
                                 # per repeat: this shape's step time over the first shape's, then the median
                                 "relative_to_" + first: round(statistics.median(
                                     t / f for t, f in zip(times[name], times[first])), 3)}
                          for name in shapes}}
    save_result(args.name, metrics, "cpu")


if __name__ == "__main__":
    main()
