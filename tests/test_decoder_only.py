"""The decoder-only model in use: translation as one sequence, generation, and speculative decoding."""


import dataclasses

import pytest
import torch

from translator import ModelConfig, build_model
from translator.checkpoint import load_model
from translator.cli import main
from translator.config import DecodeConfig, load_recipe
from translator.decoding import greedy, sample
from translator.inference import speculative_ids, translate_ids
from translator.training import fit

PAD, BOS, EOS = 0, 1, 2


def tiny_pair(arch):
    """A target model and a smaller draft on the same vocabulary."""
    torch.manual_seed(0)
    if arch == "encoder_decoder":
        target = ModelConfig.from_name("tiny", vocab_size=30, d_model=48, d_ff=96, n_encoder_layers=3, n_decoder_layers=3)
        draft = ModelConfig.from_name("tiny", vocab_size=30, d_model=16, d_ff=32, n_encoder_layers=1, n_decoder_layers=1)
    else:
        target = ModelConfig.from_name("lm_tiny", vocab_size=30, d_model=48, d_ff=96, n_decoder_layers=3)
        draft = ModelConfig.from_name("lm_tiny", vocab_size=30, d_model=16, d_ff=32, n_decoder_layers=1)
    return build_model(target).eval(), build_model(draft).eval()


def start(model, source):
    """Encoder-decoder: encode the source, start from BOS. Decoder-only: the source is the prompt."""
    if model.cfg.arch == "encoder_decoder":
        return model.start(source), torch.tensor([[BOS]])
    return model.start(source), source


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculative_equals_greedy(arch, k):
    target, draft = tiny_pair(arch)
    sources = [torch.randint(4, 30, (3 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
               for seed in range(8)]
    options = DecodeConfig(beam=1, max_len_b=20, batch_tokens=10_000)
    expected = [o[0] for o in translate_ids(target, sources, options, mode="greedy")]
    batched, rate = speculative_ids(target, draft, sources, options, k=k)
    alone, _ = speculative_ids(target, draft, sources, DecodeConfig(beam=1, max_len_b=20, batch_tokens=1), k=k)
    # Proposing only once at most 3 rows are left: the draft reads the plain steps' tokens until then.
    small, _ = speculative_ids(target, draft, sources, dataclasses.replace(options, speculate_rows=3), k=k)
    assert batched == expected and alone == expected and small == expected
    assert 0 <= rate <= 1


def test_a_draft_equal_to_the_target_is_always_accepted():
    target, _ = tiny_pair("decoder_only")
    with torch.no_grad():  # keep the untrained model from ending at once (EOS logit 0 through the tied embedding)
        target.tgt_embed.token.weight[EOS] = 0.0
    sources = torch.randint(4, 30, (3, 5)).tolist()
    outputs, rate = speculative_ids(target, target, sources, DecodeConfig(beam=1, max_len_b=15), k=4)
    assert rate == 1.0 and all(outputs)


def test_top_k_one_sampling_equals_greedy_and_seeds_repeat():
    target, _ = tiny_pair("decoder_only")
    prompt = torch.randint(4, 30, (4, 6))
    expected = greedy(target.step, target.start(prompt), prompt, 12, EOS, banned=(PAD, BOS))
    assert sample(target.step, target.start(prompt), prompt, 12, EOS, banned=(PAD, BOS), top_k=1) == expected
    draw = lambda seed: sample(target.step, target.start(prompt), prompt, 12, EOS, banned=(PAD, BOS),
                               generator=torch.Generator().manual_seed(seed), top_p=0.9)
    assert draw(7) == draw(7) and draw(7) != draw(8)


def test_decoder_only_translation_decodes_with_the_same_functions():
    model = build_model(ModelConfig.from_name("lm_tiny", vocab_size=30, prefix_lm=True)).eval()
    sources = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    together = translate_ids(model, sources, DecodeConfig(beam=3, max_len_b=6))
    alone = [translate_ids(model, [s], DecodeConfig(beam=3, max_len_b=6))[0] for s in sources]
    assert together == alone  # left padding of prompts is masked
    greedy_out = translate_ids(model, sources, DecodeConfig(beam=1, max_len_b=6), mode="greedy")
    beam_one = translate_ids(model, sources, DecodeConfig(beam=1, max_len_b=6), mode="beam")
    assert greedy_out == beam_one


def test_prefix_lm_prompt_is_read_bidirectionally_when_decoding():
    model = build_model(ModelConfig.from_name("lm_tiny", vocab_size=30, prefix_lm=True)).eval()
    prompt = torch.tensor([[BOS, 5, 6, 7, EOS]])
    target = torch.tensor([[9, 10]])
    full = model(torch.cat([prompt, target], 1), prefix_len=torch.tensor([5]))
    state = model.start(prompt)
    first = model.decode_incremental(prompt, state)
    rest = model.decode_incremental(target, state)
    assert (torch.cat([first, rest], 1) - full).abs().max() < 1e-5


# -- Training and using decoder-only models ----------------------------------------------------------------

@pytest.mark.slow
def test_decoder_only_translation_trains_and_translates(toy_run, tmp_path, capsys):
    data_dir, recipe_path = toy_run
    recipe = load_recipe(recipe_path, ["model.arch=decoder_only", "model.preset=lm_tiny", "model.n_decoder_layers=4",
                                       "model.prefix_lm=true", "train.max_steps=240"])
    run = fit(recipe, tmp_path / "dec", data_dir=str(data_dir), progress_bar=False)
    model, tokenizer, recipe = load_model(run)
    assert model.cfg.arch == "decoder_only" and model.cfg.prefix_lm
    source = tmp_path / "in.en"
    source.write_text("the dog runs\n\na small cat sits on the ball\n")
    assert main(["translate", "--model", str(run), "-i", str(source)]) == 0
    out = capsys.readouterr().out.split("\n")
    assert out[1] == "" and len(out) == 4
    code = main(["evaluate", "--model", str(run), "--split", "valid", "--data-dir", str(data_dir), "--out-dir",
                 str(tmp_path / "eval")])
    import json

    assert code == 0
    assert json.loads((tmp_path / "eval" / "valid.json").read_text())["scores"]["BLEU"]["score"] > 20


@pytest.mark.slow
def test_generate_continues_prompts_line_by_line(tmp_path, capsys):
    import random

    from .conftest import DE

    rng = random.Random(0)
    (tmp_path / "text").mkdir()
    lines = [" ".join(DE[(k + i) % len(DE)] for i in range(rng.randint(4, 12)))
             for k in (rng.randrange(len(DE)) for _ in range(1500))]
    (tmp_path / "text" / "train.de").write_text("".join(line + "\n" for line in lines))
    recipe = tmp_path / "lm.yaml"
    recipe.write_text("""
model: {preset: lm_tiny, d_model: 64, d_ff: 128, n_heads: 4}
data: {task: lm, tgt_lang: de, train: "text/train.{lang}", block_size: 32}
tokenizer: {vocab_size: 400}
train: {max_tokens: 1024, max_steps: 80, warmup: 30, lr_scale: 0.5, save_every: 40, label_smoothing: 0.0}
decode: {average_last: 1}
""")
    run = fit(load_recipe(recipe), tmp_path / "lm", data_dir=str(tmp_path), progress_bar=False)
    prompts = tmp_path / "prompts.de"
    prompts.write_text("der Hund\n\nKatze Mann Frau\n")
    assert main(["generate", "--model", str(run), "-i", str(prompts), "--greedy", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert len(out) == 4 and out[-1] == ""
    # The model learned the word cycle: after "der Hund" comes "Katze Mann Frau Kind".
    assert out[0] == "Katze Mann Frau Kind" and out[2] == "Kind Ball rot blau"
    runs = [main(["generate", "--model", str(run), "--prompt", "der", "--seed", str(s), "--max-new-tokens", "8",
                  "--temperature", "1.5"]) or capsys.readouterr().out for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[2] != runs[0]
    code = main(["generate", "--model", str(run), "--prompt", "x", "--max-new-tokens", "0"])
    assert code == 1 and "--max-new-tokens must be positive" in capsys.readouterr().err


def test_translate_with_a_draft_model_gives_the_same_lines(toy_model_dir, tmp_path, capsys):
    import shutil

    run, data_dir = toy_model_dir
    (tmp_path / "draft").mkdir()
    shutil.copyfile(run / "spm.model", tmp_path / "draft" / "spm.model")  # a draft shares the vocabulary
    recipe = load_recipe(run / "config.yaml", ["model.d_model=32", "model.d_ff=64", "model.n_encoder_layers=1",
                                               "model.n_decoder_layers=1", "train.max_steps=60"])
    draft = fit(recipe, tmp_path / "draft", data_dir=str(data_dir), progress_bar=False)
    source = tmp_path / "in.en"
    source.write_text("".join(line + "\n" for line in (data_dir / "toy" / "valid.en").read_text().splitlines()[:40]) + "\n")
    outputs = []
    for extra in ([], ["--draft", str(draft)], ["--draft", str(draft), "--draft-k", "2"]):
        assert main(["translate", "--model", str(run), "-i", str(source), "--beam", "1", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].count("\n") == 41 and outputs[0].strip()
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    assert main(["translate", "--model", str(run), "-i", str(source), "--beam", "4", "--draft", str(draft)]) == 1
    assert "--draft decodes greedily or by sampling" in capsys.readouterr().err
