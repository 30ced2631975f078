import pytest

from translator import ConfigError, ModelConfig
from translator.config import PRESETS


def test_paper_presets_match_table_3():
    base = ModelConfig.from_name("transformer_base")
    assert (base.n_encoder_layers, base.n_decoder_layers, base.d_model, base.d_ff, base.n_heads, base.head_dim,
            base.dropout) == (6, 6, 512, 2048, 8, 64, 0.1)
    big = ModelConfig.from_name("transformer_big")
    assert (big.n_encoder_layers, big.d_model, big.d_ff, big.n_heads, big.head_dim, big.dropout) == (6, 1024, 4096, 16, 64, 0.3)
    # Paper defaults for every preset: post-norm, ReLU, shared and tied embeddings.
    for name in PRESETS:
        cfg = ModelConfig.from_name(name)
        assert not cfg.norm_first and cfg.activation == "relu" and cfg.share_embeddings and cfg.tie_output


def test_overrides_apply():
    cfg = ModelConfig.from_name("transformer_iwslt", vocab_size=10000, norm_first=True, activation="gelu")
    assert (cfg.vocab_size, cfg.norm_first, cfg.activation, cfg.n_heads, cfg.d_ff) == (10000, True, "gelu", 4, 1024)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown model preset 'transformer_huge'.*transformer_base.*tiny"):
        ModelConfig.from_name("transformer_huge")


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown model field\(s\) d_modle; valid fields: .*d_model"):
        ModelConfig.from_name("tiny", d_modle=64)


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=100, n_heads=8), "not divisible by n_heads"),
    (dict(d_model=33, n_heads=3), "must be even"),
    (dict(dropout=1.5), r"dropout=1.5 must lie in \[0, 1\)"),
    (dict(arch="rnn"), "arch='rnn': expected one of encoder_decoder, decoder_only"),
    (dict(activation="swish"), "activation='swish'"),
    (dict(d_model="512"), "d_model='512' has type str; expected int"),
    (dict(norm_first="yes"), "norm_first='yes' has type str; expected bool"),
    (dict(vocab_size=100, src_vocab_size=200), "share_embeddings needs one vocabulary"),
    (dict(n_encoder_layers=0), "an encoder-decoder needs at least one"),
    (dict(pad_id=2), "must be distinct"),
])
def test_invalid_combinations_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_name("tiny", **overrides)


def test_decoder_only_rejects_encoder_layers():
    with pytest.raises(ConfigError, match="decoder_only has no encoder"):
        ModelConfig.from_name("tiny", arch="decoder_only")
    assert ModelConfig.from_name("lm_tiny").n_encoder_layers == 0


def test_round_trip_through_dict():
    cfg = ModelConfig.from_name("small", vocab_size=8000)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("train, message", [
    (dict(rdrop=-1.0), r"train.rdrop=-1.0 must not be negative"),
    (dict(cooldown=10, max_steps=10), r"train.cooldown=10 must lie in \[0, max_steps\)"),
    (dict(schedule="cosine"), r"train.schedule='cosine': expected inverse_sqrt or hold"),
    (dict(rdrop=5.0, freeze="base", init_from="runs/x"), "train.rdrop needs dropout"),
    (dict(dropout_ramp=-5), r"train.dropout_ramp=-5 must not be negative"),
    (dict(dropout_ramp=100, compile=True), "would recompile a train.compile model each time"),
    (dict(weight_decay=-0.1), r"train.weight_decay=-0.1 must not be negative"),
])
def test_invalid_training_settings_rejected(train, message):
    from translator.config import Recipe

    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({"model": {"preset": "tiny", "draft_heads": 2}, "train": train})
