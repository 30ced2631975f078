"""Saving and loading: atomic writes, weights that load without unpickling code, checkpoint averaging.

A run directory holds:
  config.yaml          the resolved recipe (model sizes, data, training and decoding settings)
  spm.model            the sentencepiece model
  checkpoints/*.ckpt   Lightning checkpoints (periodic ones kept for averaging, best, last)
  model.safetensors    the weights `translate` uses (the average of the last checkpoints, by default)
  model.json           what those weights are (which checkpoints)
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, Recipe
from .data import Tokenizer, atomic_file, write_atomic
from .model import build_model

CONFIG, TOKENIZER, WEIGHTS, WEIGHTS_INFO, CHECKPOINTS = "config.yaml", "spm.model", "model.safetensors", "model.json", "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be loaded; the message names the file."""


# -- Writing -----------------------------------------------------------------------------------------------------

def check_replaceable(directory: Path, holds: set[str], kind: str) -> None:
    """An existing output directory is written into only if it holds nothing but what `kind` holds: never
    over a run directory or the user's other files."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory; choose another output path")
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in holds)
    if foreign:
        held = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CheckpointError(f"{directory}: exists and is not {kind} ({held}); nothing was written. Choose a new "
                              "output path, or remove it first")


def check_weights_output(path: Path, run_dir: Path) -> None:
    """A weights file that `average` may write: in its own run directory, or a new file or one it wrote before
    (its metadata names what it averaged) in a directory that holds no other run or model."""
    home = path.parent.resolve()
    if home == Path(run_dir).resolve():
        return
    if (path.parent / CONFIG).exists() or (path.parent / CHECKPOINTS).exists():
        raise CheckpointError(f"{path}: inside another run or model directory ({path.parent}); nothing was written. "
                              "Average into the run's own directory, a new directory, or a new file")
    if path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                ours = "averaged" in (f.metadata() or {})
        except (SafetensorError, OSError):
            ours = False
        if not ours:
            raise CheckpointError(f"{path}: exists and was not written by average; nothing was written. Choose a new "
                                  "output path, or remove it first")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file, synced, then renamed over the target: a crash
    mid-write leaves the previous checkpoint intact. Loading never unpickles arbitrary objects."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_torch_checkpoint(path, map_location or "cpu")


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Model weights as safetensors, atomically. Tensors shared between modules are stored once."""
    unique, seen = {}, set()
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.detach().contiguous().cpu()
    with atomic_file(path) as tmp:
        save_file(unique, str(tmp), metadata=metadata)


# -- Reading -------------------------------------------------------------------------------------------------------

def load_torch_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain data, "
                              f"which could run code ({str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0][:200]})") from None


def check_readable(path: str | os.PathLike) -> None:
    """A quick look before a long job relies on a checkpoint: torch.save writes a zip archive whose directory
    sits at the end, so a truncated or foreign file fails here at once."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model weights from model.safetensors or from a Lightning .ckpt (its 'state_dict', prefix 'model.'; a
    wrapper's '_orig_mod.', from runs that compiled by wrapping the model, is dropped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such weights file")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated weights ({e})") from None
    checkpoint = load_torch_checkpoint(path)
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a translator checkpoint (no 'state_dict')")
    return {k.removeprefix("model.").removeprefix("_orig_mod."): v
            for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def average_weights(paths: list[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several checkpoints' weights (Section 6.1: the last 5 or 20 checkpoints)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        weights = read_weights(path)
        if total and set(weights) != set(total):
            raise CheckpointError(f"{path}: its parameters differ from {paths[0]}'s; cannot average them")
        for name, tensor in weights.items():
            total[name] = total.get(name, 0) + tensor.double()
    return {name: (tensor / len(paths)).float() for name, tensor in total.items()}


_STEP = re.compile(r"step(\d+)\.ckpt$")


def periodic_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The kept periodic checkpoints of a run, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir, CHECKPOINTS).glob("step*.ckpt") if (m := _STEP.search(p.name))]
    return [p for _, p in sorted(found)]


def read_recipe(run_dir: str | os.PathLike) -> Recipe:
    from .config import load_recipe

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG})")
    try:
        return load_recipe(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def write_recipe(recipe: Recipe, run_dir: str | os.PathLike) -> None:
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
    write_atomic(Path(run_dir) / CONFIG, text.encode("utf-8"))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A model ready for inference, its tokenizer and recipe, from a run directory (model.safetensors, else
    the last checkpoint) or from a weights file inside one (a .safetensors or .ckpt)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if path.is_dir():
        run_dir = path
        weights = path / WEIGHTS if (path / WEIGHTS).is_file() else path / CHECKPOINTS / "last.ckpt"
        if not weights.is_file():
            raise CheckpointError(f"{path}: holds no {WEIGHTS} and no {CHECKPOINTS}/last.ckpt")
    elif path.suffix not in (".safetensors", ".ckpt"):
        raise CheckpointError(f"{path}: not a model; pass a run directory, or a .safetensors or .ckpt file in one")
    else:
        weights = path
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    recipe = read_recipe(run_dir)
    tokenizer = Tokenizer(run_dir / TOKENIZER)
    if tokenizer.vocab_size != recipe.model.vocab_size:
        raise CheckpointError(f"{run_dir / TOKENIZER}: a {tokenizer.vocab_size}-piece sentencepiece model, but the model in "
                              f"{run_dir / CONFIG} has a vocabulary of {recipe.model.vocab_size}; they are not one run's")
    model = build_model(recipe.model)
    state = read_weights(weights)
    expected = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:  # load_state_dict would list every mismatch over many lines without naming the file
        name, got, want = wrong[0]
        raise CheckpointError(f"{weights}: weights of another model shape than {run_dir / CONFIG} describes "
                              f"({len(wrong)} tensor(s) differ, e.g. {name}: {list(got)} vs {list(want)})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = {"tgt_embed.token.weight"} if recipe.model.share_embeddings else set()
    if set(missing) - shared or unexpected:
        raise CheckpointError(f"{weights}: weights do not fit the model in {run_dir / CONFIG} "
                              f"(missing {sorted(set(missing) - shared)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.to(device).eval(), tokenizer, recipe


def export_weights(run_dir: str | os.PathLike, average_last: int) -> dict[str, Any]:
    """Write run_dir/model.safetensors: the average of the last `average_last` periodic checkpoints (plus
    last.ckpt when it is newer), or last.ckpt alone. Returns what was written, also saved as model.json."""
    run_dir = Path(run_dir)
    candidates = periodic_checkpoints(run_dir)
    last = run_dir / CHECKPOINTS / "last.ckpt"
    if last.is_file():
        last_step = load_torch_checkpoint(last).get("global_step", -1)
        steps = [int(_STEP.search(p.name).group(1)) for p in candidates]
        if not steps or last_step > max(steps):
            candidates.append(last)
    chosen = candidates[-max(1, average_last):]
    if not chosen:
        raise CheckpointError(f"{run_dir}: no checkpoints to export")
    save_weights(average_weights(chosen), run_dir / WEIGHTS)
    return write_weights_info(run_dir, chosen)


def write_weights_info(directory: Path, averaged: list[Path]) -> dict[str, Any]:
    """model.json beside a model.safetensors: which checkpoints its weights are the mean of."""
    info = {"weights": WEIGHTS, "averaged": [p.name for p in averaged]}
    write_atomic(directory / WEIGHTS_INFO, json.dumps(info, indent=2).encode())
    return info
