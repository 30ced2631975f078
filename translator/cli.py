"""The `translator` command: train, translate, score, evaluate, average.

Errors print as one line (`translator: error: ...`) with a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

EXAMPLES = {
    "train": "translator train --config recipes/multi30k/en_de.yaml --data-dir ../shared/data --out runs/en_de",
}


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return name


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_recipe
    from .training import fit

    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if args.resume and args.config is None:
        args.config = str(run_dir / "config.yaml")
    if args.config is None:
        raise ValueError("train needs --config RECIPE.yaml (or --resume with --out RUN_DIR)")
    recipe = load_recipe(args.config, overrides)
    accelerator = {"auto": None, "cpu": "cpu", "cuda": "gpu"}[args.device]
    fit(recipe, run_dir, data_dir=args.data_dir, resume=args.resume, max_steps=args.max_steps,
        max_minutes=args.max_minutes, accelerator=accelerator, devices=args.devices, num_nodes=args.num_nodes,
        strategy=args.strategy, progress_bar=not args.no_progress)
    print(f"run directory: {run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="translator", description="The 2017 Transformer for machine translation.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a recipe",
                       description="Train a recipe into a run directory. Any recipe value can be overridden with "
                                   "--section.key=value (e.g. --train.max_tokens=8192).",
                       epilog=f"example: {EXAMPLES['train']}")
    p.add_argument("--config", help="recipe YAML (see recipes/)")
    p.add_argument("--data-dir", help="directory that the recipe's corpus paths are relative to")
    p.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides the recipe)")
    p.add_argument("--max-minutes", type=float, help="stop after this much wall time; the run directory stays usable")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--devices", help="devices per node, e.g. 2 or auto (Lightning)")
    p.add_argument("--num-nodes", type=int, help="number of nodes (Lightning)")
    p.add_argument("--strategy", help="Lightning strategy: auto, ddp, fsdp, ...")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(func=cmd_train)
    return parser


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("translator")
    ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if debug else logging.INFO)
    ours.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--") and "." in a.split("=")[0]]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.command != "train":
        parser.error(f"recipe overrides ({overrides[0]}) only apply to train")
    if getattr(args, "devices", None) not in (None, "auto"):
        args.devices = int(args.devices)
    _setup_logging(args.debug)
    if not args.debug:
        warnings.filterwarnings("ignore", category=UserWarning)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    try:
        return args.func(args, overrides)
    except KeyboardInterrupt:
        print("translator: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line; --debug for the trace
        if args.debug:
            raise
        print(f"translator: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
