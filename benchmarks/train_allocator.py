"""CPU training step time under each memory allocator, side by side: glibc's defaults, glibc holding freed memory
(translator.memory.hold_freed_memory, what `translator train` does), and jemalloc / tcmalloc preloaded where
they are installed. Each (allocator, draft heads) pair runs in its own process, in turns within each repeat; a
step is the training step of `small` (forward, label-smoothed loss, backward, Adam) on real Multi30k batches.

    python benchmarks/train_allocator.py --data-dir ../shared/data --heads 0 3 --steps 24 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

PRELOADS = {"jemalloc": ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"],
            "tcmalloc": ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                         "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4"]}


def child(args) -> None:
    import torch
    from train_throughput import make_batches

    from translator import ModelConfig, build_model
    from translator.memory import hold_freed_memory
    from translator.training import label_smoothed_loss

    if args.allocator == "glibc held" and not hold_freed_memory():
        raise SystemExit("hold_freed_memory did not take (not glibc, or MALLOC_* variables set)")
    torch.manual_seed(0)
    batches, vocab = make_batches(args.data_dir, args.max_tokens, args.steps, 8000, "cpu")
    model = build_model(ModelConfig.from_name("small", vocab_size=vocab, draft_heads=args.child_heads)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for batch in batches:
        start = time.perf_counter()
        h = model.states(batch["src"], batch["tgt_in"])
        loss, _ = label_smoothed_loss(model.logits(h), batch["tgt_out"], 0.1, 0)
        if args.child_heads:  # as TranslationModule.training_step: multi-token prediction, weight 0.3
            targets = batch["tgt_out"]
            heads = [label_smoothed_loss(model.logits(g), targets[:, k:], 0.1, 0)[0]
                     for k, g in enumerate(model.draft_states(h, targets), 1)]
            loss = loss + 0.3 * torch.stack(heads).mean()
        (loss / batch["ntokens"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    warm = times[3:]  # the first steps touch memory for the first time under every allocator
    print(json.dumps({"median_step_ms": round(statistics.median(warm) * 1e3, 1),
                      "system_s_per_step": round((after.ru_stime - before.ru_stime) / len(times), 3),
                      "user_s_per_step": round((after.ru_utime - before.ru_utime) / len(times), 3),
                      "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / len(times)),
                      "peak_memory_mb": round(after.ru_maxrss / 1024)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--heads", type=int, nargs="+", default=[0, 3], help="draft heads trained with the model")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="train_allocator_cpu")
    parser.add_argument("--allocator", help=argparse.SUPPRESS)
    parser.add_argument("--child-heads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allocator:
        return child(args)

    allocators = {"glibc defaults": None, "glibc held": None}
    allocators.update({name: next(p for p in paths if Path(p).exists())
                       for name, paths in PRELOADS.items() if any(Path(p).exists() for p in paths)})
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    runs: dict = {}
    for repeat in range(args.repeats):
        for heads in args.heads:
            for name, preload in allocators.items():
                child_env = dict(env, **({"LD_PRELOAD": preload} if preload else {}))
                out = subprocess.run([sys.executable, __file__, "--data-dir", args.data_dir, "--max-tokens",
                                      str(args.max_tokens), "--steps", str(args.steps), "--allocator", name,
                                      "--child-heads", str(heads)], env=child_env, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{name}, {heads} heads: {out.stderr.strip().splitlines()[-1]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault(f"{heads} heads", {}).setdefault(name, []).append(result)
                print(f"repeat {repeat + 1}, {heads} draft heads, {name:15s} {result}", flush=True)
    metrics: dict = {"model": "small", "max_tokens": args.max_tokens, "steps": args.steps,
                     "allocators": {k: v for k, v in allocators.items()}, "runs": runs}
    for heads, by_allocator in runs.items():
        base = [r["median_step_ms"] for r in by_allocator["glibc defaults"]]
        metrics[f"speedup_{heads.replace(' ', '_')}"] = {
            name: round(statistics.median(b / r["median_step_ms"] for b, r in zip(base, results)), 2)
            for name, results in by_allocator.items() if name != "glibc defaults"}
    save_result(args.name, metrics, "cpu")


if __name__ == "__main__":
    main()
