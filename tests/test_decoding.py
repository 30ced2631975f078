import collections
import itertools
import math

import pytest
import torch

from translator import ModelConfig, build_model
from translator.config import DecodeConfig
from translator.decoding import (EnsembleState, ForcedState, _best_allowed, _fill_gaps, _log_normaliser,
                                 _stay_with_parent, _topk, beam_search, ensemble, forced_prefix, greedy, length_penalty,
                                 max_lengths, sample)
from translator.inference import Ensemble, translate_hypotheses, translate_ids

PAD, BOS, EOS = 0, 1, 2


class History:
    """A test double for the decoding state: remembers nothing, but counts reorders."""

    def __init__(self):
        self.reorders = 0

    def reorder(self, index, group=1, sentences=None):
        self.reorders += 1


def random_table_step(vocab_size=6, seed=0):
    """A 'model' whose next-token logits are a fixed random function of the whole prefix."""
    def step(tokens, state):
        rows = []
        for prefix in tokens.tolist():
            g = torch.Generator().manual_seed(hash((seed, tuple(prefix))) % (2 ** 31))
            rows.append(torch.randn(vocab_size, generator=g) * 2)
        return torch.stack(rows)
    return step


def scripted_step(table, vocab_size=5):
    """Next-token probabilities looked up by the prefix after BOS: {(w1, w2): {token: p}}."""
    def step(tokens, state):
        rows = []
        for prefix in tokens[:, 1:].tolist():
            probs = torch.zeros(vocab_size)
            for token, p in table[tuple(prefix)].items():
                probs[token] = p
            rows.append(probs.log())
        return torch.stack(rows)
    return step


def bos(batch):
    return torch.full((batch, 1), BOS)


# -- Beam search against exhaustive search -------------------------------------------------------------------

def brute_force(step, max_len, alpha, form, vocab_size=6):
    """Score every sequence over the content tokens with up to max_len tokens, then EOS."""
    content = range(3, vocab_size)
    results = []
    for n in range(max_len + 1):
        for seq in itertools.product(content, repeat=n):
            prefix, logp = [BOS], 0.0
            for token in list(seq) + [EOS]:
                logp += torch.log_softmax(step(torch.tensor([prefix]), None)[0], -1)[token].item()
                prefix.append(token)
            results.append((logp / length_penalty(n + 1, alpha, form), list(seq)))
    return sorted(results, key=lambda r: r[0], reverse=True)


@pytest.mark.parametrize("alpha, form", [(0.6, "gnmt"), (1.0, "length"), (0.0, "gnmt")])
def test_wide_beam_equals_exhaustive_search(alpha, form):
    step = random_table_step()
    expected = brute_force(step, max_len=4, alpha=alpha, form=form)
    # A beam of 128 holds every prefix (at most 3^4 = 81) and every EOS candidate (at most 27 + 81).
    hyps = beam_search(step, History(), bos(1), max_len=4, eos=EOS, beam_size=128, alpha=alpha, lp_form=form,
                       nbest=10, banned=(PAD, BOS))[0]
    assert [h.tokens for h in hyps] == [seq for _, seq in expected[:10]]
    assert [h.score for h in hyps] == pytest.approx([score for score, _ in expected[:10]], abs=1e-5)


def test_beam_search_with_a_real_model_never_scores_below_greedy():
    model = build_model(ModelConfig.from_name("tiny", vocab_size=20)).eval()
    src = torch.randint(4, 20, (6, 7))
    greedy_out = greedy(model.step, model.start(src), bos(6), 8, EOS, banned=(PAD, BOS))
    beams = beam_search(model.step, model.start(src), bos(6), 8, EOS, beam_size=8, alpha=0.0, banned=(PAD, BOS))

    def logprob(i, tokens):
        state, lp, prefix = model.start(src[i:i + 1]), 0.0, [BOS]
        for token in tokens + [EOS]:
            lp += torch.log_softmax(model.step(torch.tensor([prefix]), state)[0], -1)[token].item()
            prefix.append(token)
        return lp

    for i in range(6):
        assert beams[i][0].score == pytest.approx(logprob(i, beams[i][0].tokens), abs=1e-4)
        assert beams[i][0].score >= logprob(i, greedy_out[i]) - 1e-4


@pytest.mark.parametrize("alpha, form", [(0.6, "gnmt"), (1.0, "length"), (2.0, "length")])
def test_optimal_stop_finds_the_best_hypothesis_where_the_early_stop_misses_it(alpha, form):
    """A beam of 8 over 3 content tokens and 4 positions: the early stop (fairseq's) ends a sentence at its 8th
    finished hypothesis and sometimes misses a longer, better one; the optimal stop (tensor2tensor's) does not."""
    missed = 0
    for seed in range(20):
        step = random_table_step(seed=seed)
        best_score, best = brute_force(step, max_len=4, alpha=alpha, form=form)[0]
        search = lambda stop: beam_search(step, History(), bos(1), 4, EOS, beam_size=8, alpha=alpha, lp_form=form,
                                          banned=(PAD, BOS), stop=stop)[0][0]
        optimal, early = search("optimal"), search("early")
        assert optimal.tokens == best and optimal.score == pytest.approx(best_score, abs=1e-5), seed
        assert early.score <= optimal.score + 1e-6
        missed += early.tokens != best
    assert missed > 0  # the case exists: otherwise this test could not tell the two rules apart


# -- Scripted steps with hand-computed scores ---------------------------------------------------------------

W1, W2 = 3, 4
SCRIPT = {
    (): {W1: 0.6, W2: 0.4},
    (W1,): {EOS: 0.15, W1: 0.05, W2: 0.8},
    (W2,): {EOS: 0.9, W1: 0.05, W2: 0.05},
    (W1, W2): {EOS: 0.7, W1: 0.2, W2: 0.1},
    (W1, W1): {EOS: 0.5, W1: 0.25, W2: 0.25},
}


@pytest.mark.parametrize("alpha, form, best", [(0.0, "gnmt", [W2]), (0.6, "gnmt", [W1, W2]), (1.0, "length", [W1, W2])])
def test_scripted_beam_with_length_penalty(alpha, form, best):
    # Beam 2. Step 0 keeps [w1] (0.6) and [w2] (0.4). Step 1 ranks w1 w2 (.48), w2 EOS (.36), w1 EOS (.09),
    # w1 w1 (.03): [w2] ends (EOS inside the top 2); w1 EOS ranks 3rd and is not ended; beams: w1 w2, w1 w1.
    # Step 2 ranks w1 w2 EOS (.336) first: it ends, and with two hypotheses the sentence is done.
    hyps = beam_search(scripted_step(SCRIPT), History(), bos(1), max_len=10, eos=EOS, beam_size=2, alpha=alpha,
                       lp_form=form, nbest=2)[0]
    lp = {n: length_penalty(n, alpha, form) for n in (2, 3)}
    expected = {(W2,): math.log(0.4 * 0.9) / lp[2], (W1, W2): math.log(0.6 * 0.8 * 0.7) / lp[3]}
    assert len(hyps) == 2 and hyps[0].tokens == best
    for h in hyps:
        assert h.score == pytest.approx(expected[tuple(h.tokens)], abs=1e-6)


def test_length_penalty_forms():
    assert length_penalty(5, 0.6) == pytest.approx((10 / 6) ** 0.6)
    assert length_penalty(5, 0.6, "length") == pytest.approx(5 ** 0.6)
    assert length_penalty(7, 0.0) == 1.0
    with pytest.raises(ValueError, match="'gnmt' or 'length'"):
        length_penalty(3, 0.6, "average")


def test_scripted_greedy():
    assert greedy(scripted_step(SCRIPT), History(), bos(1), 10, EOS) == [[W1, W2]]


def test_max_length_is_a_times_source_plus_b_and_then_eos_is_forced():
    assert max_lengths(torch.tensor([3, 10]), a=1.0, b=50).tolist() == [53, 60]
    assert max_lengths(torch.tensor([3, 10]), a=1.2, b=5, cap=15).tolist() == [8, 15]
    never_ends = lambda tokens, state: torch.tensor([[0.0, 0.0, -1e9, 5.0, 0.0]]).expand(tokens.size(0), 5)
    limits = torch.tensor([2, 5])
    assert greedy(never_ends, History(), bos(2), limits, EOS) == [[3, 3], [3] * 5]
    hyps = beam_search(never_ends, History(), bos(2), limits, EOS, beam_size=2)
    assert [h[0].tokens for h in hyps] == [[3, 3], [3] * 5]


def test_min_len_delays_eos():
    assert greedy(scripted_step({**SCRIPT, (W1, W2): {EOS: 0.7, W1: 0.2, W2: 0.1}, (W1, W2, W1): {EOS: 1.0}}),
                  History(), bos(1), 10, EOS, min_len=3) == [[W1, W2, W1]]


# -- Agreement between the decoders ---------------------------------------------------------------------

def tiny_model():
    return build_model(ModelConfig.from_name("tiny", vocab_size=20, dropout=0.0)).eval()


def test_beam_one_equals_greedy():
    model = tiny_model()
    src = torch.randint(4, 20, (16, 9))
    src[::3, 6:] = PAD
    expected = greedy(model.step, model.start(src), bos(16), 12, EOS, banned=(PAD, BOS))
    hyps = beam_search(model.step, model.start(src), bos(16), 12, EOS, beam_size=1, banned=(PAD, BOS))
    assert [h[0].tokens for h in hyps] == expected
    step = random_table_step(seed=3)
    assert [h[0].tokens for h in beam_search(step, History(), bos(1), 6, EOS, beam_size=1, banned=(PAD, BOS))] == \
        greedy(step, History(), bos(1), 6, EOS, banned=(PAD, BOS))


def test_top_k_one_sampling_equals_greedy():
    model = tiny_model()
    src = torch.randint(4, 20, (8, 9))
    expected = greedy(model.step, model.start(src), bos(8), 12, EOS, banned=(PAD, BOS))
    got = sample(model.step, model.start(src), bos(8), 12, EOS, banned=(PAD, BOS), top_k=1, temperature=0.7,
                 generator=torch.Generator().manual_seed(1))
    assert got == expected


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    model = tiny_model()
    src = torch.randint(4, 20, (8, 9))

    def run(seed, **kw):
        return sample(model.step, model.start(src), bos(8), 12, EOS, banned=(PAD, BOS),
                      generator=torch.Generator().manual_seed(seed), **kw)
    assert run(5) == run(5)
    assert run(5) != run(6)
    assert run(5, top_p=0.9, top_k=5) == run(5, top_p=0.9, top_k=5)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two, so only tokens 3 and 4 are drawn.
    logits = torch.tensor([[-1e9, -1e9, math.log(0.05), math.log(0.5), math.log(0.3)] + [math.log(0.15)]])
    step = lambda tokens, state: logits.expand(tokens.size(0), -1)
    g = torch.Generator().manual_seed(0)
    draws = sample(step, History(), bos(200), 1, EOS, top_p=0.7, generator=g, min_len=1)
    seen = {d[0] for d in draws}
    assert seen == {3, 4}


def test_epsilon_sampling_drops_the_tokens_below_epsilon_but_never_the_best():
    # Probabilities 0.5, 0.3, 0.15, 0.05: epsilon 0.1 keeps tokens 3, 4 and 5, in proportion; epsilon 0.6 would
    # drop all of them, so it keeps the best.
    logits = torch.tensor([[-1e9, -1e9, math.log(0.05), math.log(0.5), math.log(0.3)] + [math.log(0.15)]])
    step = lambda tokens, state: logits.expand(tokens.size(0), -1)
    draws = sample(step, History(), bos(4000), 1, EOS, epsilon=0.1, generator=torch.Generator().manual_seed(0),
                   min_len=1)
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=6).float()
    assert counts[:3].sum() == 0
    torch.testing.assert_close(counts[3:] / counts.sum(), torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03, rtol=0)
    assert {d[0] for d in sample(step, History(), bos(50), 1, EOS, epsilon=0.6, min_len=1)} == {3}
    with pytest.raises(ValueError, match="epsilon"):
        sample(step, History(), bos(1), 1, EOS, epsilon=1.0)


def test_batched_beam_search_equals_one_sentence_at_a_time():
    model = tiny_model()
    src = torch.randint(4, 20, (5, 8))
    src[1, 3:] = PAD
    src[3, 5:] = PAD
    together = beam_search(model.step, model.start(src), bos(5), max_lengths((src != PAD).sum(1), b=5), EOS,
                           beam_size=4, nbest=2, banned=(PAD, BOS))
    for i in range(5):
        one = src[i:i + 1, : int((src[i] != PAD).sum())]
        alone = beam_search(model.step, model.start(one), bos(1), max_lengths((one != PAD).sum(1), b=5), EOS,
                            beam_size=4, nbest=2, banned=(PAD, BOS))[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in together[i]], abs=1e-5)


def test_decoder_only_decodes_with_the_same_functions():
    lm = build_model(ModelConfig.from_name("lm_tiny", vocab_size=20)).eval()
    prompt = torch.randint(4, 20, (3, 5))
    expected = greedy(lm.step, lm.start(prompt), prompt, 6, EOS, banned=(PAD, BOS))
    hyps = beam_search(lm.step, lm.start(prompt), prompt, 6, EOS, beam_size=1, banned=(PAD, BOS))
    assert [h[0].tokens for h in hyps] == expected
    # Greedy with the cache equals greedy recomputing the whole sequence each step.
    for i in range(3):
        seq = prompt[i:i + 1]
        for _ in range(len(expected[i])):
            logits = lm(seq)[0, -1]
            logits[[PAD, BOS]] = -torch.inf
            seq = torch.cat([seq, logits.argmax().view(1, 1)], 1)
        assert seq[0, 5:].tolist() == expected[i]


@pytest.mark.parametrize("width", [8000, 8003, 130, 40])
def test_two_stage_topk_and_blocked_normaliser_equal_torch(width):
    # The CPU paths of beam search's vocabulary-wide passes: blocks of 64 columns (plus a remainder), and row
    # blocks of 64 for the normaliser; 200 rows cover more than one row block.
    logits = torch.randn(200, width, generator=torch.Generator().manual_seed(width)) * 4
    logits[0, 5] = logits[0, 900 % width] = 50.0  # a tie at the top
    logits[1, width - 1] = 60.0  # the best in the columns after the last whole block
    for k in (1, 4, 10):
        values, index = _topk(logits, k)
        expected = logits.topk(k, dim=-1)
        assert torch.equal(values, expected.values)
        assert torch.equal(logits.gather(1, index), values)  # the indices point at those values
        assert (index.sort(dim=1).values.diff(dim=1) > 0).all()  # and are distinct
    expected = torch.logsumexp(logits, dim=-1, keepdim=True)
    torch.testing.assert_close(_log_normaliser(logits), expected)
    top = _best_allowed(logits, 4, EOS, torch.tensor([PAD, BOS]), None)[2]
    assert torch.equal(top, logits.amax(dim=-1, keepdim=True))  # beam search passes it on as the row maximum
    torch.testing.assert_close(_log_normaliser(logits, top), expected)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_children_stay_in_their_parents_rows(K):
    # Every assignment of K children to K parent beams: the order is a permutation, a parent's first child
    # takes the parent's place, and the children that move are as few as can be (K - distinct parents).
    parent = torch.tensor(list(itertools.product(range(K), repeat=K)))
    order = _stay_with_parent(parent)
    assert torch.equal(order.sort(dim=1).values, torch.arange(K).expand_as(order))
    for parents, children in zip(parent.tolist(), order.tolist()):
        stays = [place for place, child in enumerate(children) if parents[child] == place]
        assert sorted(stays) == sorted(set(parents))
        assert all(children[p] == parents.index(p) for p in stays)  # the first-born, the better ranked


def test_fill_gaps_keeps_rows_in_place_and_moves_the_last_into_gaps():
    assert _fill_gaps({1, 3, 6}, 8) == [0, 5, 2, 7, 4]  # rows 5 and 7 fill the gaps at 1 and 3
    for seed in range(20):
        done = (torch.rand(30, generator=torch.Generator().manual_seed(seed)) < 0.4).nonzero().squeeze(1).tolist()
        order = _fill_gaps(set(done), 30)
        assert sorted(order) == [row for row in range(30) if row not in done]
        assert sum(row != place for place, row in enumerate(order)) == sum(row < len(order) for row in done)


# -- Ensembles and forced prefixes ------------------------------------------------------------------------------

def test_an_ensemble_takes_the_argmax_of_the_averaged_log_probabilities():
    # A says 3 (0.9) or 5 (0.1); B says 4 (0.6), 5 (0.38) or 3 (0.02). Alone, A picks 3 and B 4; probabilities
    # averaged would pick 3 (0.46); log-probabilities averaged pick 5: 0.1 * 0.38 > 0.9 * 0.02 > 0 * 0.6.
    def table(entries):  # every other prefix ends
        return collections.defaultdict(lambda: {EOS: 1.0}, entries)
    a = scripted_step(table({(): {3: 0.9, 5: 0.1}}), vocab_size=6)
    b = scripted_step(table({(): {3: 0.02, 4: 0.6, 5: 0.38}}), vocab_size=6)
    both = ensemble([a, b])
    assert greedy(both, EnsembleState([History(), History()]), bos(1), 5, EOS) == [[5]]
    assert greedy(a, History(), bos(1), 5, EOS) == [[3]] and greedy(b, History(), bos(1), 5, EOS) == [[4]]
    # Beam scores are the renormalised geometric mean's log-probabilities.
    hyps = beam_search(both, EnsembleState([History(), History()]), bos(1), 5, EOS, beam_size=2, alpha=0.0)[0]
    total = math.sqrt(0.9 * 0.02) + math.sqrt(0.1 * 0.38)
    assert [h.tokens for h in hyps] == [[5]]
    assert hyps[0].score == pytest.approx(math.log(math.sqrt(0.1 * 0.38) / total), abs=1e-5)


def test_an_ensemble_of_a_model_with_itself_is_the_model():
    cfg = ModelConfig.from_name("tiny", vocab_size=40, dropout=0.0)
    model = build_model(cfg).eval()
    twice = Ensemble([model, model])
    src = torch.randint(4, 40, (6, 7))
    for mode in ("greedy", "beam"):
        alone = translate_hypotheses(model, src.tolist(), DecodeConfig(beam=3, max_len_b=8), mode=mode, nbest=1)
        together = translate_hypotheses(twice, src.tolist(), DecodeConfig(beam=3, max_len_b=8), mode=mode, nbest=1)
        assert [h[0].tokens for h in together] == [h[0].tokens for h in alone]
        if mode == "beam":
            assert [h[0].score for h in together] == pytest.approx([h[0].score for h in alone], abs=1e-5)


def test_ensemble_members_must_agree():
    small = build_model(ModelConfig.from_name("tiny", vocab_size=40))
    with pytest.raises(ValueError, match="vocab_size"):
        Ensemble([small, build_model(ModelConfig.from_name("tiny", vocab_size=41))])


def test_a_forced_prefix_starts_the_output_and_the_search_goes_on_from_it():
    step = random_table_step(seed=3)
    prefix_tokens = [[5, 5], [], [4]]
    free = greedy(step, History(), bos(3), 6, EOS, banned=(PAD, BOS))
    forced = torch.tensor([[5, 5], [-1, -1], [4, -1]])
    for search in ("greedy", "beam"):
        state = ForcedState(History(), forced, start=1)
        if search == "greedy":
            out = greedy(forced_prefix(step), state, bos(3), 6, EOS, banned=(PAD, BOS))
        else:
            out = [h[0].tokens for h in beam_search(forced_prefix(step), state, bos(3), 6, EOS, beam_size=3,
                                                    banned=(PAD, BOS))]
        for tokens, want in zip(out, prefix_tokens):
            assert tokens[:len(want)] == want
        if search == "greedy":  # after the prefix, greedy as ever: the continuation is greedy's from that prefix
            assert out[1] == free[1]
            rest = greedy(step, History(), torch.tensor([[BOS, 5, 5]]), 4, EOS, banned=(PAD, BOS))[0]
            assert out[0] == [5, 5] + rest
        else:  # the search continues from the prefix: as good as any hypothesis that starts with it
            scored = beam_search(step, History(), torch.tensor([[BOS, 4]]), 5, EOS, beam_size=3, banned=(PAD, BOS))
            assert out[2] == [4] + scored[0][0].tokens


def test_prefixes_in_a_batch_equal_prefixes_alone():
    cfg = ModelConfig.from_name("tiny", vocab_size=40, dropout=0.0)
    model = build_model(cfg).eval()
    sources = torch.randint(4, 40, (5, 6)).tolist()
    prefixes = [[7, 8], [], [9], [10, 11, 12], []]
    options = DecodeConfig(beam=3, max_len_b=5)
    for mode in ("greedy", "beam"):
        together = translate_ids(model, sources, options, mode=mode, prefixes=prefixes)
        alone = [translate_ids(model, [s], options, mode=mode, prefixes=[p])[0] for s, p in zip(sources, prefixes)]
        assert together == alone
        assert all(out[0][:len(p)] == p for out, p in zip(together, prefixes))
