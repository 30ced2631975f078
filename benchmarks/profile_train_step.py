"""Where a training step's time goes: torch.profiler over a few real Multi30k batches, and the step time
under each scaled_dot_product_attention backend, on batches of varying shape (as in training) and on one
batch repeated (fixed shape).

    python benchmarks/profile_train_step.py --data-dir ../shared/data --device cuda --model transformer_base
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402
from train_throughput import make_batches  # noqa: E402

from translator import ModelConfig, build_model  # noqa: E402
from translator.training import label_smoothed_loss  # noqa: E402

BACKENDS = {
    "default": None,
    "flash+efficient+math": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
}


def step(model, optimizer, batch, device, dtype):
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = label_smoothed_loss(model(batch["src"], batch["tgt_in"]), batch["tgt_out"], 0.1, 0)
    (loss / batch["ntokens"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(model, optimizer, batches, device, dtype) -> float:
    times = []
    for batch in batches:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, optimizer, batch, device, dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="transformer_base")
    parser.add_argument("--max-tokens", type=int, default=25000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--compile", action="store_true", help="also time the model under torch.compile")
    parser.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes (one graph for all batch "
                                                                "shapes instead of one per shape)")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    batches, vocab = make_batches(args.data_dir, args.max_tokens, 2 * args.steps, 8000, device)
    model = build_model(ModelConfig.from_name(args.model, vocab_size=vocab, max_positions=512)).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device == "cuda" or None)
    backends = args.backends if device == "cuda" else ["default"]
    variants = [(name, False) for name in backends] + ([(name, True) for name in backends] if args.compile else [])
    timings: dict = {"model": args.model, "max_tokens": args.max_tokens, "steps": args.steps}
    for name, compiled in variants:
        chosen = BACKENDS[name]
        network = torch.compile(model, dynamic=args.dynamic or None) if compiled else model
        label = name + (" compiled" + (" dynamic" if args.dynamic else "") if compiled else "")
        try:
            with sdpa_kernel(chosen) if chosen else contextlib.nullcontext():
                varying = timed(network, optimizer, batches[: args.steps], device, dtype)
                varying_again = timed(network, optimizer, batches[: args.steps], device, dtype)  # shapes seen before
                fixed = timed(network, optimizer, [batches[args.steps]] * args.steps, device, dtype)
            timings[label] = {"new_shapes_ms": round(varying * 1e3, 1), "seen_shapes_ms": round(varying_again * 1e3, 1),
                              "one_shape_ms": round(fixed * 1e3, 1)}
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if compiled else 0
            print(f"{label:30s} median step: new shapes {varying * 1e3:7.1f} ms, same shapes again "
                  f"{varying_again * 1e3:7.1f} ms, one shape repeated {fixed * 1e3:7.1f} ms"
                  + (f", {graphs} graphs compiled" if compiled else ""), flush=True)
        except Exception as e:  # a backend that cannot take these inputs says so; the others still run
            print(f"{label:30s} failed: {str(e).splitlines()[0]}", flush=True)
        torch._dynamo.reset()
    save_result(f"train_step_backends_{device}", timings, device)
    if args.no_profile:
        return

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for batch in batches[args.steps:]:
            step(model, optimizer, batch, device, dtype)
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
