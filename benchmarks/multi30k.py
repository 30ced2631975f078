"""Multi30k benchmark: train a recipe, average its last checkpoints, translate test2016 with beam search,
score with sacreBLEU, and save the numbers and a learning curve under benchmarks/results/.

    python benchmarks/multi30k.py --recipe recipes/multi30k/en_de.yaml --data-dir ../shared/data

--reuse takes a finished run whose training settings equal the recipe's (training is deterministic under its
seed, so retraining would give the same weights) and redoes only what the decode section decides: which
checkpoints are averaged, and the test translation. Its training time is the one measured when that run
trained: saved in RUN_DIR/benchmark_train.json by this script, or, for a run `translator train` made in one go
(an ablation run chosen on validation), its log's time at the last validation, which ends the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402

from translator.checkpoint import export_weights, load_torch_checkpoint, read_recipe, write_recipe  # noqa: E402
from translator.cli import _setup_logging, main as cli  # noqa: E402
from translator.config import load_recipe  # noqa: E402
from translator.training import fit, resolve_precision  # noqa: E402


def learning_curve(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("val/loss"):
                rows.append({"step": int(row["step"]) + 1, "seconds": float(row["val/elapsed_s"]),
                             "val_loss": float(row["val/loss"]), "val_bleu": float(row.get("val/bleu") or "nan")})
    return rows


def plot(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["seconds"] / 60 for r in curve]
    fig, bleu_axis = plt.subplots(figsize=(7, 4))
    bleu_axis.plot(minutes, [r["val_bleu"] for r in curve], "o-", color="tab:blue")
    bleu_axis.set_xlabel("training wall time (minutes)")
    bleu_axis.set_ylabel("validation BLEU (greedy)", color="tab:blue")
    loss_axis = bleu_axis.twinx()
    loss_axis.plot(minutes, [r["val_loss"] for r in curve], "s--", color="tab:red")
    loss_axis.set_ylabel("validation loss (nats/token)", color="tab:red")
    bleu_axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# Settings that do not change the trained weights.
BOOKKEEPING = {"keep_last", "log_every"}


def reuse(run_dir: Path, recipe, device: str) -> float:
    """Apply the recipe's decode section to a finished run with the same training settings; its train seconds."""
    trained = read_recipe(run_dir)
    record = run_dir / "benchmark_train.json"
    if record.is_file():
        train_seconds = json.loads(record.read_text())["train_seconds"]
    else:  # trained by `translator train` (an ablation run, say): its wall time up to the last validation,
        logs = sorted((run_dir / "logs").glob("version_*"))  # which ends the run, if it ran in one go
        curve = learning_curve(run_dir)
        if len(logs) != 1 or not curve or curve[-1]["step"] != trained.train.max_steps:
            raise SystemExit(f"{run_dir}: no benchmark_train.json, and its log does not time the whole run "
                             "(resumed, or no validation at the last step)")
        prepared = json.loads((run_dir / "data" / "manifest.json").read_text()).get("seconds", {})
        train_seconds = curve[-1]["seconds"] + sum(prepared.values())  # and the tokenizer and data preparation
    mine, theirs = recipe.to_dict(), trained.to_dict()
    accelerator = "gpu" if device == "cuda" else "cpu"  # precision auto: what it resolves to on this device
    mine["train"]["precision"] = resolve_precision(mine["train"]["precision"], accelerator)
    theirs["train"]["precision"] = resolve_precision(theirs["train"]["precision"], accelerator)
    for section in ("model", "data", "tokenizer", "train"):
        a = {k: v for k, v in mine[section].items() if k not in BOOKKEEPING and v is not None}
        b = {k: v for k, v in theirs[section].items() if k not in BOOKKEEPING and k in a}
        if a != b:
            raise SystemExit(f"{run_dir} was trained with other {section} settings: {b} != {a}")
    if load_torch_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] != trained.train.max_steps:
        raise SystemExit(f"{run_dir}: training did not finish")
    trained.decode = recipe.decode
    write_recipe(trained, run_dir)
    export_weights(run_dir, recipe.decode.average_last)
    return train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/multi30k/en_de.yaml")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", help="run directory (default: runs/bench_<recipe>)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--max-steps", type=int, help="override the recipe's steps (for a quick check)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set train.precision=bf16-mixed (on a GPU)")
    parser.add_argument("--name", help="result name (default: multi30k_<src>_<tgt>[_<device>])")
    parser.add_argument("--reuse", action="store_true", help="re-decode a finished run trained with these settings")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, args.set)
    pair = f"{recipe.data.src_lang}_{recipe.data.tgt_lang}"
    name = args.name or f"multi30k_{pair}" + ("" if args.device == "cpu" else f"_{args.device}")
    run_dir = Path(args.out or f"runs/bench_{name}")
    if args.reuse:
        train_seconds = reuse(run_dir, recipe, args.device)
    elif run_dir.exists():
        raise SystemExit(f"{run_dir} exists; remove it, pass another --out, or --reuse it")
    else:
        _setup_logging(debug=False)  # progress lines on stderr
        start = time.perf_counter()
        fit(recipe, run_dir, data_dir=args.data_dir, max_steps=args.max_steps,
            accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, progress_bar=False)
        train_seconds = time.perf_counter() - start
        (run_dir / "benchmark_train.json").write_text(json.dumps({"train_seconds": train_seconds}) + "\n")
    last = load_torch_checkpoint(run_dir / "checkpoints" / "last.ckpt")

    # Test2016, beam search with the recipe's settings, on the averaged weights fit() exported.
    code = cli(["evaluate", "--model", str(run_dir), "--split", "test", "--data-dir", args.data_dir,
                "--device", args.device, "--json"])
    if code:
        raise SystemExit("evaluation failed")
    report = json.loads((run_dir / "eval" / "test.json").read_text())
    bleu, chrf = report["scores"]["BLEU"], report["scores"]["chrF2"]

    curve = learning_curve(run_dir)
    plot_path = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(curve, plot_path, f"Multi30k {pair.replace('_', '->')}, {recipe.model.d_model}-d {recipe.model.n_encoder_layers}+"
                           f"{recipe.model.n_decoder_layers} layers, {args.device}")
    averaged = json.loads((run_dir / "model.json").read_text())["averaged"]
    save_result(name, device=args.device, metrics={
        "bleu": round(bleu["score"], 2),
        "bleu_signature": bleu["signature"],
        "chrf": round(chrf["score"], 2),
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(last.get("tokens_seen", 0) / train_seconds, 1),
        "steps": last["global_step"],
        "decode_seconds": report["seconds"],
        "beam": report["beam"], "lenpen": report["lenpen"], "lp_form": report["lp_form"],
        "mbr": report.get("mbr", 0), "mbr_weights": report.get("mbr_weights", "model"),
        "averaged_checkpoints": averaged,
        "learning_curve": curve,
    }, recipe=args.recipe, run_dir=str(run_dir), plot=str(plot_path.relative_to(RESULTS.parent.parent)))


if __name__ == "__main__":
    main()
