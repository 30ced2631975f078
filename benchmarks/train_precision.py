"""CPU training step time in float32 and under bf16 autocast (`train.precision: bf16-mixed`), side by side: each
precision runs in its own process, in turns within each repeat, on the same real Multi30k batches (the `small`
model, forward, label-smoothed loss, backward, Adam, with glibc holding freed memory as `translator train` does).
Also times scaled_dot_product_attention's forward and backward alone at a Multi30k batch's shapes in both dtypes:
the reason translator's attention stays in float32 under CPU autocast.

    python benchmarks/train_precision.py --data-dir ../shared/data --steps 24 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

DTYPES = {"32": "float32", "bf16-mixed": "bfloat16"}


def child(args) -> None:
    import torch
    from train_throughput import make_batches, time_training

    from translator import ModelConfig, build_model
    from translator.memory import hold_freed_memory, peak_memory_mb

    hold_freed_memory()
    torch.manual_seed(0)
    batches, vocab = make_batches(args.data_dir, args.max_tokens, args.steps, 8000, "cpu")
    model = build_model(ModelConfig.from_name("small", vocab_size=vocab)).train()
    times = time_training(lambda b: model.logits(model.states(b["src"], b["tgt_in"])), model.parameters(), batches,
                          "cpu", getattr(torch, DTYPES[args.precision]))
    print(json.dumps({"median_step_ms": round(statistics.median(times[4:]) * 1e3, 1),  # the first touch memory
                      "peak_memory_mb": round(peak_memory_mb())}))


def attention_ms(dtype, batch: int = 110, heads: int = 4, length: int = 20, head_dim: int = 64, calls: int = 30):
    """Median forward + backward time of one self-attention call as the model makes it in training (queries, keys
    and values viewed out of one projection, a padding mask, no attention dropout: the flash kernel), in ms."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(batch, length, 3 * heads * head_dim, dtype=dtype, requires_grad=True)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[::2, ..., length * 3 // 4:] = False  # every other sentence padded
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        q, k, v = x.view(batch, length, 3, heads, head_dim).permute(0, 2, 3, 1, 4).unbind(1)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times[5:]) * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="train_precision_cpu")
    parser.add_argument("--precision", choices=list(DTYPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision:
        return child(args)

    import torch

    from translator.training import native_bf16, resolve_precision

    runs: dict = {}
    memory: dict = {}
    for repeat in range(args.repeats):
        for precision in DTYPES:
            out = subprocess.run([sys.executable, __file__, "--data-dir", args.data_dir, "--max-tokens",
                                  str(args.max_tokens), "--steps", str(args.steps), "--precision", precision],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{precision}: {out.stderr.strip().splitlines()[-1]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault(precision, []).append(result["median_step_ms"])
            memory.setdefault(precision, []).append(result["peak_memory_mb"])
            print(f"repeat {repeat + 1}, {precision:10s} {result}", flush=True)
    attention = {name: attention_ms(getattr(torch, dtype)) for name, dtype in DTYPES.items()}
    print(f"attention forward + backward, ms per call: {attention}", flush=True)
    metrics = {"model": "small", "max_tokens": args.max_tokens, "steps": args.steps,
               "native_bf16": native_bf16("cpu"), "precision_auto_resolves_to": resolve_precision("auto", "cpu"),
               "median_step_ms": runs,
               # per repeat: float32's step time over bf16's, then the median of those
               "bf16_speedup": round(statistics.median(a / b for a, b in zip(runs["32"], runs["bf16-mixed"])), 2),
               "peak_memory_mb": memory, "attention_fwd_bwd_ms": attention}
    save_result(args.name, metrics, "cpu")


if __name__ == "__main__":
    main()
