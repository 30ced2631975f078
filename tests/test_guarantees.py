"""What translator promises, tested: the translate line contract, batch invariance, exact resume after
SIGKILL, crash-safe checkpoints, safe loading, numerical guards, clear errors, concurrent use."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from translator.checkpoint import CheckpointError, load_model, load_torch_checkpoint, read_weights
from translator.cli import main, translate_lines
from translator.config import DecodeConfig
from translator.data import read_lines

PYTHON = [sys.executable, "-m", "translator.cli"]


def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- The line contract of translate ------------------------------------------------------------------------

def test_control_characters_and_mixed_scripts_keep_their_lines(toy_model_dir, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    lines = ["the dog\x0bruns", "a cat\x1c\x1d\x1esits", "the\u2028man\u2029eats", "ball\x85red",
             "tab\tseparated\twords", "Der Hund läuft — العربية 中文 😀", "\x00\x07\x1b[31m", "\u200f\u202e",
             "the woman", "\r", "a child\r"]
    source = tmp_path / "in.en"
    source.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    code, _, err = cli(["translate", "--model", run_dir, "-i", source, "-o", tmp_path / "out.de"], capsys)
    assert code == 0, err
    out = (tmp_path / "out.de").read_bytes().decode("utf-8").split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == ""
    assert out[9] == ""  # a lone carriage return is an empty line
    assert all("\r" not in line for line in out)
    assert out[8] == translate_one(run_dir, "the woman")  # ordinary lines are untouched by their neighbours


def translate_one(run_dir, text, **kw):
    model, tokenizer, recipe = load_model(run_dir)
    return translate_lines(model, tokenizer, [text], recipe.decode, **kw).texts[0][0]


# -- Batch invariance ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_a_translation_does_not_depend_on_its_batch(toy_model_dir, mode):
    run_dir, data_dir = toy_model_dir
    model, tokenizer, recipe = load_model(run_dir)
    lines = read_lines(data_dir / "toy/valid.en")[:64]
    options = DecodeConfig(beam=4, batch_tokens=100_000)
    batched = [r[0] for r in translate_lines(model, tokenizer, lines, options, mode).texts]
    small_batches = [r[0] for r in translate_lines(model, tokenizer, lines, DecodeConfig(beam=4, batch_tokens=40), mode).texts]
    alone = [translate_lines(model, tokenizer, [line], options, mode).texts[0][0] for line in lines]
    assert batched == alone == small_batches
    assert len(set(batched)) > 50  # real, varied translations


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_batch_invariance_holds_where_the_output_limit_binds(toy_model_dir, mode):
    """A model that never ends on its own: every output runs to its sentence's limit, the paper's source length
    + b (EOS not counted), whatever the lengths of the other sentences padded into its batch."""
    from translator.inference import translate_ids

    model, _, _ = load_model(toy_model_dir[0])
    real_step = model.step

    def never_ends(tokens, state):
        logits = real_step(tokens, state)
        logits[:, model.cfg.eos_id] = -1e4
        return logits

    model.step = never_ends
    lengths = [1, 3, 8, 2, 13, 5]
    sources = [[4 + (i * 7 + j) % 300 for j in range(n)] for i, n in enumerate(lengths)]
    options = DecodeConfig(beam=2, max_len_a=1.0, max_len_b=3, batch_tokens=100_000)
    batched = translate_ids(model, sources, options, mode=mode)
    alone = [translate_ids(model, [source], options, mode=mode)[0] for source in sources]
    assert batched == alone
    assert [len(out[0]) for out in batched] == [n + 3 for n in lengths]


# -- Exact resume after SIGKILL ------------------------------------------------------------------------------

def train_args(recipe, data_dir, out, *extra):
    return [*PYTHON, "train", "--config", str(recipe), "--data-dir", str(data_dir), "--out", str(out), "--no-progress",
            "--max-steps", "60", "--model.dropout=0.1", "--train.save_every=5", "--train.val_every=1000",
            "--train.keep_last=30", "--train.log_every=5", *extra]


def logged_losses(run_dir, version="*"):
    losses = {}
    for path in sorted(Path(run_dir, "logs").glob(f"version_{version}/metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("train/loss"):
                losses[int(row["step"])] = float(row["train/loss"])
    return losses


@pytest.mark.slow
def test_a_killed_run_resumes_exactly(toy_run, tmp_path):
    data_dir, recipe = toy_run
    straight = tmp_path / "straight"
    subprocess.run(train_args(recipe, data_dir, straight), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    # First a process stopped before any periodic checkpoint (as by --max-minutes): its last.ckpt is then
    # a file the periodic saves of the resumed process must keep replacing (not write last-v1.ckpt beside).
    subprocess.run(train_args(recipe, data_dir, killed, "--max-steps", "3"), check=True, capture_output=True,
                   timeout=300)
    process = subprocess.Popen(train_args(recipe, data_dir, killed, "--resume"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step0000015.ckpt").exists():  # mid-epoch: an epoch is ~12 batches
        assert time.time() < deadline and process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "checkpoints" / "step0000060.ckpt").exists()
    stopped_at = load_torch_checkpoint(killed / "checkpoints" / "last.ckpt")["global_step"]
    # step 15's periodic checkpoint is written before last.ckpt, so a kill between the two leaves last at 10
    assert stopped_at in range(10, 60, 5)

    subprocess.run(train_args(recipe, data_dir, killed, "--resume"), check=True, capture_output=True, timeout=300)
    a, b = read_weights(straight / "checkpoints/last.ckpt"), read_weights(killed / "checkpoints/last.ckpt")
    final = load_torch_checkpoint(killed / "checkpoints/last.ckpt")
    assert final["global_step"] == 60 and set(final["rng_states"][0]) == {"cpu", "cuda"}
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # The loss trajectory after the resume (logged by the resumed process; a killed process loses its unflushed
    # log rows) matches the uninterrupted run's, step for step.
    expected, resumed = logged_losses(straight), logged_losses(killed, version="2")
    assert len(expected) == 12 and sorted(resumed) == [s for s in sorted(expected) if s > stopped_at]
    assert all(abs(expected[s] - resumed[s]) < 1e-5 for s in resumed)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("step")) == ["last.ckpt"]


def test_last_ckpt_is_replaced_atomically(tmp_path, monkeypatch):
    """Pointing last.ckpt at a new checkpoint never leaves a moment without a last.ckpt (Lightning's own link
    deleted it first: a kill then left nothing to resume from)."""
    from types import SimpleNamespace

    from translator.callbacks import PeriodicCheckpoints

    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for name in ("step0000005.ckpt", "step0000010.ckpt"):
        torch.save({"global_step": int(name[4:11])}, directory / name)
    last = directory / "last.ckpt"
    last.symlink_to("step0000005.ckpt")
    seen = []
    real_symlink, real_replace = os.symlink, os.replace
    monkeypatch.setattr(os, "symlink", lambda *a, **k: (seen.append(last.exists()), real_symlink(*a, **k)))
    monkeypatch.setattr(os, "replace", lambda *a, **k: (seen.append(last.exists()), real_replace(*a, **k)))
    monkeypatch.setattr(os, "remove", lambda path: (seen.append(last.exists()), os.unlink(path)))
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    PeriodicCheckpoints._link_checkpoint(trainer, str(directory / "step0000010.ckpt"), str(last))
    assert seen and all(seen)  # last.ckpt existed at every file-system operation
    assert last.is_symlink() and load_torch_checkpoint(last)["global_step"] == 10
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", "step0000005.ckpt", "step0000010.ckpt"]


def test_random_states_of_every_device_are_saved_and_restored(monkeypatch):
    """The code path a GPU takes, on a CPU: CUDA's generators (faked here) go into the checkpoint and come back."""
    import translator.training as training

    cuda_states = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in cuda_states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    torch.manual_seed(11)
    states = training.rng_states()
    expected = torch.rand(5)
    torch.rand(100)
    training.restore_rng_states(states)
    assert torch.equal(torch.rand(5), expected)  # the CPU generator continues where it was saved
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], cuda_states))


# -- Crash-safe, safe-to-load checkpoints -------------------------------------------------------------------

WRITER = """
import sys, torch
from translator.checkpoint import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"state_dict": {"model.w": torch.ones(3)}, "global_step": 1}, sys.argv[1])
print("first saved", flush=True)
io.save_checkpoint({"state_dict": {"model.w": torch.zeros(200_000_000)}, "global_step": 2}, sys.argv[1])
print("second saved", flush=True)
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "first saved"
    deadline = time.time() + 60
    while not any(p.stat().st_size > 1_000_000 for p in tmp_path.glob(".last.ckpt.tmp*")):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint = load_torch_checkpoint(path)
    assert checkpoint["global_step"] == 1 and checkpoint["state_dict"]["model.w"].tolist() == [1.0, 1.0, 1.0]


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_no_temporary_file(tmp_path):
    from translator.checkpoint import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"model.w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(Exception):  # fails mid-write (as a full disk would): a lambda cannot be pickled
        io.save_checkpoint({"state_dict": {"model.w": torch.zeros(1_000_000)}, "hook": lambda: 0}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert load_torch_checkpoint(path)["global_step"] == 1


def test_truncated_or_corrupt_checkpoints_give_a_clear_error(toy_model_dir, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken, symlinks=False)
    ckpt = broken / "checkpoints" / "step0000240.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint"):
        load_torch_checkpoint(ckpt)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = cli(["translate", "--model", broken], capsys)
    assert code == 1 and "model.safetensors: corrupt or truncated weights" in err and "Traceback" not in err
    (broken / "checkpoints" / "last.ckpt").unlink()
    (broken / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint at all")
    code, _, err = cli(["train", "--out", broken, "--resume", "--data-dir", tmp_path], capsys)
    assert code == 1 and "last.ckpt: corrupt or truncated checkpoint" in err


class Payload:
    """Unpickling this runs `touch` on a marker file: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_is_refused_without_running_it(toy_model_dir, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(1)}, "extra": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_torch_checkpoint(evil)
    # Through the CLI: a run directory whose weights come from that checkpoint.
    hostile = tmp_path / "run"
    hostile.mkdir()
    for name in ("config.yaml", "spm.model"):
        shutil.copy(run_dir / name, hostile / name)
    (hostile / "checkpoints").mkdir()
    shutil.copy(evil, hostile / "checkpoints" / "last.ckpt")
    code, _, err = cli(["translate", "--model", hostile], capsys)
    assert code == 1 and "refused to load" in err
    assert not marker.exists()
    # Nor does resuming a run whose last.ckpt is that checkpoint.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(run_dir / "config.yaml", resumed / "config.yaml")
    (resumed / "checkpoints").mkdir()
    shutil.copy(evil, resumed / "checkpoints" / "last.ckpt")
    code, _, err = cli(["train", "--out", resumed, "--resume", "--data-dir", toy_model_dir[1]], capsys)
    assert code == 1 and "last.ckpt: refused to load" in err, err
    assert not marker.exists()
    # Sanity check that the payload is live: plain unpickling would run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


# -- Numerical guards ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_nan_or_inf_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(toy_run, tmp_path, monkeypatch,
                                                                                            capsys, poison):
    import translator.training as training

    data_dir, recipe = toy_run
    real_loss, calls = training.label_smoothed_loss, {"n": 0}

    def poisoned(logits, target, epsilon, pad_id):
        loss, nll = real_loss(logits, target, epsilon, pad_id)
        if logits.requires_grad:  # training, not validation
            calls["n"] += 1
            if calls["n"] == 13:
                return loss * float(poison), nll
        return loss, nll

    monkeypatch.setattr(training, "label_smoothed_loss", poisoned)
    run = tmp_path / "run"
    code, _, err = cli(["train", "--config", recipe, "--data-dir", data_dir, "--out", run, "--no-progress",
                        "--train.save_every=5"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1].startswith(f"translator: error: training loss is {poison} at step 13; stopped.")
    last = load_torch_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 10
    assert all(torch.isfinite(w).all() for w in last["state_dict"].values())


# -- Bad configuration and arguments: one line, non-zero exit ---------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--model.d_model=90"], "d_model=90 is not divisible by n_heads=4"),
    (["--model.preset=transformer_huge"], "unknown model preset 'transformer_huge'"),
    (["--train.precision=fp8"], "train.precision='fp8'"),
    (["--decode.beam=0"], "decode.beam=0 must be at least 1"),
    (["--data.train=absent/train.{lang}"], r"missing file\(s\)"),
    (["--train.max_tokens=-5"], "must be positive"),
    (["--devices", "two"], "--devices 'two': expected a number or auto"),
    (["--data.tgt_lang=en"], "data.src_lang and data.tgt_lang are both 'en'"),
    (["--train.log_every=0"], "train.log_every=0 must be positive"),
    (["--train.save_every=-5"], "train.save_every=-5 must be positive"),
    (["--train.keep_last=0"], "train.keep_last=0 must be positive"),
    (["--decode.average_last=0"], "decode.average_last=0 must be positive"),
    (["--data.max_len=0"], "data.max_len=0 must be positive"),
    (["--decode.beam_stop=never"], "decode.beam_stop='never'"),
    (["--decode.mbr=1"], "decode.mbr=1: expected 0 \\(off\\) or at least 2"),
    (["--decode.mbr_weights=posterior"], "decode.mbr_weights='posterior'"),
    (["--model.pad_id=5"], "model.pad_id/bos_id/eos_id/unk_id are 5/1/2/3"),
    (["--data.task=lm", "--model.preset=lm_tiny", "--model.prefix_lm=true", "--model.n_encoder_layers=0",
      "--data.block_size=64"],
     "model.prefix_lm applies to translation"),
])
def test_bad_configuration_is_one_clear_line(toy_run, tmp_path, capsys, args, message):
    import re

    data_dir, recipe = toy_run
    try:
        code, _, err = cli(["train", "--config", recipe, "--data-dir", data_dir, "--out", tmp_path / "r", *args], capsys)
    except SystemExit as e:  # argparse errors exit 2 with usage and one error line
        code, err = e.code, capsys.readouterr().err
    assert code != 0
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "spm.model").exists()  # refused before any work


def test_errors_that_libraries_would_print_over_many_lines_are_one(toy_run, toy_model_dir, tmp_path, capsys):
    data_dir, recipe = toy_run
    broken = tmp_path / "broken.yaml"
    broken.write_text(recipe.read_text().replace("  max_tokens: 2000", "  max_tokens: [2000"))
    code, _, err = cli(["train", "--config", broken, "--data-dir", data_dir, "--out", tmp_path / "r"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{broken}:" in err and "not valid YAML" in err
    # A GPU asked for where there is none: refused before the tokenizer is trained.
    if not torch.cuda.is_available():
        code, _, err = cli(["train", "--config", recipe, "--data-dir", data_dir, "--out", tmp_path / "g", "--device",
                            "cuda"], capsys)
        assert code == 1 and err.strip() == ("translator: error: a GPU was asked for (--device cuda or "
                                             "train.accelerator), but no CUDA device is available")
        assert not (tmp_path / "g" / "spm.model").exists()
    run_dir, _ = toy_model_dir
    # Weights of another shape (a wider model's) under this run's config.
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    from translator import ModelConfig, build_model
    from translator.checkpoint import save_weights

    wide = build_model(ModelConfig.from_name("tiny", vocab_size=400, d_model=96, d_ff=128, n_heads=4))
    save_weights(wide.state_dict(), other / "model.safetensors")
    code, _, err = cli(["translate", "--model", other], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{other / 'model.safetensors'}: weights of another model shape than" in err and "[96]" in err
    # A tokenizer that is not the model's (another vocabulary size).
    mismatched = tmp_path / "mismatched"
    shutil.copytree(run_dir, mismatched)
    from translator.data import Tokenizer

    Tokenizer.train(read_lines(data_dir / "toy/train.en"), mismatched / "spm.model", vocab_size=350)
    code, _, err = cli(["translate", "--model", mismatched], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "spm.model: a 350-piece sentencepiece model, but the model in" in err and "vocabulary of 400" in err


def test_a_run_directory_from_another_version_is_refused(toy_model_dir, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["format_version"] = 99
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli(["translate", "--model", other], capsys)
    assert code == 1 and "config format 99; this one reads format 1" in err


# -- Concurrency ---------------------------------------------------------------------------------------------

def test_two_translate_processes_share_a_model_directory(toy_model_dir, tmp_path):
    run_dir, data_dir = toy_model_dir
    source = data_dir / "toy/valid.en"
    procs = [subprocess.Popen([*PYTHON, "translate", "--model", str(run_dir), "-i", str(source), "-o",
                               str(tmp_path / f"out{i}.de")], stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    a, b = ((tmp_path / f"out{i}.de").read_text() for i in range(2))
    assert a == b and len(a.splitlines()) == 100
