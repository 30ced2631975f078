"""Recipe switches one at a time on Multi30k: each variant's validation BLEU against the baseline's, at the
same budget of tokens (steps x tokens per step: the same compute; the wall time is recorded beside it).

    python benchmarks/multi30k_ablation.py --recipe recipes/multi30k/en_de.yaml --data-dir ../shared/data \
        --variant "bpe_dropout_0.1=tokenizer.sampling={alpha: 0.1}" --seeds 1 2

Each variant (NAME=KEY=VALUE[;KEY=VALUE...]) and seed trains into runs/ablation/<recipe>_<NAME>_seed<S>, unless
that run has finished; --run NAME=RUN_DIR adds a finished run trained elsewhere (the recipe's own run, say, as
`baseline`). Only validation is read (greedy BLEU at every train.val_every steps, from the run's log): choose
on validation, and look at test2016 once, at the end, with benchmarks/multi30k.py. Results in
benchmarks/results/multi30k_ablation.json: per run its overrides, seed, steps, the validation BLEU curve, the
final validation BLEU and the difference to the baseline of the same seed (or of seed 1), and per switch the
mean of its differences to baselines of the same seed (`summary`: two seeds where a difference is small); --against
NAME=BASELINE compares a row with another run instead (a switch tried on a later recipe). --keep-recorded keeps
the rows already in the results file (their run directories may be gone), but for the runs given again, and adds
the runs given now.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402

from translator.checkpoint import load_torch_checkpoint, read_recipe  # noqa: E402
from translator.config import load_recipe  # noqa: E402


def validation_curve(run_dir: Path) -> list[dict]:
    """(step, seconds of training, validation loss and greedy BLEU) at each validation, from the run's logs."""
    rows = {}
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("val/loss"):
                step = int(row["step"]) + 1
                rows[step] = {"step": step, "seconds": round(float(row["val/elapsed_s"]), 1),
                              "val_loss": round(float(row["val/loss"]), 4),
                              "val_bleu": round(float(row.get("val/bleu") or "nan"), 2)}
    return [rows[s] for s in sorted(rows)]


def finished(run_dir: Path) -> bool:
    last = run_dir / "checkpoints" / "last.ckpt"
    return last.exists() and load_torch_checkpoint(last)["global_step"] == read_recipe(run_dir).train.max_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/multi30k/en_de.yaml")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[;KEY=VALUE]")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="a finished run to include as it is (seed from its recipe)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--baseline", default="baseline", help="the name the others are compared with")
    parser.add_argument("--against", action="append", default=[], metavar="NAME=BASELINE",
                        help="compare NAME with the run named BASELINE instead (a switch measured against a later "
                             "recipe)")
    parser.add_argument("--name", default="multi30k_ablation")
    parser.add_argument("--keep-recorded", action="store_true",
                        help="keep the rows already in the results file (their runs need not be here any more) and "
                             "add or replace the runs given now")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="record --run directories whose training stopped early, up to their last validation")
    args = parser.parse_args()

    recipe_name = Path(args.recipe).stem
    runs: list[tuple[str, list[str], Path]] = []
    base = load_recipe(args.recipe).to_dict()
    for item in args.run:
        name, _, run_dir = item.partition("=")
        trained = read_recipe(Path(run_dir)).to_dict()  # its settings where they differ from the recipe's
        differ = [f"{section}.{key}={value}" for section in ("model", "data", "tokenizer", "train")
                  for key, value in trained[section].items()
                  if (section, key) not in (("model", "vocab_size"), ("model", "src_vocab_size"), ("train", "seed"))
                  and base[section].get(key) != value]
        runs.append((name, differ, Path(run_dir)))
    for item in args.variant:
        name, _, overrides = item.partition("=")
        for seed in args.seeds:
            settings = [o for o in overrides.split(";") if o] + [f"train.seed={seed}"]
            run_dir = Path("runs/ablation") / f"{recipe_name}_{name}_seed{seed}"
            if not finished(run_dir):
                if run_dir.exists():
                    raise SystemExit(f"{run_dir} holds an unfinished run: resume it (translator train --resume) or "
                                     "remove it")
                subprocess.run([sys.executable, "-m", "translator.cli", "train", "--config", args.recipe,
                                "--data-dir", args.data_dir, "--out", str(run_dir), "--no-progress",
                                *[f"--{o}" for o in settings]], check=True)
            runs.append((name, settings, run_dir))

    rows = []
    for name, settings, run_dir in runs:
        done = finished(run_dir)
        if not done and not args.allow_unfinished:
            raise SystemExit(f"{run_dir}: training did not finish (--allow-unfinished records it as far as it got)")
        curve = validation_curve(run_dir)
        if not curve:
            print(f"{run_dir}: no validation yet; left out", flush=True)
            continue
        rows.append({"name": name, "overrides": settings, "run_dir": str(run_dir), "finished": done,
                     "seed": read_recipe(run_dir).train.seed, "steps": curve[-1]["step"],
                     "train_seconds": curve[-1]["seconds"], "val_bleu": curve[-1]["val_bleu"], "curve": curve})
    earlier_saves = []  # the commands that made the kept rows, and where they ran
    recorded = RESULTS / f"{args.name}.json"
    if args.keep_recorded and recorded.exists():
        earlier = json.loads(recorded.read_text())
        earlier_saves = earlier.get("earlier_saves", []) + [
            {key: earlier[key] for key in ("command", "device", "versions", "date")}]
        new = {(row["name"], row["seed"]) for row in rows}
        rows = [row for row in earlier["metrics"]["runs"] if (row["name"], row["seed"]) not in new] + rows
    against = dict(item.partition("=")[::2] for item in args.against)
    for row in rows:
        baseline = against.get(row["name"], row.get("baseline", args.baseline))  # a recorded row keeps its own
        baselines = {r["seed"]: r for r in rows if r["name"] == baseline}
        base = baselines.get(row["seed"]) or baselines.get(1)
        if base is not None and row["name"] != baseline:
            row["baseline"], row["baseline_seed"] = baseline, base["seed"]
            if row["finished"]:
                row["val_bleu_change"] = round(row["val_bleu"] - base["val_bleu"], 2)
            # At the same share of the budget (a variant may take more, smaller steps), keyed by the baseline's step.
            share = {a["step"] / row["curve"][-1]["step"]: a for a in row["curve"]} if row["finished"] else {}
            row["val_bleu_change_by_baseline_step"] = {
                str(b["step"]): round(share[b["step"] / base["curve"][-1]["step"]]["val_bleu"] - b["val_bleu"], 2)
                for b in base["curve"] if b["step"] / base["curve"][-1]["step"] in share}
    # Two seeds where a difference is small: a switch's effect is the mean of its differences to the baseline of
    # the same seed.
    summary = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        changes = {r["seed"]: r["val_bleu_change"] for r in rows if r["name"] == name and "val_bleu_change" in r
                   and r["baseline_seed"] == r["seed"]}
        if changes:
            mean = sum(changes.values()) / len(changes)
            summary[name] = {"seeds": sorted(changes), "val_bleu_change_mean": round(mean, 2)}
    for row in rows:
        print(f"{row['name']:24s} seed {row['seed']}  val BLEU {row['val_bleu']:6.2f}  "
              f"{row.get('val_bleu_change', 0):+6.2f} vs {row.get('baseline', '-'):12s} {row['train_seconds'] / 60:5.1f} min",
              flush=True)
    for name, entry in summary.items():
        if len(entry["seeds"]) > 1:
            print(f"{name:24s} mean over seeds {entry['seeds']}: {entry['val_bleu_change_mean']:+.2f}")
    extra = {"earlier_saves": earlier_saves} if earlier_saves else {}
    save_result(args.name, {"runs": rows, "summary": summary}, "cpu", recipe=args.recipe, **extra,
                notes="validation BLEU is greedy (train.val_bleu), on the whole validation set; each variant "
                      "changes only its overrides (listed against the recipe file) from its baseline; the same tokens "
                      "(steps x tokens per step) as the baseline, or where a switch makes a step cheaper (vocabulary, "
                      "d_ff) more steps for about the same time; train_seconds "
                      "is wall time and depends on what else the machine ran")


if __name__ == "__main__":
    main()
