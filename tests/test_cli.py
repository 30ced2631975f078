import json
import shutil
import subprocess
import sys

import pytest
import torch

from translator.checkpoint import read_weights
from translator.cli import main


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_has_useful_help(capsys):
    from translator.cli import EXAMPLES

    assert set(EXAMPLES) == {"train", "prepare", "translate", "serve", "score", "evaluate", "average", "export", "plot",
                             "generate"}
    for command in EXAMPLES:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "example:" in text and f"translator {command}" in text


def test_translate_keeps_one_line_per_input_line_in_order(toy_model_dir, tmp_path, capsys):
    run_dir, data_dir = toy_model_dir
    ordinary = (data_dir / "toy/valid.en").read_text().splitlines()[:20]
    long_line = " ".join(["dog", "runs", "on", "the", "ball"] * 400)  # 2,000 words
    lines = [ordinary[0], "", ordinary[1], long_line, "   ", ordinary[2]] + ordinary[3:]
    source = tmp_path / "in.en"
    source.write_text("".join(line + "\n" for line in lines))
    code, _, err = run(["translate", "--model", run_dir, "-i", source, "-o", tmp_path / "out.de", "--beam", 2], capsys)
    assert code == 0, err
    out = (tmp_path / "out.de").read_text().split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    assert out[1] == "" and out[4] == ""  # empty and whitespace-only in, empty out
    assert out[3] != ""  # the long line is translated (truncated), not dropped
    assert "1 of 23 line(s) were longer than 127 tokens and were truncated" in err
    # The fixed-shape steps that CUDA graphs replay (uncaptured on CPU) translate the same, the long line included.
    # (Into a directory that does not exist yet: made, as average and export make theirs.)
    code, _, err = run(["translate", "--model", run_dir, "-i", source, "-o", tmp_path / "new" / "graphs.de",
                        "--beam", 2, "--cuda-graphs"], capsys)
    assert code == 0, err
    assert (tmp_path / "new" / "graphs.de").read_text() == "\n".join(out)
    assert "no CUDA device here" in err or torch.cuda.is_available()
    # Order: each line translated on its own gives the same line.
    for i in (0, 2, 3, 5, 10, 22):
        single = tmp_path / "one.en"
        single.write_text(lines[i] + "\n")
        run(["translate", "--model", run_dir, "-i", single, "-o", tmp_path / "one.de", "--beam", 2], capsys)
        assert (tmp_path / "one.de").read_text() == out[i] + "\n"


def test_translate_reads_stdin_and_writes_stdout(toy_model_dir, tmp_path):
    run_dir, _ = toy_model_dir
    result = subprocess.run([sys.executable, "-m", "translator.cli", "translate", "--model", str(run_dir), "--beam", "1"],
                            input="the dog runs\n\na cat\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[1] == "" and len(result.stdout.split("\n")) == 4
    # As `make translate` calls it: -i /dev/stdin, a pipe, read once (not consumed by a check and then found
    # empty), and -o through a symlink (as /dev/stdout is) written through it, the link left a link.
    real, link = tmp_path / "real.de", tmp_path / "link.de"
    real.write_text("old\n")
    link.symlink_to(real)
    piped = subprocess.run([sys.executable, "-m", "translator.cli", "translate", "--model", str(run_dir), "--beam",
                            "1", "-i", "/dev/stdin", "-o", str(link)],
                           input="the dog runs\n\na cat\n", capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert link.is_symlink() and real.read_text() == result.stdout


def test_nbest_and_sampling(toy_model_dir, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    source = tmp_path / "in.en"
    source.write_text("the dog runs\na small cat\n")
    code, out, _ = run(["translate", "--model", run_dir, "-i", source, "--beam", 3, "--nbest", 3], capsys)
    rows = [line.split(" ||| ") for line in out.splitlines()]
    assert code == 0 and [(r[0], r[2]) for r in rows] == [(str(i), str(k)) for i in range(2) for k in range(3)]
    samples = [run(["translate", "--model", run_dir, "-i", source, "--sample", "--seed", seed, "--top-k", 5], capsys)[1]
               for seed in (1, 1, 2)]
    assert samples[0] == samples[1] and len(samples[0].splitlines()) == 2
    assert samples[2] != samples[0]  # another seed, another sample
    code, out, _ = run(["translate", "--model", run_dir, "-i", source, "--sample", "--epsilon", 0.02], capsys)
    assert code == 0 and len(out.splitlines()) == 2


def test_translate_errors_are_one_line(toy_model_dir, tmp_path, capsys, monkeypatch):
    import translator.decode_commands

    translated = []  # a bad byte on line 2 is found before line 1 (its own chunk) is translated
    monkeypatch.setattr(translator.decode_commands, "translate_lines", lambda model, tokenizer, lines, *a: translated.append(lines))
    run_dir, _ = toy_model_dir
    bad = tmp_path / "bad.en"
    bad.write_bytes(b"the dog\nthe \xfe cat\n")
    code, _, err = run(["translate", "--model", run_dir, "-i", bad, "-o", tmp_path / "never.de", "--chunk-lines", 1],
                       capsys)
    assert code == 1 and "bad.en:2: not valid UTF-8 (byte 0xfe at column 5); nothing was translated" in err
    assert "Traceback" not in err and translated == []
    assert not (tmp_path / "never.de").exists()  # no half-written output
    code, _, err = run(["translate", "--model", tmp_path / "nowhere"], capsys)
    assert code == 1 and err.strip() == f"translator: error: {tmp_path / 'nowhere'}: no such run directory or checkpoint"
    good = tmp_path / "good.en"
    good.write_text("the dog\n")
    for options, message in ((["--max-len-a", 0, "--max-len-b", 0], "needs a, b >= 0, not both 0"),
                             (["--max-len-b", -1], "needs a, b >= 0"),
                             (["--chunk-lines", 0], "--chunk-lines must be positive (got 0)"),
                             (["--sample", "--top-p", 0], "--top-p 0.0: must lie in (0, 1]"),
                             (["--top-p", 1.5], "--top-p 1.5: must lie in (0, 1]"),
                             (["--sample", "--epsilon", 1], "--epsilon 1.0: must lie in [0, 1)"),
                             (["--sample", "--temperature", 0], "--temperature 0.0: must be positive")):
        code, _, err = run(["translate", "--model", run_dir, "-i", good, "-o", tmp_path / "never.de", *options], capsys)
        assert code == 1 and message in err and not (tmp_path / "never.de").exists(), options
    assert translated == []
    code, _, err = run(["translate", "--model", run_dir / "config.yaml", "-i", bad], capsys)
    assert code == 1 and err.strip() == (f"translator: error: {run_dir / 'config.yaml'}: not a model; pass a run "
                                         "directory, or a .safetensors or .ckpt file in one")


def test_score_matches_the_sacrebleu_command(tmp_path, capsys):
    import random

    from .conftest import DE

    rng = random.Random(0)  # 1000 German-like sentences with punctuation, numbers and casing
    words = DE + ["Straße", "über", "Äpfel", "3", "12,5", "(ja)", "„gut“", "E-Mail", "Mr."]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))).capitalize() + rng.choice([".", "!", "?"])
             for _ in range(1000)]
    hyp = tmp_path / "hyp.de"
    # A plausible system: every other line loses its last word, every third swaps its first two words.
    def perturb(i, words):
        words = words[:-1] if i % 2 else words
        return words[1::-1] + words[2:] if i % 3 == 0 else words
    hyp.write_text("".join(" ".join(perturb(i, line.split())) + "\n" for i, line in enumerate(lines)))
    ref = tmp_path / "ref.de"
    ref.write_text("".join(line + "\n" for line in lines))
    code, out, _ = run(["score", "--hyp", hyp, "--ref", ref, "--metrics", "bleu", "chrf", "--json"], capsys)
    ours = json.loads(out)
    theirs = json.loads(subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "chrf",
                                        "-f", "json"], capture_output=True, text=True, check=True).stdout)
    assert code == 0 and ours == theirs
    assert 50 < ours[0]["score"] < 95 and ours[0]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    code, out, _ = run(["score", "--hyp", hyp, "--ref", ref], capsys)
    assert out.startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:") and f"= {ours[0]['score']:.1f} " in out
    short = tmp_path / "short.de"
    short.write_text("one line\n")
    code, _, err = run(["score", "--hyp", short, "--ref", ref], capsys)
    assert code == 1 and "has 1 lines but" in err


def test_evaluate_translates_and_scores_a_split(toy_model_dir, tmp_path, capsys):
    run_dir, data_dir = toy_model_dir
    # The toy recipe has no test split; valid stands in.
    code, out, err = run(["evaluate", "--model", run_dir, "--split", "valid", "--data-dir", data_dir,
                          "--out-dir", tmp_path], capsys)
    assert code == 0, err
    assert out.startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:") and "chrF2|" in out
    report = json.loads((tmp_path / "valid.json").read_text())
    assert report["sentences"] == 100 and report["scores"]["BLEU"]["score"] > 40
    assert len((tmp_path / "valid.hyp.de").read_text().splitlines()) == 100
    code, _, err = run(["evaluate", "--model", run_dir, "--split", "test", "--data-dir", data_dir], capsys)
    assert code == 1 and "names no test corpus" in err


def test_average_writes_the_mean_of_the_last_checkpoints(toy_model_dir, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    ckpts = sorted((run_dir / "checkpoints").glob("step*.ckpt"))[-2:]
    code, out, _ = run(["average", "--model", run_dir, "--last", 2, "-o", tmp_path / "avg"], capsys)
    assert code == 0 and "averaged 2 checkpoint(s)" in out
    averaged = read_weights(tmp_path / "avg" / "model.safetensors")
    a, b = read_weights(ckpts[0]), read_weights(ckpts[1])
    name = "decoder.blocks.0.ff.up.weight"
    torch.testing.assert_close(averaged[name], (a[name] + b[name]) / 2)
    source = tmp_path / "in.en"
    source.write_text("the dog runs\n")
    code, out, _ = run(["translate", "--model", tmp_path / "avg", "-i", source], capsys)
    assert code == 0 and out.strip()
    assert json.loads((tmp_path / "avg" / "model.json").read_text())["averaged"] == [p.name for p in ckpts]


def test_average_into_a_runs_weights_updates_what_model_json_says(toy_model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(toy_model_dir[0], run_dir)
    ckpts = sorted((run_dir / "checkpoints").glob("step*.ckpt"))
    code, _, _ = run(["average", "--model", run_dir, "--last", 3, "-o", run_dir / "model.safetensors"], capsys)
    assert code == 0
    assert json.loads((run_dir / "model.json").read_text())["averaged"] == [p.name for p in ckpts[-3:]]
    for last in (0, -2):  # not "all of them" or "all but the first two", as a slice would take it
        code, _, err = run(["average", "--model", run_dir, "--last", last, "-o", tmp_path / "x.safetensors"], capsys)
        assert code == 1 and f"--last must be at least 1 (got {last})" in err
    assert not (tmp_path / "x.safetensors").exists()
    # The run directory itself as the output: its own model.safetensors.
    code, out, _ = run(["average", "--model", run_dir, "--last", 2, "-o", run_dir], capsys)
    assert code == 0 and out.strip().endswith(f"into {run_dir / 'model.safetensors'}")
    assert json.loads((run_dir / "model.json").read_text())["averaged"] == [p.name for p in ckpts[-2:]]


def test_average_never_writes_into_another_run(toy_model_dir, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(toy_model_dir[0], other)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    code, _, err = run(["average", "--model", toy_model_dir[0], "--last", 2, "-o", other], capsys)
    assert code == 1 and "other: exists and is not a model directory written by average (checkpoints, " in err
    # Nor into its weights file named as a file (nor a new weights file beside them).
    for name in ("model.safetensors", "extra.safetensors"):
        code, _, err = run(["average", "--model", toy_model_dir[0], "--last", 2, "-o", other / name], capsys)
        assert code == 1 and f"{other / name}: inside another run or model directory" in err, err
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    # A weights file elsewhere: a new one is written, one average wrote is replaced, any other file is kept.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, _, err = run(["average", "--model", toy_model_dir[0], "--last", 2, "-o", elsewhere / "avg.safetensors"], capsys)
    assert code == 0 and not (elsewhere / "model.json").exists(), err
    code, _, err = run(["average", "--model", toy_model_dir[0], "--last", 1, "-o", elsewhere / "avg.safetensors"], capsys)
    assert code == 0, err
    (elsewhere / "mine.safetensors").write_bytes(b"the user's own file")
    code, _, err = run(["average", "--model", toy_model_dir[0], "--last", 2, "-o", elsewhere / "mine.safetensors"], capsys)
    assert code == 1 and "mine.safetensors: exists and was not written by average" in err
    assert (elsewhere / "mine.safetensors").read_bytes() == b"the user's own file"


def test_overrides_only_for_train(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--hyp", "a", "--ref", "b", "--train.max_tokens=3"])
    assert "only apply to train" in capsys.readouterr().err


def test_plot_draws_the_learning_curves_of_a_run(toy_model_dir, tmp_path, capsys):
    from translator.plot import read_metrics

    run_dir, _ = toy_model_dir
    metrics = read_metrics(run_dir)
    bleu = [b for _, b in metrics["val/bleu"]]
    assert [s for s, _ in metrics["val/bleu"]] == [80, 160, 240] and bleu[-1] > bleu[0]
    assert len(metrics["tok_s"]) > 10 and metrics["train/loss"][0][0] == 10  # logged every log_every steps
    code, out, err = run(["plot", run_dir, "-o", tmp_path / "curves.png"], capsys)
    assert code == 0 and out.strip() == f"learning curves: {tmp_path / 'curves.png'}", err
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "curves.png").stat().st_size > 20_000  # four panels drawn
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run(["plot", run_dir, "-o", tmp_path / "notes.txt"], capsys)
    assert code == 1 and "notes.txt: exists and is not a PNG picture" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def readme_commands():
    """Every `translator ...` command line in the README's and benchmarks README's shell blocks, continuation
    lines joined, comments dropped."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    commands = []
    for doc in (root / "README.md", root / "benchmarks" / "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words and words[0] == "translator":
                    shell = [i for i, w in enumerate(words) if w in ("<", ">", "|", "&&")]  # redirections, pipes
                    commands.append(words[1:shell[0] if shell else None])
    return commands


def test_every_command_in_the_readme_parses():
    """The README cannot drift from the CLI: each command line it shows is accepted by the parser (flags,
    choices, required options, recipe overrides where they apply)."""
    from translator.cli import build_parser, split_overrides

    commands = readme_commands()
    assert len(commands) >= 15 and {c[0] for c in commands} >= {"train", "prepare", "translate", "score", "evaluate",
                                                                  "average", "export", "plot", "generate"}
    for argv in commands:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: translator {' '.join(argv)}")
        overrides, unknown = split_overrides(extra)
        assert not unknown, f"unknown arguments {unknown} in: translator {' '.join(argv)}"
        assert not overrides or args.command in ("train", "prepare"), argv
