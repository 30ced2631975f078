"""translate's decoding options end to end on the toy model: ensembles, target prefixes, alignments, int8 and prepacked layers."""

import shutil

import pytest

from translator.cli import main
from translator.data import Tokenizer

from .conftest import DE, EN


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def lines_of(path):
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def toy_source(toy_model_dir, tmp_path):
    _, data_dir = toy_model_dir
    lines = (data_dir / "toy/valid.en").read_text().splitlines()[:40]
    source = tmp_path / "in.en"
    source.write_text("".join(line + "\n" for line in lines[:20] + [""] + lines[20:]))
    return source


def test_an_ensemble_of_a_model_with_itself_translates_as_the_model(toy_model_dir, toy_source, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    for beam in (1, 3):
        assert run(["translate", "--model", run_dir, "-i", toy_source, "-o", tmp_path / "one.de", "--beam", beam],
                   capsys)[0] == 0
        assert run(["translate", "--model", run_dir, "--model", run_dir, "-i", toy_source, "-o", tmp_path / "two.de",
                    "--beam", beam], capsys)[0] == 0
        assert lines_of(tmp_path / "two.de") == lines_of(tmp_path / "one.de")


def test_an_ensemble_refuses_models_with_another_sentencepiece_model(toy_model_dir, toy_source, tmp_path, capsys):
    run_dir, data_dir = toy_model_dir
    other = tmp_path / "other_run"
    shutil.copytree(run_dir, other)
    old = Tokenizer(other / "spm.model")
    text = [line[::-1] for line in (data_dir / "toy/train.en").read_text().splitlines()]  # other text, same size
    text += (data_dir / "toy/train.de").read_text().splitlines()
    Tokenizer.train(text, other / "spm.model", vocab_size=old.vocab_size)
    code, _, err = run(["translate", "--model", run_dir, "--model", other, "-i", toy_source], capsys)
    assert code == 1 and "has another sentencepiece model" in err and len(err.strip().splitlines()) == 1


def test_prefixes_start_the_translations(toy_model_dir, toy_source, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    n = len(lines_of(toy_source))
    prefixes = ["Katze Katze" if i % 3 == 0 else "" for i in range(n)]
    prefix_file = tmp_path / "prefix.de"
    prefix_file.write_text("".join(p + "\n" for p in prefixes))
    assert run(["translate", "--model", run_dir, "-i", toy_source, "-o", tmp_path / "free.de"], capsys)[0] == 0
    code, _, err = run(["translate", "--model", run_dir, "-i", toy_source, "-o", tmp_path / "forced.de",
                        "--prefix", prefix_file], capsys)
    assert code == 0, err
    free, forced = lines_of(tmp_path / "free.de"), lines_of(tmp_path / "forced.de")
    assert len(forced) == n
    for source, prefix, a, b in zip(lines_of(toy_source), prefixes, free, forced):
        if not source:
            assert b == prefix  # nothing to translate: the prefix alone
        elif prefix:
            assert b.startswith("Katze Katze ") and len(b.split()) > 2  # the prefix, then a continuation
        else:
            assert b == a  # lines without a prefix translate as ever
    prefix_file.write_text("Katze\n")
    code, _, err = run(["translate", "--model", run_dir, "-i", toy_source, "-o", tmp_path / "never.de",
                        "--prefix", prefix_file], capsys)
    assert code == 1 and "fewer than the input" in err and not (tmp_path / "never.de").exists()


def test_alignments_link_the_toy_tasks_words_in_order(toy_model_dir, toy_source, tmp_path, capsys):
    """The toy task maps each English word to one German word in the same order: the links are the diagonal."""
    run_dir, _ = toy_model_dir
    code, _, err = run(["translate", "--model", run_dir, "-i", toy_source, "-o", tmp_path / "out.de",
                        "--alignments", tmp_path / "out.align", "--alignment-layer", "-1"], capsys)
    assert code == 0, err
    sources, outputs, links = lines_of(toy_source), lines_of(tmp_path / "out.de"), lines_of(tmp_path / "out.align")
    assert len(links) == len(sources) == len(outputs)
    translation = dict(zip(EN, DE))
    total = diagonal = lexical = lexical_total = 0
    for source, output, line in zip(sources, outputs, links):
        pairs = [tuple(map(int, link.split("-"))) for link in line.split()]
        if not source:
            assert pairs == []
            continue
        words, translated = source.split(), output.split()
        assert all(0 <= i < len(words) and 0 <= j < len(translated) for i, j in pairs)
        assert {j for _, j in pairs} == set(range(len(translated)))  # every target word linked
        total += len(pairs)
        diagonal += sum(i == j for i, j in pairs)
        # Where the output word translates a source word (the toy model's outputs are not always right), the link
        # should point at a word it translates.
        known = [(i, j) for i, j in pairs if translated[j] in {translation[w] for w in words}]
        lexical_total += len(known)
        lexical += sum(translation[words[i]] == translated[j] for i, j in known)
    # Links drawn at random would put ~0.15 on the diagonal and ~0.2 on a word the output word translates. The toy
    # model's 240 steps end less or more trained with the CPU's floating-point paths: 0.67 / 0.86 on a CPU without
    # AVX-512; the diagonal share above 0.7 on others.
    assert diagonal / total >= 0.6 and lexical / lexical_total >= 0.8, (diagonal / total, lexical / lexical_total)
    code, _, err = run(["translate", "--model", run_dir, "-i", toy_source, "--alignments", tmp_path / "x",
                        "--alignment-layer", "5"], capsys)
    assert code == 1 and "alignment layer 5: the decoder has 2 layers" in err


# int8 flips the outputs where the toy model is least sure, which varies with how trained it ends (35 of 41
# lines on one CPU): prepacked float32 differs only in summation order.
@pytest.mark.parametrize("form,agreement", [("--int8", 0.8), ("--prepack", 0.99)])
def test_cpu_forms_translate_as_float32(form, agreement, toy_model_dir, toy_source, tmp_path, capsys):
    run_dir, _ = toy_model_dir
    assert run(["translate", "--model", run_dir, "-i", toy_source, "-o", tmp_path / "f32.de"], capsys)[0] == 0
    code, _, err = run(["translate", "--model", run_dir, "-i", toy_source, "-o", tmp_path / "form.de", form,
                        "--device", "cpu"], capsys)
    assert code == 0, err
    f32, other = lines_of(tmp_path / "f32.de"), lines_of(tmp_path / "form.de")
    assert len(other) == len(f32) and sum(a == b for a, b in zip(f32, other)) >= agreement * len(f32)
    with pytest.raises(SystemExit):
        run(["translate", "--model", run_dir, "-i", toy_source, "--int8", "--prepack"], capsys)
    assert "not allowed with argument" in capsys.readouterr().err


def test_speculate_heads_translates_as_greedy(toy_heads_dir, toy_source, tmp_path, capsys):
    assert run(["translate", "--model", toy_heads_dir, "-i", toy_source, "-o", tmp_path / "greedy.de", "--beam", 1],
               capsys)[0] == 0
    code, _, err = run(["translate", "--model", toy_heads_dir, "-i", toy_source, "-o", tmp_path / "fast.de",
                        "--beam", 1, "--speculate", "heads"], capsys)
    assert code == 0, err
    assert lines_of(tmp_path / "fast.de") == lines_of(tmp_path / "greedy.de")
    code, _, err = run(["translate", "--model", toy_heads_dir, "-i", toy_source, "-o", tmp_path / "one_head.de",
                        "--beam", 1, "--speculate", "heads", "--draft-k", 1], capsys)
    assert code == 0, err
    assert lines_of(tmp_path / "one_head.de") == lines_of(tmp_path / "greedy.de")
    code, _, err = run(["translate", "--model", toy_heads_dir, "-i", toy_source, "-o", tmp_path / "any_rows.de",
                        "--beam", 1, "--speculate", "heads", "--speculate-rows", 0], capsys)
    assert code == 0, err
    assert lines_of(tmp_path / "any_rows.de") == lines_of(tmp_path / "greedy.de")
    code, _, err = run(["translate", "--model", toy_heads_dir, "-i", toy_source, "--speculate", "heads"], capsys)
    assert code == 1 and "pass --beam 1 or --sample" in err
    for extra, message in ((["--speculate", "heads", "--draft-k", 5], "--draft-k 5: the model has 3 draft heads"),
                           (["--speculate", "heads", "--speculate-rows", -1],
                            "--speculate-rows -1: must be 0 (propose at any batch size) or more"),
                           (["--draft-k", 2], "--draft-k sets how many tokens --speculate heads or --draft proposes")):
        out = tmp_path / "refused.de"
        code, _, err = run(["translate", "--model", toy_heads_dir, "-i", toy_source, "-o", out, "--beam", 1, *extra],
                           capsys)
        assert code == 1 and message in err and not out.exists(), err


@pytest.mark.parametrize("speculation", [["--speculate", "heads"], ["--draft", "DRAFT"]])
def test_speculation_refuses_int8(toy_heads_dir, toy_source, tmp_path, capsys, speculation):
    """int8 rounds a K + 1-row verification pass otherwise than greedy's one row, so speculation could not keep
    its promise of greedy's output: refused before anything is loaded or written."""
    speculation = [toy_heads_dir if arg == "DRAFT" else arg for arg in speculation]
    out = tmp_path / "out.de"
    code, _, err = run(["translate", "--model", toy_heads_dir, "-i", toy_source, "-o", out, "--beam", 1, "--int8",
                        "--device", "cpu", *speculation], capsys)
    assert code == 1 and "with --int8 would not give greedy's output" in err and "--prepack" in err
    assert not out.exists()
    code, _, err = run(["generate", "--model", toy_heads_dir, "--prompt", "a", "--greedy", "--int8", "--device", "cpu",
                        "--speculate", "heads"], capsys)
    assert code == 1 and "--speculate heads with --int8" in err
