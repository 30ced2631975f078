"""Adam's update on a CPU, torch's default (foreach) implementation against its fused kernel (`fused=True`, what
`translator train` uses on CPUs and GPUs), side by side: two copies of the `small` model from one initialisation,
trained in turns on the same real Multi30k batches with the same dropout masks (bf16 autocast where the CPU has
native bf16, as the recipes train). Times the optimizer step alone and the whole training step, and reports how far
the two copies' weights have drifted apart at the end.

    python benchmarks/train_optimizer.py --data-dir ../shared/data --steps 40
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--name", default="train_optimizer_cpu")
    args = parser.parse_args()

    import torch
    from train_throughput import make_batches

    from translator import ModelConfig, build_model
    from translator.memory import hold_freed_memory
    from translator.training import inverse_sqrt_lr, label_smoothed_loss, native_bf16

    hold_freed_memory()
    torch.manual_seed(0)
    batches, vocab = make_batches(args.data_dir, args.max_tokens, args.steps, 8000, "cpu")
    first = build_model(ModelConfig.from_name("small", vocab_size=vocab)).train()
    models = {"foreach": first, "fused": copy.deepcopy(first)}
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9,
                                         fused=name == "fused" or None) for name, model in models.items()}
    lr = inverse_sqrt_lr(256, 1100, 1.0)
    dtype = torch.bfloat16 if native_bf16("cpu") else torch.float32
    step_s: dict[str, list[float]] = {name: [] for name in models}
    optimizer_s: dict[str, list[float]] = {name: [] for name in models}
    for i, batch in enumerate(batches):
        names = list(models) if i % 2 == 0 else list(models)[::-1]  # neither always goes first
        for name in names:
            model, optimizer = models[name], optimizers[name]
            for group in optimizer.param_groups:
                group["lr"] = lr(i + 1)
            torch.manual_seed(i)  # the same dropout masks for both copies
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss, _ = label_smoothed_loss(model.logits(model.states(batch["src"], batch["tgt_in"])),
                                              batch["tgt_out"], 0.1, 0)
            (loss / batch["ntokens"]).backward()
            before_step = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            if i >= 4:  # the first steps touch fresh memory
                step_s[name].append(end - start)
                optimizer_s[name].append(end - before_step)
        print(f"step {i + 1}: " + ", ".join(f"{n} {optimizer_s[n][-1] * 1e3:.1f} ms" for n in models
                                            if optimizer_s[n]), flush=True)
    drift = max((a - b).abs().max().item() for a, b in zip(models["foreach"].parameters(), models["fused"].parameters()))
    scale = max(p.abs().max().item() for p in models["foreach"].parameters())
    metrics = {"model": "small", "max_tokens": args.max_tokens, "steps": args.steps, "autocast": str(dtype),
               "median_optimizer_step_ms": {n: round(statistics.median(v) * 1e3, 2) for n, v in optimizer_s.items()},
               "median_training_step_ms": {n: round(statistics.median(v) * 1e3, 1) for n, v in step_s.items()},
               "training_step_fused_over_foreach": round(statistics.median(step_s["fused"])
                                                         / statistics.median(step_s["foreach"]), 3),
               "max_weight_difference_at_end": drift, "max_weight_magnitude": round(scale, 3)}
    save_result(args.name, metrics, "cpu")


if __name__ == "__main__":
    main()
