import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from translator import build_model
from translator.checkpoint import load_model, read_weights
from translator.cli import main
from translator.config import ModelConfig, load_recipe
from translator.data import read_lines
from translator.inference import translate_ids
from translator.training import (dropout_rates, fit, inverse_sqrt_lr, label_smoothed_loss, resolve_precision,
                                 symmetric_kl)

ROOT = Path(__file__).resolve().parents[1]


def test_learning_rate_follows_the_paper():
    lr = inverse_sqrt_lr(d_model=512, warmup=4000)
    peak = 512 ** -0.5 * 4000 ** -0.5
    assert lr(4000) == pytest.approx(peak)
    assert lr(2000) == pytest.approx(peak / 2)  # linear warmup
    assert lr(16000) == pytest.approx(peak / 2)  # inverse square root decay
    assert inverse_sqrt_lr(512, 4000, scale=2.0)(100) == pytest.approx(2 * lr(100))
    cooled = inverse_sqrt_lr(512, 4000, cooldown=1000, max_steps=10000)
    assert cooled(9000) == pytest.approx(lr(9000))  # the paper's rate until the cooldown starts
    assert cooled(9501) == pytest.approx(lr(9501) * 0.5)  # then a linear fall
    assert cooled(10000) == pytest.approx(lr(10000) / 1000) and cooled(10001) == 0.0


def test_held_learning_rate_stays_at_the_peak_until_the_cooldown():
    paper = inverse_sqrt_lr(512, 4000, cooldown=1000, max_steps=10000)
    held = inverse_sqrt_lr(512, 4000, cooldown=1000, max_steps=10000, hold=True)
    peak = 512 ** -0.5 * 4000 ** -0.5
    assert held(2000) == pytest.approx(paper(2000))  # the same warmup
    assert held(4000) == held(6000) == held(9000) == pytest.approx(peak)  # then no inverse square root fall
    assert paper(9000) == pytest.approx(peak * (4000 / 9000) ** 0.5)
    assert held(9501) == pytest.approx(peak * 0.5) and held(10001) == 0.0  # the same linear cooldown


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_smoothed_loss_matches_torch_and_its_gradient(dtype):
    logits = torch.randn(3, 5, 40, dtype=torch.float32).to(dtype).requires_grad_()
    target = torch.randint(1, 40, (3, 5))
    target[0, 3:] = 0
    loss, nll = label_smoothed_loss(logits, target, 0.1, pad_id=0)
    loss.backward()
    reference = logits.detach().float().requires_grad_()
    expected = F.cross_entropy(reference.view(-1, 40), target.view(-1), ignore_index=0, label_smoothing=0.1,
                               reduction="sum")
    expected.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss.item() == pytest.approx(expected.item(), rel=tol)
    assert nll.item() == pytest.approx(F.cross_entropy(reference.view(-1, 40), target.view(-1), ignore_index=0,
                                                       reduction="sum").item(), rel=tol)
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), reference.grad, atol=tol, rtol=tol)
    assert (logits.grad[0, 3:] == 0).all()  # padding takes no gradient


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"),
                                                          (False, False, "32")])
def test_precision_auto_is_bf16_where_the_cpu_multiplies_it(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", "cpu") == expected
    if not torch.cuda.is_available():  # --device auto on a machine without a GPU: the CPU decides
        assert resolve_precision("auto", None) == expected
    for explicit in ("32", "bf16-mixed", "16-mixed"):
        assert resolve_precision(explicit, "cpu") == explicit
    assert load_recipe(ROOT / "recipes/multi30k/en_de.yaml", ["train.precision=auto"]).train.precision == "auto"


def val_losses(run_dir):
    import csv

    rows = []
    for path in sorted(Path(run_dir, "logs").glob("version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(path)) if r.get("val/loss")]
    return [(int(r["step"]), float(r["val/loss"]), float(r["val/bleu"])) for r in rows]


@pytest.mark.slow
def test_training_lowers_validation_loss_and_leaves_a_loadable_run(toy_run, tmp_path):
    import sacrebleu

    data_dir, recipe_path = toy_run
    run = fit(load_recipe(recipe_path), tmp_path / "run", data_dir=str(data_dir), progress_bar=False)
    history = val_losses(run)
    assert [step for step, _, _ in history] == [79, 159, 239]
    # How far 240 steps get depends on the CPU's floating-point paths (on one AVX2 CPU: loss 1.75 -> 0.72, BLEU
    # 2.8 -> 50.0): the bounds ask for clear learning, with room for that.
    assert history[-1][1] < 0.5 * history[0][1], history
    assert history[-1][2] > 40 > 10 > history[0][2], history  # validation BLEU
    for name in ("config.yaml", "spm.model", "model.safetensors", "model.json", "checkpoints/last.ckpt",
                 "checkpoints/best.ckpt", "checkpoints/step0000240.ckpt"):
        assert (run / name).is_file(), name
    assert len(list((run / "checkpoints").glob("step*.ckpt"))) == 3  # keep_last
    # The run directory alone gives a working translator.
    model, tokenizer, recipe = load_model(run)
    assert recipe.model.vocab_size == tokenizer.vocab_size == 400
    src, ref = read_lines(data_dir / "toy/valid.en"), read_lines(data_dir / "toy/valid.de")
    out = translate_ids(model, tokenizer.encode(src), recipe.decode)
    assert sacrebleu.corpus_bleu(tokenizer.decode([o[0] for o in out]), [ref]).score > 50


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["tokenizer.sampling={alpha: 0.2}"], ["train.precision=bf16-mixed"],
                                       ["model.dropout=0.1", "model.word_dropout=0.1", "train.dropout_ramp=20"]],
                         ids=["plain", "subword_sampling", "bf16", "dropout_ramp"])
def test_resume_continues_to_the_same_weights(toy_run, tmp_path, overrides):
    data_dir, recipe_path = toy_run
    straight = fit(load_recipe(recipe_path, overrides), tmp_path / "a", data_dir=str(data_dir), max_steps=30,
                   progress_bar=False)
    fit(load_recipe(recipe_path, overrides), tmp_path / "b", data_dir=str(data_dir), max_steps=13, progress_bar=False)
    resumed = fit(load_recipe(recipe_path, overrides), tmp_path / "b", data_dir=str(data_dir), max_steps=30,
                  resume=True, progress_bar=False)
    a, b = read_weights(straight / "checkpoints/last.ckpt"), read_weights(resumed / "checkpoints/last.ckpt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    if "tokenizer.sampling={alpha: 0.2}" in overrides:  # and the sampling changed what was trained on
        plain = fit(load_recipe(recipe_path), tmp_path / "c", data_dir=str(data_dir), max_steps=30, progress_bar=False)
        c = read_weights(plain / "checkpoints/last.ckpt")
        assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3
        return
    with pytest.raises(Exception, match="already holds a run; pass --resume"):
        fit(load_recipe(recipe_path), tmp_path / "b", data_dir=str(data_dir), max_steps=60, progress_bar=False)


def test_dropout_rates_name_every_source_of_training_noise():
    """Scaled to zero, the rates train.dropout_ramp scales leave a model in training mode deterministic: no dropout
    is missed. At their set values it is not."""
    cfg = ModelConfig.from_name("tiny", vocab_size=50, dropout=0.2, attention_dropout=0.1, activation_dropout=0.1,
                                word_dropout=0.1)
    model = build_model(cfg).train()
    rates = dropout_rates(model)
    blocks = cfg.n_encoder_layers + cfg.n_decoder_layers
    # Per block: the residual dropout, the feed-forward's, self-attention's (+ cross-attention's in the decoder);
    # per embedding (source, target): dropout and word dropout.
    assert len(rates) == 3 * blocks + cfg.n_decoder_layers + 4
    assert sorted({rate for _, _, rate in rates}) == [0.1, 0.2]
    src, tgt = torch.randint(4, 50, (3, 7)), torch.randint(4, 50, (3, 5))
    assert not torch.equal(model(src, tgt), model(src, tgt))
    for module, name, _ in rates:
        setattr(module, name, 0.0)
    assert torch.equal(model(src, tgt), model(src, tgt))


@pytest.mark.slow
def test_dropout_ramp_rises_linearly_to_the_set_rates(toy_run, tmp_path):
    import csv

    data_dir, recipe_path = toy_run
    run = fit(load_recipe(recipe_path, ["model.dropout=0.1", "train.dropout_ramp=25", "train.log_every=5"]),
              tmp_path / "run", data_dir=str(data_dir), max_steps=40, progress_bar=False)
    logged = {int(r["step"]): float(r["dropout_scale"])
              for r in csv.DictReader(open(next(Path(run, "logs").glob("version_*/metrics.csv"))))
              if r.get("dropout_scale")}
    assert sorted(logged) == list(range(4, 40, 5))
    for step, scale in logged.items():  # the step's rates, step counting from 1
        assert scale == pytest.approx(min(1.0, (step + 1) / 25)), (step, scale)


def test_a_new_run_never_writes_over_files_it_did_not_write(toy_run, tmp_path):
    data_dir, recipe_path = toy_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("# my own notes\n")
    (out / "results.txt").write_text("keep")
    with pytest.raises(Exception, match=r"out: holds files a run did not write \(config.yaml, results.txt\)"):
        fit(load_recipe(recipe_path), out, data_dir=str(data_dir), max_steps=2, progress_bar=False)
    assert (out / "config.yaml").read_text() == "# my own notes\n" and len(list(out.iterdir())) == 2


@pytest.mark.slow
def test_same_seed_same_run_bit_for_bit(toy_run, tmp_path):
    """Determinism on CPU: the same recipe and seed give identical weights, losses and BLEU; another seed does not."""
    data_dir, recipe_path = toy_run
    # With dropout: the random masks must repeat too.
    runs = [fit(load_recipe(recipe_path, [f"train.seed={seed}", "model.dropout=0.1"]), tmp_path / name,
                data_dir=str(data_dir), max_steps=80, progress_bar=False) for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    a, b, c = (read_weights(run / "model.safetensors") for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert val_losses(runs[0]) == val_losses(runs[1])  # the same loss and validation BLEU, to the last digit
    assert val_losses(runs[0]) != val_losses(runs[2])


@pytest.mark.slow
def test_two_process_ddp_on_cpu_through_the_cli(toy_run, tmp_path):
    data_dir, recipe_path = toy_run
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "translator.cli", "train", "--config", str(recipe_path), "--data-dir", str(data_dir),
         "--out", str(run), "--max-steps", "6", "--device", "cpu", "--devices", "2", "--strategy", "ddp",
         "--no-progress", "--train.val_every=3", "--train.save_every=3"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    assert val_losses(run)  # validation ran, its loss gathered over both ranks
    # One store, prepared once by rank 0, read by both ranks.
    assert result.stderr.count("sentencepiece model on") == 1 and (run / "data" / "manifest.json").is_file()
    assert {f"rank {r}: first training step" in result.stderr for r in (0, 1)} == {True}
    assert result.stderr.count("; precision 32-true") == 2  # the recipe's float32, named as Lightning runs it
    assert len(checkpoint["rng_states"]) == 2  # each rank's generators


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "recipes" / "**" / "*.yaml"), recursive=True)))
def test_every_recipe_parses_and_builds_its_model(path):
    recipe = load_recipe(path)
    text = Path(path).read_text()
    assert text.startswith("#") and "translator " in text.split("\n\n")[0]  # opens with data needed and command
    recipe.model.vocab_size = recipe.tokenizer.vocab_size
    with torch.device("meta"):
        model = build_model(recipe.model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_recipes_cover_the_paper_and_the_benchmarks():
    names = {str(Path(p).relative_to(ROOT / "recipes")) for p in glob.glob(str(ROOT / "recipes/**/*.yaml"), recursive=True)}
    assert {"multi30k/en_de.yaml", "multi30k/de_en.yaml", "iwslt14/de_en.yaml", "wmt14/en_de_base.yaml",
            "wmt14/en_de_big.yaml", "lm/multi30k_de.yaml"} <= names


# -- Bad input: one clear line, non-zero exit ---------------------------------------------------------------

def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("breakage, message", [
    ("mismatch", "has 2000 lines but .* has 1999"),
    ("missing", r"missing file\(s\) .*train.de"),
    ("not_utf8", r"train.de:5: not valid UTF-8"),
    ("empty", "empty corpus"),
    ("unknown_key", r"train: unknown key\(s\) max_tokns; valid keys: seed, max_tokens"),
    ("bad_type", r"max_tokens='lots' has type str; expected int"),
])
def test_bad_input_is_one_clear_error(toy_run, tmp_path, capsys, breakage, message):
    import re

    data_dir, recipe_path = toy_run
    de = data_dir / "toy" / "train.de"
    overrides = []
    if breakage == "mismatch":
        de.write_text("".join(line + "\n" for line in read_lines(de)[:-1]))
    elif breakage == "missing":
        de.unlink()
    elif breakage == "not_utf8":
        lines = de.read_bytes().split(b"\n")
        lines[4] = b"kaputt \xc3\x28"
        de.write_bytes(b"\n".join(lines))
    elif breakage == "empty":
        de.write_text("")
        (data_dir / "toy" / "train.en").write_text("")
    elif breakage == "unknown_key":
        overrides = ["--train.max_tokns=5"]
    elif breakage == "bad_type":
        overrides = ["--train.max_tokens=lots"]
    code, err = run_cli(["train", "--config", str(recipe_path), "--data-dir", str(data_dir), "--out",
                         str(tmp_path / "run"), "--no-progress", *overrides], capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("translator: error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert "Traceback" not in err


@pytest.mark.slow
def test_language_model_perplexity_falls_on_held_out_text(tmp_path):
    import csv
    import random

    from .conftest import DE

    # Lines walk a fixed cycle of words from a random start: only the first word of a line is uncertain.
    rng = random.Random(0)
    (tmp_path / "text").mkdir()
    for split, n in (("train", 1500), ("valid", 100)):
        lines = []
        for _ in range(n):
            k = rng.randrange(len(DE))
            lines.append(" ".join(DE[(k + i) % len(DE)] for i in range(rng.randint(4, 12))))
        (tmp_path / "text" / f"{split}.de").write_text("".join(line + "\n" for line in lines))
    recipe = tmp_path / "lm.yaml"
    recipe.write_text("""
model: {preset: lm_tiny, d_model: 64, d_ff: 128, n_heads: 4}
data: {task: lm, tgt_lang: de, train: "text/train.{lang}", valid: "text/valid.{lang}", block_size: 32}
tokenizer: {vocab_size: 400}
train: {max_tokens: 1024, max_steps: 60, warmup: 30, lr_scale: 0.5, val_every: 10, save_every: 30,
        label_smoothing: 0.0}
decode: {average_last: 1}
""")
    run = fit(load_recipe(recipe), tmp_path / "lm", data_dir=str(tmp_path), progress_bar=False)
    rows = [r for r in csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))) if r.get("val/ppl")]
    ppl = [float(r["val/ppl"]) for r in rows]
    assert len(ppl) == 6 and ppl[-1] < 0.2 * ppl[0] and ppl[-1] < 3, ppl
    model, _, recipe = load_model(run)
    assert model.cfg.arch == "decoder_only" and recipe.data.task == "lm"


# -- Loss normalisation, compiled runs, throughput logging -------------------------------------------------

class Batches:
    """Hand-made batches as a loader: Lightning iterates it once per epoch."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def batch_of(pairs, pad=0, bos=1, eos=2):
    """A training batch from (source ids, target ids) pairs, padded as TokenBatches pads them."""
    S, T = max(len(s) for s, _ in pairs) + 1, max(len(t) for _, t in pairs) + 1
    src = torch.full((len(pairs), S), pad)
    tgt_in, tgt_out = torch.full((len(pairs), T), pad), torch.full((len(pairs), T), pad)
    for row, (s, t) in enumerate(pairs):
        src[row, :len(s) + 1] = torch.tensor(s + [eos])
        tgt_in[row, :len(t) + 1] = torch.tensor([bos] + t)
        tgt_out[row, :len(t) + 1] = torch.tensor(t + [eos])
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "ntokens": sum(len(t) + 1 for _, t in pairs)}


def tiny_module(model=(), train=()):
    from translator.training import TranslationModule

    torch.manual_seed(0)
    return TranslationModule({"model": {"preset": "tiny", "vocab_size": 40, **dict(model)},
                              "train": {"max_tokens": 64, "warmup": 10, "max_steps": 1, "val_bleu": "none",
                                        **dict(train)}})


def gradient_after_one_update(batches, accumulate, model=(), train=(), dropout_seed=7):
    import lightning as L

    class SeedDropout(L.Callback):  # the same dropout masks as a reference computed by hand
        def on_train_batch_start(self, *args):
            torch.manual_seed(dropout_seed)

    module = tiny_module(model, train)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SeedDropout()])
    trainer.fit(module, train_dataloaders=Batches(batches))
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_accumulated_batches_give_the_gradient_of_one_batch_holding_them_all():
    """The update is normalised by all its target tokens (fairseq's rule), not by each micro-batch's: a short
    batch and a long, heavily padded one accumulated give the gradient of the two in one batch."""
    g = torch.Generator().manual_seed(1)
    words = lambda n: torch.randint(4, 40, (n,), generator=g).tolist()
    short = [(words(5), words(3)), (words(4), words(4))]
    padded = [(words(6), words(1)), (words(9), words(12)), (words(2), words(2))]
    together = gradient_after_one_update([batch_of(short + padded)], accumulate=1)
    accumulated = gradient_after_one_update([batch_of(short), batch_of(padded)], accumulate=2)
    assert together.keys() == accumulated.keys() and len(together) > 10
    for name in together:
        torch.testing.assert_close(accumulated[name], together[name], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_a_compiled_run_saves_and_loads_like_any_other(toy_run, tmp_path, monkeypatch):
    """train.compile: the weights keep their names (a wrapped module's would read model._orig_mod.*, which
    nothing loaded). Dynamo's eager backend stands in for inductor to keep the test short."""
    data_dir, recipe_path = toy_run
    real_compile, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or real_compile(fn, backend="eager"))
    run = fit(load_recipe(recipe_path, ["train.compile=true"]), tmp_path / "run", data_dir=str(data_dir), max_steps=3,
              progress_bar=False)
    assert compiled  # the compiled path ran
    keys = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert keys and not any("_orig_mod" in k for k in keys)
    model, tokenizer, recipe = load_model(run)
    assert len(translate_ids(model, tokenizer.encode(["the dog runs"]), recipe.decode)) == 1
    # Checkpoints of runs that compiled by wrapping the model (earlier versions) load as well.
    torch.save({"state_dict": {f"model._orig_mod.{k}": v for k, v in read_weights(run / "model.safetensors").items()}},
               tmp_path / "wrapped.ckpt")
    assert read_weights(tmp_path / "wrapped.ckpt").keys() == read_weights(run / "model.safetensors").keys()


@pytest.mark.slow
def test_tokens_per_second_leave_validation_time_out(toy_run, tmp_path, monkeypatch):
    import csv
    import time

    from translator.training import TranslationModule

    data_dir, recipe_path = toy_run
    real_end = TranslationModule.on_validation_epoch_end

    pause = 4.0  # as a long validation would take

    def slow_validation(self):
        time.sleep(pause)
        real_end(self)

    monkeypatch.setattr(TranslationModule, "on_validation_epoch_end", slow_validation)
    run = fit(load_recipe(recipe_path, ["train.val_every=4", "train.log_every=1", "train.val_bleu=none"]),
              tmp_path / "run", data_dir=str(data_dir), max_steps=12, progress_bar=False)
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    rates = [float(r["tok_s"]) for r in rows if r.get("tok_s")]
    after = [float(next(r["tok_s"] for r in rows[i + 1:] if r.get("tok_s")))  # the first rate after each validation
             for i, row in enumerate(rows[:-1]) if row.get("val/loss")]
    assert len(rates) >= 9 and len(after) == 2
    # A rate that counted the pause is below max_tokens / pause (500 tok/s); a toy step takes milliseconds, so its
    # own rate is far above that even on a loaded machine (a bound relative to the other steps' rates was not).
    assert min(after) > load_recipe(recipe_path).train.max_tokens / pause, (after, rates)


@pytest.mark.slow
def test_fine_tuning_starts_from_another_runs_weights_and_tokenizer(toy_model_dir, tmp_path, capsys):
    from translator.checkpoint import read_weights

    run, data_dir = toy_model_dir
    recipe = tmp_path / "toy.yaml"
    recipe.write_text((run / "config.yaml").read_text())
    tuned = tmp_path / "tuned"
    # With a learning rate of zero the weights stay where they started: exactly the other run's.
    assert main(["train", "--config", str(recipe), "--init-from", str(run), "--data-dir", str(data_dir), "--out",
                 str(tuned), "--max-steps", "2", "--no-progress", "--train.lr_scale=0.0"]) == 0
    start, ours = read_weights(run / "model.safetensors"), read_weights(tuned / "model.safetensors")
    assert all(torch.equal(start[k], ours[k]) for k in start)
    assert (tuned / "spm.model").read_bytes() == (run / "spm.model").read_bytes()
    assert load_recipe(tuned / "config.yaml").train.init_from == str(run.resolve())
    capsys.readouterr()
    code = main(["train", "--config", str(recipe), "--init-from", str(run), "--data-dir", str(data_dir), "--out",
                 str(tmp_path / "other"), "--model.d_ff=256", "--model.dropout=0.3"])
    err = capsys.readouterr().err
    assert code == 1 and "the recipe's model differs from that run's: d_ff=256 (its 128)" in err, err


@pytest.mark.slow
def test_patience_stops_when_validation_stops_improving(toy_run, tmp_path):
    data_dir, recipe_path = toy_run
    # A zero learning rate: the validation loss never improves after the first validation.
    run = fit(load_recipe(recipe_path, ["train.lr_scale=0.0", "train.val_every=5", "train.val_bleu=none",
                                        "train.patience=2", "train.save_every=5"]),
              tmp_path / "run", data_dir=str(data_dir), max_steps=100, progress_bar=False)
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 15
    assert (run / "checkpoints/best.ckpt").is_file()


@pytest.mark.slow
def test_loader_workers_train_the_same_weights(toy_run, tmp_path):
    data_dir, recipe_path = toy_run
    runs = [fit(load_recipe(recipe_path, [f"train.loader_workers={n}"]), tmp_path / f"w{n}", data_dir=str(data_dir),
                max_steps=15, progress_bar=False) for n in (0, 2)]  # 15 steps: past an epoch's end
    a, b = (read_weights(run / "checkpoints/last.ckpt") for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_symmetric_kl_matches_torch():
    logits = torch.randn(6, 5, 11) * 3
    keep = torch.rand(3, 5) > 0.3
    logp, logq = F.log_softmax(logits, -1).chunk(2)
    pointwise = F.kl_div(logq, logp, log_target=True, reduction="none") + F.kl_div(logp, logq, log_target=True,
                                                                                     reduction="none")
    torch.testing.assert_close(symmetric_kl(logits, keep), pointwise.sum(-1)[keep].sum())


def rdrop_batch():
    g = torch.Generator().manual_seed(3)
    words = lambda n: torch.randint(4, 40, (n,), generator=g).tolist()
    return batch_of([(words(5), words(3)), (words(7), words(6)), (words(2), words(4))])


def test_rdrop_without_dropout_is_the_plain_gradient():
    """The two passes are averaged (the loss stays one batch's worth); with nothing to drop they agree and the
    KL term vanishes."""
    plain = gradient_after_one_update([rdrop_batch()], 1)
    rdrop = gradient_after_one_update([rdrop_batch()], 1, train={"rdrop": 5.0})
    assert plain.keys() == rdrop.keys()
    for name in plain:
        torch.testing.assert_close(rdrop[name], plain[name], atol=1e-6, rtol=1e-4)


def test_rdrop_gradient_is_that_of_the_papers_loss():
    """CE1 + CE2 + alpha/2 (KL(p1||p2) + KL(p2||p1)), halved, per target token: recomputed by hand with the
    same dropout masks, and different from the plain loss's gradient."""
    alpha, batch = 5.0, rdrop_batch()
    trained = gradient_after_one_update([batch], 1, model={"dropout": 0.3}, train={"rdrop": alpha})
    module = tiny_module({"dropout": 0.3})
    module.train()
    torch.manual_seed(7)
    twice = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    logits = module.model.logits(module(twice))
    p1, p2 = F.log_softmax(logits, -1).chunk(2)
    keep = batch["tgt_out"] != 0
    ce = sum(F.cross_entropy(logits_half.transpose(1, 2), batch["tgt_out"], ignore_index=0,
                             label_smoothing=0.1, reduction="sum") for logits_half in logits.chunk(2))
    kl = (F.kl_div(p2, p1, log_target=True, reduction="none") + F.kl_div(p1, p2, log_target=True,
                                                                        reduction="none")).sum(-1)[keep].sum()
    assert kl > 1e-3
    ((ce + alpha / 2 * kl) / 2 / batch["ntokens"]).backward()
    plain = gradient_after_one_update([batch], 1, model={"dropout": 0.3})
    for name, p in module.named_parameters():
        torch.testing.assert_close(trained[name], p.grad, atol=1e-6, rtol=1e-4)
    assert any((trained[name] - plain[name]).abs().max() > 1e-4 for name in plain)
