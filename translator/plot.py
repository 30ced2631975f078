"""A picture of a run: learning curves from its logs (loss, validation BLEU, tokens/s, against steps and time)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .checkpoint import CheckpointError
from .data import atomic_file


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric of a run, across its (re)starts: name -> [(step, value)], by step."""
    files = sorted(Path(run_dir, "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not files and Path(run_dir, "logs").is_dir():
        raise CheckpointError(f"{run_dir}: nothing logged yet (metrics are written every train.log_every steps and at "
                              "each validation)")
    if not files:
        raise CheckpointError(f"{run_dir}: no logs/version_*/metrics.csv; is it a run directory?")
    series: dict[str, dict[int, float]] = {}
    for path in files:  # a resumed run's rows for a step replace the killed process's
        for row in csv.DictReader(open(path, encoding="utf-8")):
            step = int(row.get("step") or 0) + 1  # Lightning logs the step before it counts
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in (None, ""):
                    series.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in series.items()}


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the run's learning curves as a PNG (default RUN/curves.png); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    output = Path(output) if output else Path(run_dir) / "curves.png"
    if output.exists() and (not output.is_file() or output.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n"):
        raise CheckpointError(f"{output}: exists and is not a PNG picture; nothing was written. Choose another -o")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (loss, bleu_steps), (bleu_time, speed) = axes
    for name, style in (("train/loss", "-"), ("val/loss", "o-")):
        if name in metrics:
            loss.plot(*zip(*metrics[name]), style, label=name, markersize=3)
    loss.set(xlabel="step", ylabel="loss (nats/token, label-smoothed for training)", title="loss")
    loss.legend()
    if "val/bleu" in metrics:
        bleu_steps.plot(*zip(*metrics["val/bleu"]), "o-", color="tab:blue")
        if "val/elapsed_s" in metrics:
            minutes = dict(metrics["val/elapsed_s"])
            points = [(minutes[s] / 60, b) for s, b in metrics["val/bleu"] if s in minutes]
            bleu_time.plot(*zip(*points), "o-", color="tab:blue")
    elif "val/ppl" in metrics:  # a language model
        bleu_steps.plot(*zip(*metrics["val/ppl"]), "o-", color="tab:blue")
        bleu_steps.set_yscale("log")
    bleu_steps.set(xlabel="step", ylabel="validation BLEU" if "val/bleu" in metrics else "validation perplexity",
                   title="validation")
    bleu_time.set(xlabel="training wall time (minutes)", ylabel="validation BLEU", title="validation against time")
    if "tok_s" in metrics:
        steps, rates = zip(*metrics["tok_s"])
        speed.plot(steps, rates, ",", alpha=0.4)
        window = max(1, len(rates) // 50)  # a running median: single slow steps (validation, saving) stand out
        smooth = [sorted(rates[max(0, i - window):i + window + 1])[len(rates[max(0, i - window):i + window + 1]) // 2]
                  for i in range(len(rates))]
        speed.plot(steps, smooth, "-", color="tab:green")
    speed.set(xlabel="step", ylabel="target tokens/s", title="training throughput")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    name = Path(run_dir).resolve().name
    last = metrics.get("val/bleu", [(0, math.nan)])[-1]
    fig.suptitle(f"{name}" + (f": validation BLEU {last[1]:.2f} at step {last[0]}" if not math.isnan(last[1]) else ""))
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return output
