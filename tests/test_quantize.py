"""CPU inference forms: prepacked float32 linear layers give float32's logits and decodes; int8 stays close."""

import copy

import pytest
import torch

from translator import ModelConfig, build_model
from translator.config import DecodeConfig
from translator.inference import self_speculative_ids, translate_ids
from translator.quantize import PrepackedLinear, prepack, quantize_int8

V = 40


def small(arch: str, **kw):
    cfg = ModelConfig(arch=arch, vocab_size=V, d_model=32, n_heads=4, d_ff=64, n_decoder_layers=2,
                      n_encoder_layers=2 if arch == "encoder_decoder" else 0,
                      dropout=0.0, max_positions=64, draft_heads=2, **kw)
    model = build_model(cfg).eval()
    for head in model.draft_heads:  # heads start at zero; give them something to compute
        torch.nn.init.normal_(head.proj.weight, std=0.3)
    return model


@pytest.mark.parametrize("arch,untied", [("encoder_decoder", False), ("encoder_decoder", True), ("decoder_only", False)])
def test_prepacked_logits_equal_float32(arch, untied):
    model = small(arch, tie_output=not untied)
    packed = prepack(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert sum(isinstance(m, PrepackedLinear) for m in packed.modules()) > 10
    tokens = torch.randint(4, V, (3, 9))
    with torch.inference_mode():
        if arch == "encoder_decoder":
            src = torch.randint(4, V, (3, 7))
            h, h_packed = model.states(src, tokens), packed.states(src, tokens)
        else:
            h, h_packed = model.states(tokens), packed.states(tokens)
        torch.testing.assert_close(h_packed, h, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed.logits(h), model.logits(h), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed.draft_logits(h), model.draft_logits(h), atol=1e-5, rtol=1e-4)


def test_prepacked_decodes_as_float32():
    model = small("encoder_decoder")
    packed = prepack(copy.deepcopy(model))
    sources = [torch.randint(4, V, (n,)).tolist() for n in (3, 9, 5, 12, 7, 1)]
    for options in (DecodeConfig(beam=1, batch_tokens=1), DecodeConfig(beam=4, batch_tokens=64)):
        mode = "greedy" if options.beam == 1 else "beam"
        assert translate_ids(packed, sources, options, mode=mode) == translate_ids(model, sources, options, mode=mode)
    greedy = [o[0] for o in translate_ids(packed, sources, DecodeConfig(beam=1, batch_tokens=64), mode="greedy")]
    assert self_speculative_ids(packed, sources, DecodeConfig(beam=1, batch_tokens=64))[0] == greedy


def test_int8_logits_near_float32():
    model = small("encoder_decoder")
    int8 = quantize_int8(copy.deepcopy(model))
    src, tgt = torch.randint(4, V, (2, 6)), torch.randint(4, V, (2, 8))
    with torch.inference_mode():
        reference = model.logits(model.states(src, tgt))
        error = (int8.logits(int8.states(src, tgt)) - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05
