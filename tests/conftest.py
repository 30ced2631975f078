import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    """Tests on the trained toy model wait for its training (about 15 s, once): slow, for `pytest -m "not slow"`."""
    for item in items:
        if {"toy_model_dir", "toy_heads_dir", "toy_chain_heads_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test saying what is missing (fail, under CI's
    TRANSLATOR_REQUIRE_SHARED_DATA=1: a skipped check is no check)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"needs {path} (the shared data directory beside the checkout); not found"
        if os.environ.get("TRANSLATOR_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


EN = "a the dog cat man woman child ball red blue green big small runs jumps sits plays eats with on in near".split()
DE = "ein der Hund Katze Mann Frau Kind Ball rot blau grün groß klein rennt springt sitzt spielt isst mit auf in nahe".split()


def write_toy_corpus(directory: Path, n_train: int = 2000, n_valid: int = 100, seed: int = 0) -> Path:
    """A toy 'translation' task: each English word maps to one German word, order kept. Files
    toy/{train,valid}.{en,de} under `directory`, which is returned (use it as the data directory)."""
    import random

    rng = random.Random(seed)
    out = directory / "toy"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid)):
        pairs = []
        for _ in range(n):
            idx = [rng.randrange(len(EN)) for _ in range(rng.randint(3, 9))]
            pairs.append((" ".join(EN[i] for i in idx), " ".join(DE[i] for i in idx)))
        (out / f"{split}.en").write_text("".join(p[0] + "\n" for p in pairs))
        (out / f"{split}.de").write_text("".join(p[1] + "\n" for p in pairs))
    return directory


TOY_RECIPE = """\
model:
  preset: tiny
  d_model: 64
  d_ff: 128
  n_heads: 4
data:
  src_lang: en
  tgt_lang: de
  train: toy/train.{lang}
  valid: toy/valid.{lang}
tokenizer:
  vocab_size: 400
train:
  max_tokens: 2000
  max_steps: 240
  warmup: 60
  lr_scale: 0.3
  val_every: 80
  save_every: 80
  keep_last: 3
  log_every: 10
decode:
  beam: 2
  average_last: 2
"""


@pytest.fixture
def toy_run(tmp_path):
    """(data directory, recipe path) for a tiny model on the toy corpus."""
    data_dir = write_toy_corpus(tmp_path / "data")
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(TOY_RECIPE)
    return data_dir, recipe


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    """A toy translation run trained once per test session (about 15 s): a run directory and its data dir."""
    from translator.config import load_recipe
    from translator.training import fit

    root = tmp_path_factory.mktemp("toy_model")
    data_dir = write_toy_corpus(root / "data")
    (root / "toy.yaml").write_text(TOY_RECIPE)
    run = fit(load_recipe(root / "toy.yaml"), root / "run", data_dir=str(data_dir), progress_bar=False)
    return run, data_dir


def _train_toy_heads(toy_model_dir, tmp_path_factory, *overrides):
    from translator.config import load_recipe
    from translator.training import fit

    run_dir, data_dir = toy_model_dir
    root = tmp_path_factory.mktemp("toy_heads")
    recipe = load_recipe(run_dir / "config.yaml", ["--model.draft_heads=3", "--train.freeze=base",
                                                   f"--train.init_from={run_dir}", "--train.max_steps=150",
                                                   "--train.warmup=30", "--train.lr_scale=1.0", *overrides])
    return fit(recipe, root / "run", data_dir=str(data_dir), progress_bar=False)


@pytest.fixture(scope="session")
def toy_heads_dir(toy_model_dir, tmp_path_factory):
    """Three draft heads trained onto the toy model with its weights frozen (a few seconds): a run directory."""
    return _train_toy_heads(toy_model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def toy_chain_heads_dir(toy_model_dir, tmp_path_factory):
    """The same with chained heads (model.draft_chain)."""
    return _train_toy_heads(toy_model_dir, tmp_path_factory, "--model.draft_chain=true")
