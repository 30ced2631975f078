"""Data at scale: prepare time and memory, a prepared DDP run's start and memory per rank, and loader speed,
on synthetic WMT-sized corpora made from Multi30k (pairs of consecutive lines joined: ~25 words a side).

    python benchmarks/data_scale.py --data-dir ../shared/data --sizes 300000 1000000 4500000 \
        --baseline-code /path/to/an/older/checkout

Each measurement runs in a child process of its own, so that peak memory is that step's alone. The corpora
are written under --work (default runs/data_scale) and are never committed. --baseline-code points at a
checkout whose translator still reads corpora into memory (load_corpus -> encode_corpus -> TokenBatches),
for the side-by-side figures at the sizes listed in --baseline-sizes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
model: {{preset: small}}
data: {{src_lang: en, tgt_lang: de, train: "{train}", valid: "multi30k/val.{{lang}}.gz"}}
tokenizer: {{vocab_size: 8000, max_sentences: {sample}}}
train: {{max_tokens: 4096, warmup: 400, lr_scale: 0.7, val_every: 1000, save_every: 1000, log_every: 1}}
"""


class PeakMemory:
    """Samples this process's resident memory every 20 ms; `phase(name)` closes the current phase's peak."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.current = 0.0
        self.running = True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self.running:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
            self.current = max(self.current, rss)
            time.sleep(0.02)

    def phase(self, name: str) -> None:
        time.sleep(0.05)
        self.peaks[name] = round(self.current, 1)
        self.current = 0.0


# -- Children ---------------------------------------------------------------------------------------------------

def child_prepare(recipe_file: str, data_dir: str, out: str) -> dict:
    from translator.config import load_recipe
    from translator.data import Tokenizer
    import translator.store as store

    memory = PeakMemory()
    real_train = Tokenizer.train

    def train_then_mark(*args, **kwargs):  # the tokenizer phase ends when sentencepiece is trained
        result = real_train(*args, **kwargs)
        memory.phase("tokenizer")
        return result

    Tokenizer.train = train_then_mark
    start = time.perf_counter()
    manifest = store.prepare(load_recipe(recipe_file), data_dir, out)
    wall = time.perf_counter() - start
    memory.phase("tokenize_and_write")
    train = manifest["splits"]["train"]
    return {"wall_s": round(wall, 1), "tokenizer_s": manifest["seconds"]["tokenizer_s"],
            "tokenize_s": manifest["seconds"]["tokenize_s"], "pairs_read": train["read"], "pairs_kept": train["pairs"],
            "tokenize_pairs_per_s": round(train["read"] / manifest["seconds"]["tokenize_s"]),
            "tokenizer_sample_lines": manifest["tokenizer_sample"], "peak_rss_mb": memory.peaks,
            "store_mb": round(sum(p.stat().st_size for p in Path(out).iterdir()) / 2 ** 20, 1)}


def child_in_memory(baseline: str, recipe_file: str, data_dir: str, spm: str) -> dict:
    """The data path before the store: the whole corpus as Python lists, tokenized in this process."""
    sys.path.insert(0, baseline)
    import resource

    from translator.config import load_recipe
    from translator.data import TokenBatches, Tokenizer, encode_corpus, load_corpus

    recipe = load_recipe(recipe_file)
    start = time.perf_counter()
    corpus = load_corpus(recipe.data.train, "en", "de", data_dir)
    read = time.perf_counter() - start
    encoded = encode_corpus(corpus, Tokenizer(spm), max_len=256)
    batches = TokenBatches(encoded, 4096, True, seed=1)
    plan = batches.batches(0)
    wall = time.perf_counter() - start
    tokens = loader_rate(batches, plan)
    return {"read_s": round(read, 1), "read_tokenize_plan_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "loader_target_tokens_per_s": tokens}


def loader_rate(loader, plan, seconds: float = 10.0) -> int:
    """Target tokens per second that collating batches gives on one core."""
    import torch

    torch.set_num_threads(1)
    tokens, start = 0, time.perf_counter()
    for indices in plan:
        tokens += loader.collate(indices)["ntokens"]
        if time.perf_counter() - start > seconds:
            break
    return round(tokens / (time.perf_counter() - start))


def child_loader(store_dir: str) -> dict:
    from translator.batching import TokenBatches
    from translator.store import open_store

    store = open_store(store_dir)
    start = time.perf_counter()
    loader = TokenBatches(store.pairs("train"), 4096, True, seed=1)
    plan = loader.batches(0)
    planned = time.perf_counter() - start
    return {"plan_s": round(planned, 2), "batches": len(plan), "loader_target_tokens_per_s": loader_rate(loader, plan)}


# -- The parent ---------------------------------------------------------------------------------------------------

def child(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"child {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthesize(data_dir: Path, work: Path, n: int) -> Path:
    """n pairs from Multi30k's training lines, two consecutive lines joined a side (line j with line j + 1 + the
    pass number, so that passes differ), written as plain text under work/synth_n."""
    out = work / f"synth_{n}"
    if (out / "train.de").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    sides = {lang: gzip.decompress((data_dir / f"multi30k/train.{lang}.gz").read_bytes()).decode().splitlines()
             for lang in ("en", "de")}
    m = len(sides["en"])
    for lang, lines in sides.items():
        with open(out / f"train.{lang}.tmp", "w", encoding="utf-8") as f:
            for start in range(0, n, 100_000):
                f.write("".join(f"{lines[i % m]} {lines[(i % m + 1 + i // m) % m]}\n"
                                for i in range(start, min(n, start + 100_000))))
        os.replace(out / f"train.{lang}.tmp", out / f"train.{lang}")
    return out


def train_from_store(recipe_file: Path, store: Path, run: Path, env: dict) -> dict:
    """A 2-process DDP run (gloo, CPU) from the store, 5 steps: time to the first step and peak memory per rank."""
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    command = [sys.executable, "-m", "translator.cli", "train", "--config", str(recipe_file), "--prepared", str(store),
               "--out", str(run), "--device", "cpu", "--devices", "2", "--strategy", "ddp", "--max-steps", "5",
               "--no-progress"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    ranks, pattern = {}, re.compile(r"rank (\d+): first training step ([\d.]+)s .* peak memory (\d+) MB")
    lines = []
    for line in process.stderr:
        lines.append(line)
        if match := pattern.search(line):
            ranks[int(match.group(1))] = {"first_step_after_launch_s": round(time.perf_counter() - start, 1),
                                          "first_step_after_fit_start_s": float(match.group(2)),
                                          "peak_rss_mb_at_first_step": int(match.group(3))}
    if process.wait():
        raise RuntimeError("".join(lines[-30:]))
    return {"total_s": round(time.perf_counter() - start, 1), "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300_000, 1_000_000, 4_500_000])
    parser.add_argument("--work", default="runs/data_scale")
    parser.add_argument("--tokenizer-sample", type=int, default=400_000,
                        help="tokenizer.max_sentences: lines sampled to train sentencepiece")
    parser.add_argument("--baseline-code", help="a checkout with the in-memory data path, for side-by-side figures")
    parser.add_argument("--baseline-sizes", type=int, nargs="*", default=[300_000, 1_000_000])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps({"prepare": child_prepare, "in_memory": child_in_memory, "loader": child_loader}[kind](*rest)))
        return

    data_dir, work = Path(args.data_dir).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "multi30k").exists():
        (work / "multi30k").symlink_to(data_dir / "multi30k")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    results: dict = {"sizes": {}}
    # The Multi30k run the per-rank memory is compared with: the same recipe, model and command.
    for name, train in [("multi30k", "multi30k/train.{lang}.gz")] + [(str(n), f"synth_{n}/train.{{lang}}")
                                                                       for n in args.sizes]:
        if name != "multi30k":
            t = time.perf_counter()
            synthesize(data_dir, work, int(name))
            print(f"{name}: corpus written in {time.perf_counter() - t:.0f}s", flush=True)
        recipe_file = work / f"recipe_{name}.yaml"
        recipe_file.write_text(RECIPE.format(train=train, sample=args.tokenizer_sample))
        store = work / f"store_{name}"
        entry = {"prepare": child(["prepare", str(recipe_file), str(work), str(store)], env)}
        print(name, "prepare", entry["prepare"], flush=True)
        entry["loader"] = child(["loader", str(store)], env)
        print(name, "loader", entry["loader"], flush=True)
        entry["train_ddp2"] = train_from_store(recipe_file, store, work / f"run_{name}", env)
        print(name, "train", entry["train_ddp2"], flush=True)
        if args.baseline_code and name != "multi30k" and int(name) in args.baseline_sizes:
            entry["in_memory_before"] = child(["in_memory", str(Path(args.baseline_code).resolve()), str(recipe_file),
                                               str(work), str(store / "spm.model")],
                                              {**env, "PYTHONPATH": str(Path(args.baseline_code).resolve())})
            print(name, "in memory (before)", entry["in_memory_before"], flush=True)
        results["sizes"][name] = entry
        if name != "multi30k":
            for path in store.glob("train.*"):
                path.unlink()  # keep the disk for the next size (the manifest stays for the record)
    base = max(r["peak_rss_mb_at_first_step"] for r in results["sizes"]["multi30k"]["train_ddp2"]["ranks"].values())
    for name, entry in results["sizes"].items():
        peak = max(r["peak_rss_mb_at_first_step"] for r in entry["train_ddp2"]["ranks"].values())
        entry["train_rank_peak_rss_above_multi30k_mb"] = peak - base
    save_result("data_scale", results, "cpu", tokenizer_sample_lines=args.tokenizer_sample,
                synthetic="pairs of consecutive Multi30k training lines joined, ~25 words a side")


if __name__ == "__main__":
    main()
