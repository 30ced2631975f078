import math

import pytest
import torch

from translator import ModelConfig, build_model, count_parameters
from translator.model import Block, DecoderOnly, EncoderDecoder, sinusoidal_positions

PAD, BOS, EOS = 0, 1, 2


def tiny(arch="encoder_decoder", **overrides):
    name = "tiny" if arch == "encoder_decoder" else "lm_tiny"
    return build_model(ModelConfig.from_name(name, vocab_size=23, **overrides)).eval()


def random_tokens(*shape, low=4, high=23):
    return torch.randint(low, high, shape)


# -- Sizes -------------------------------------------------------------------------------------------------

def test_parameter_counts_match_the_paper_layout():
    # Post-norm, biases in every linear layer, one 37000 x d matrix shared by both embeddings and the
    # output projection, no output bias. The paper rounds these to 65M and 213M. (Built on the meta device:
    # the same modules, without allocating 214M floats.)
    with torch.device("meta"):
        base = build_model(ModelConfig.from_name("transformer_base", vocab_size=37000))
        big = build_model(ModelConfig.from_name("transformer_big", vocab_size=37000))
    assert count_parameters(base) == 63_082_496
    assert count_parameters(big) == 214_245_376


def test_the_multi30k_recipes_models_have_the_sizes_the_readme_gives():
    from translator.config import load_recipe

    sizes = {}
    for name in ("en_de", "en_de_decoder_only"):
        recipe = load_recipe(f"recipes/multi30k/{name}.yaml")
        recipe.model.vocab_size = recipe.tokenizer.vocab_size
        with torch.device("meta"):
            sizes[name] = count_parameters(build_model(recipe.model))
    assert sizes == {"en_de": 7_577_600, "en_de_decoder_only": 7_576_320}  # "7.58M" each


def test_pre_norm_adds_one_final_layer_norm_per_stack():
    with torch.device("meta"):
        post = build_model(ModelConfig.from_name("transformer_base", vocab_size=37000))
        pre = build_model(ModelConfig.from_name("transformer_base", vocab_size=37000, norm_first=True))
    assert count_parameters(pre) - count_parameters(post) == 2 * 2 * 512


def test_unshared_embeddings_add_their_matrices():
    shared = build_model(ModelConfig.from_name("tiny", vocab_size=50))
    untied = build_model(ModelConfig.from_name("tiny", vocab_size=50, tie_output=False))
    separate = build_model(ModelConfig.from_name("tiny", vocab_size=50, src_vocab_size=40, share_embeddings=False,
                                                 tie_output=False))
    assert count_parameters(untied) - count_parameters(shared) == 50 * 32
    assert count_parameters(separate) - count_parameters(shared) == 40 * 32 + 50 * 32 - 50 * 32 + 50 * 32


def test_one_embedding_matrix_is_shared_three_ways():
    model = tiny()
    assert model.src_embed.token.weight is model.tgt_embed.token.weight
    h = torch.randn(3, 32)
    torch.testing.assert_close(model.logits(h), h @ model.src_embed.token.weight.T)


def test_the_same_block_class_builds_all_three_stacks():
    enc_dec, lm = tiny(), tiny("decoder_only")
    blocks = list(enc_dec.encoder.blocks) + list(enc_dec.decoder.blocks) + list(lm.decoder.blocks)
    assert blocks and all(type(b) is Block for b in blocks)
    assert all(b.cross_attn is None for b in enc_dec.encoder.blocks)
    assert all(b.cross_attn is not None for b in enc_dec.decoder.blocks)
    assert all(b.cross_attn is None for b in lm.decoder.blocks)
    assert isinstance(enc_dec, EncoderDecoder) and isinstance(lm, DecoderOnly)


def test_sinusoidal_positions_follow_the_formula():
    table = sinusoidal_positions(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_embeddings_are_scaled_by_sqrt_d_model():
    model = tiny()
    tokens = random_tokens(1, 5)
    expected = model.src_embed.token(tokens) * math.sqrt(32) + sinusoidal_positions(5, 32)
    torch.testing.assert_close(model.src_embed(tokens), expected)


def test_post_norm_is_the_default_and_pre_norm_a_switch():
    x = torch.randn(2, 5, 32)
    post = tiny().encoder.blocks[0]
    out, _ = post(x)
    # Post-norm: every block output is layer-normalised (zero mean, unit variance per position).
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    pre = tiny(norm_first=True).encoder.blocks[0]
    out, _ = pre(x)
    assert out.mean(-1).abs().max() > 1e-3
    assert isinstance(tiny(activation="gelu").encoder.blocks[0].ff.activation, torch.nn.GELU)


def test_too_long_input_gives_a_clear_error():
    with pytest.raises(ValueError, match="max_positions is 128"):
        tiny()(random_tokens(1, 129), random_tokens(1, 3))


# -- Masks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_is_causal(norm_first):
    model = tiny(norm_first=norm_first)
    src, tgt = random_tokens(2, 7), random_tokens(2, 9)
    changed = tgt.clone()
    changed[:, 5:] = random_tokens(2, 4)
    a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


def test_decoder_only_is_causal():
    model = tiny("decoder_only")
    x = random_tokens(2, 9)
    y = x.clone()
    y[:, 4:] = random_tokens(2, 5)
    torch.testing.assert_close(model(x)[:, :4], model(y)[:, :4], atol=1e-6, rtol=0)


def test_padding_does_not_change_a_sentence():
    model = tiny()
    src, tgt = random_tokens(1, 6), random_tokens(1, 4)
    alone = model(src, tgt)
    other_src, other_tgt = random_tokens(3, 11), random_tokens(3, 9)
    batch_src = torch.full((4, 11), PAD)
    batch_tgt = torch.full((4, 9), PAD)
    batch_src[:3], batch_tgt[:3] = other_src, other_tgt
    batch_src[3, :6], batch_tgt[3, :4] = src[0], tgt[0]
    in_batch = model(batch_src, batch_tgt)[3:, :4]
    assert (alone - in_batch).abs().max() < 1e-5


def test_prefix_lm_mask_lets_the_prefix_see_itself():
    model = tiny("decoder_only")
    x = random_tokens(1, 8)
    y = x.clone()
    y[0, 3] = (x[0, 3] + 1 - 4) % 19 + 4  # change a prefix token that comes after position 1
    prefix = torch.tensor([5])
    a, b = model(x, prefix_len=prefix), model(y, prefix_len=prefix)
    assert (a[0, 1] - b[0, 1]).abs().max() > 1e-4  # bidirectional inside the prefix
    torch.testing.assert_close(model(x, prefix_len=torch.tensor([0])), model(x))  # empty prefix = causal
    z = x.clone()
    z[0, 6] = (x[0, 6] + 1 - 4) % 19 + 4  # after the prefix the mask is causal again
    torch.testing.assert_close(model(x, prefix_len=prefix)[:, :6], model(z, prefix_len=prefix)[:, :6])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fully_padded_rows_give_no_nan_under_autocast(dtype):
    model = tiny()
    src = random_tokens(2, 6)
    src[1] = PAD  # a source with no token at all: every key of that row is masked
    with torch.autocast("cpu", dtype=dtype):
        out = model(src, random_tokens(2, 4))
    assert torch.isfinite(out).all()
    # The attention itself gives zeros on a row that may attend to nothing: its output is W_O's bias alone.
    from translator.model import MultiHeadAttention

    attention = MultiHeadAttention(16, 2, 0.0).eval()
    x = torch.randn(2, 3, 16)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    mask[1] = False  # every key of the second sentence masked
    with torch.autocast("cpu", dtype=dtype):
        y, _ = attention(x, mask)
    torch.testing.assert_close(y[1].float(), attention.out.bias.detach().expand(3, 16), atol=1e-2, rtol=0)
    assert (y[0].float() - attention.out.bias).abs().max() > 0.05  # a row with keys is not just the bias
    lm = tiny("decoder_only")
    prompt = random_tokens(2, 6)
    prompt[0, :4] = PAD  # left padding: those query rows see no key
    state = lm.start(prompt)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.isfinite(lm.decode_incremental(prompt, state)).all()


# -- Incremental decoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_decoding_equals_full_forward(norm_first):
    model = tiny(norm_first=norm_first)
    src, tgt = random_tokens(3, 7), random_tokens(3, 10)
    src[0, 5:] = PAD
    full = model(src, tgt)
    state = model.start(src)
    steps = [model.step(tgt[:, : t + 1], state) for t in range(10)]
    assert state.length == 10
    assert (torch.stack(steps, 1) - full).abs().max() < 1e-5
    # Several positions at once (a prefill, or a speculative draft) after some cached ones.
    state = model.start(src)
    first = model.decode_incremental(tgt[:, :4], state)
    rest = model.decode_incremental(tgt[:, 4:], state)
    assert (torch.cat([first, rest], 1) - full).abs().max() < 1e-5


def test_cached_decoding_equals_full_forward_decoder_only():
    model = tiny("decoder_only")
    x = random_tokens(2, 12)
    full = model(x)
    state = model.start()
    steps = [model.step(x[:, : t + 1], state) for t in range(12)]
    assert (torch.stack(steps, 1) - full).abs().max() < 1e-5
    state = model.start()
    chunks = [model.decode_incremental(x[:, :5], state), model.decode_incremental(x[:, 5:6], state),
              model.decode_incremental(x[:, 6:], state)]
    assert (torch.cat(chunks, 1) - full).abs().max() < 1e-5


def test_left_padded_prompts_decode_as_if_alone():
    model = tiny("decoder_only")
    short, long = random_tokens(1, 3), random_tokens(1, 6)
    batch = torch.full((2, 6), PAD)
    batch[0, 3:], batch[1] = short[0], long[0]
    state = model.start(batch)
    logits = model.decode_incremental(batch, state)
    nxt = random_tokens(2, 1)
    logits_next = model.decode_incremental(nxt, state)
    alone = model(torch.cat([short, nxt[:1]], 1))
    assert (logits[0, 3:] - alone[0, :3]).abs().max() < 1e-5
    assert (logits_next[0, 0] - alone[0, 3]).abs().max() < 1e-5


def test_reorder_selects_rows_and_cross_attention_is_computed_once():
    model = tiny()
    src = random_tokens(3, 5)
    state = model.start(src)
    model.step(torch.full((3, 1), BOS), state)
    assert state.memory is None  # cross-attention keys/values are cached, the memory is no longer needed
    cache = state.kv[0][0]
    cross_k, self_k, buffer = state.kv[0][1][0].clone(), cache.kv[:3, 0, :, :1].clone(), cache.kv.data_ptr()
    state.reorder(torch.tensor([2, 2, 0]))
    state.reorder(torch.tensor([1, 0, 2]))  # reorders compose
    torch.testing.assert_close(state.kv[0][1][0], cross_k[[2, 2, 0]])
    torch.testing.assert_close(cache.kv[:3, 0, :, :1], self_k[[2, 2, 0]])
    assert cache.kv.data_ptr() == buffer  # rewritten in place
    logits = model.step(torch.full((3, 2), BOS), state)
    assert cache.length == 2 and cache.kv.data_ptr() == buffer  # appended in place, within the room it has
    torch.testing.assert_close(logits, model(src[[2, 2, 0]], torch.full((3, 2), BOS))[:, -1], atol=1e-5, rtol=0)
    state.truncate(0)
    assert state.length == 0 and cache.length == 0


@pytest.mark.parametrize("told", [False, True])
def test_beams_share_their_sentence_memory(told):
    # told: the caller says which sentence each group comes from (as the search functions do), else the state
    # reads it off the row index.
    model = tiny()
    src, tgt = random_tokens(3, 5), random_tokens(3, 4)
    state = model.start(src)
    model.step(tgt[:, :1], state)
    cross_k = state.kv[0][1][0]
    # Expand to 2 beams per sentence: self-attention entries per row, cross-attention entries stay per sentence.
    state.reorder(torch.arange(3).repeat_interleave(2), group=2, sentences=range(3) if told else None)
    assert state.kv[0][0].rows == 6 and state.kv[0][1][0] is cross_k
    # Reordering beams within sentences copies no memory; the logits match a plain batch of the same rows.
    state.reorder(torch.tensor([1, 1, 2, 3, 5, 4]), group=2, sentences=range(3) if told else None)
    assert state.kv[0][1][0] is cross_k
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = model.step(tgt[rows, :2], state)
    torch.testing.assert_close(logits, model(src[rows], tgt[rows, :2])[:, -1], atol=1e-5, rtol=0)
    # The first sentence finishes and the last takes its place (as beam search compacts its batch): the
    # memory is selected in place, and the second sentence's entries stay where they are.
    state.reorder(torch.tensor([4, 5, 2, 3]), group=2, sentences=[2, 1] if told else None)
    assert state.kv[0][1][0].shape[0] == 2 and state.kv[0][1][0].data_ptr() == cross_k.data_ptr()
    rows = torch.tensor([2, 2, 1, 1])
    logits = model.step(tgt[rows, :3], state)
    torch.testing.assert_close(logits, model(src[rows], tgt[rows, :3])[:, -1], atol=1e-5, rtol=0)


def test_kv_cache_grows_in_place_and_reorders_like_index_select():
    from translator.cache import KVCache, _moved

    cache, expected = KVCache(), torch.empty(3, 2, 0, 4)
    generator = torch.Generator().manual_seed(0)
    for step in range(40):  # past the first room of 16 positions and the next of 32
        if step % 7 == 3:  # duplicate, drop and fan out rows, as beam search does
            index = torch.randint(0, expected.size(0), (int(torch.randint(1, 7, (1,), generator=generator)),),
                                  generator=generator)
            moved = _moved(index)
            cache.reorder(index, moved, index[moved])
            expected = expected[index]
        new = torch.randn(expected.size(0), 2, 1, 4, generator=generator)
        k, v = cache.append(torch.stack([new, -new], dim=1))
        expected = torch.cat([expected, new], dim=2)
        assert torch.equal(k, expected) and torch.equal(v, -expected)
    assert cache.kv.size(3) >= 40 and cache.length == 40
    with pytest.raises(ValueError, match="reorder the decoding state first"):
        cache.append(torch.randn(cache.rows + 1, 2, 2, 1, 4))


def test_kv_cache_copies_only_the_rows_that_change():
    from translator.cache import KVCache, _moved

    cache = KVCache()
    cache.append(torch.stack([torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 3, 2), torch.zeros(4, 1, 3, 2)], dim=1))
    index = torch.tensor([0, 0, 2, 1])
    assert _moved(index).tolist() == [1, 3]
    # Told that only row 1 moves, the cache leaves row 3 as it was: rows outside `moved` are never written.
    cache.reorder(index, torch.tensor([1]), torch.tensor([0]))
    assert cache.kv[:, 0, 0, 0, 0].tolist() == [0.0, 0.0, 2.0, 3.0]
    cache.reorder(index, _moved(index), index[_moved(index)])
    assert cache.kv[:, 0, 0, 0, 0].tolist() == [0.0, 0.0, 2.0, 0.0]


def test_reused_logits_buffer_gives_the_same_decoding():
    from translator.decoding import beam_search

    model = tiny()
    src = random_tokens(4, 6)
    results = []
    for reuse in (False, True):
        state = model.start(src)
        state.reuse_logits = reuse
        results.append(beam_search(model.step, state, torch.full((4, 1), BOS), 8, EOS, beam_size=3))
        assert (state.logits is not None) == reuse
    assert [[h.tokens for h in hs] for hs in results[0]] == [[h.tokens for h in hs] for hs in results[1]]


def test_device_agnostic_on_cuda_when_present():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    model = tiny().cuda()
    src, tgt = random_tokens(2, 5).cuda(), random_tokens(2, 4).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(model(src, tgt)).all()


def test_cpu_dropout_keeps_one_minus_p_and_scales():
    from translator.model import Dropout

    drop = Dropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # keep probability 1 - p
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))  # inverted-dropout scaling
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the gradient flows through the same mask
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, drop(x))  # seeded by torch's generator, so runs and resumes are reproducible
    assert torch.equal(drop.eval()(x), x)
    # Neighbouring elements share a random word: they must still be independent.
    pairs = kept.view(-1, 4).float()
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - 0.81) < 0.003


def test_cpu_attention_keeps_its_flash_kernel():
    # build_model turns CUDA attention backends off; the flash switch is shared with the CPU's flash kernel,
    # whose loss sends CPU attention to the slower math kernel (it once did, unnoticed, for every CPU run).
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the flash switch is off by design")
    build_model(ModelConfig.from_name("tiny", vocab_size=50))
    q = torch.randn(2, 2, 3, 8)
    with torch.profiler.profile() as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert any("flash_attention_for_cpu" in e.key for e in prof.key_averages())


def test_attention_runs_in_float32_under_cpu_autocast(monkeypatch):
    # On a CPU, bf16 flash attention's backward is several times slower than float32's while bf16 matmuls are faster
    # (benchmarks/train_precision.py): autocast keeps the linear layers in bf16 and attention in float32.
    seen, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = tiny().train()
    src, tgt = random_tokens(2, 6), random_tokens(2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, tgt)
    assert logits.dtype == torch.bfloat16  # the projections did run in bf16
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen), seen
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(src, tgt).float()
    torch.testing.assert_close(low, model(src, tgt), atol=0.1, rtol=0.05)
    # With dropout on the attention weights the kernel is another, faster in bf16: left to autocast.
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny(attention_dropout=0.1).train()(src, tgt)
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen


def test_word_dropout_zeroes_whole_tokens_in_training_only():
    from translator.model import Embedding

    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
                      dropout=0.0, word_dropout=0.25)
    embed = Embedding(cfg, 50).train()
    tokens = random_tokens(64, 40, high=50)
    positions = embed.positions[:40]
    content = embed(tokens) - positions  # what the token contributes at each position
    dropped = (content == 0).all(dim=-1)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03  # whole tokens, at rate p
    assert ((content == 0).any(dim=-1) == dropped).all()  # never part of a token's features
    full = embed.token(tokens) * embed.scale
    torch.testing.assert_close(content[~dropped], full[~dropped] / 0.75)  # the kept ones scaled by 1 / (1 - p)
    embed.eval()
    torch.testing.assert_close(embed(tokens) - positions, full)  # decoding sees every token


def test_activation_dropout_drops_the_feed_forward_hidden_units_in_training_only():
    from translator.model import FeedForward

    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
                      activation="gelu", activation_dropout=0.25)
    ff = FeedForward(cfg).train()
    seen = []
    ff.down.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = torch.randn(32, 20, 16)
    ff(x)
    hidden, full = seen[-1], ff.activation(ff.up(x))
    dropped = hidden == 0
    assert abs(dropped.float().mean().item() - 0.25) < 0.02  # single units, at rate p
    torch.testing.assert_close(hidden[~dropped], full[~dropped] / 0.75)  # the kept ones scaled by 1 / (1 - p)
    ff.eval()
    torch.testing.assert_close(ff(x), ff.down(full))  # decoding sees every unit
