"""Self-speculative decoding with draft heads: exactly greedy's output (rows accepting different numbers of
proposals in one batch), the target distribution under sampling, and the heads themselves."""

import pytest
import torch

from translator import ModelConfig, build_model, count_parameters
from translator.config import DecodeConfig
from translator.decoding import DraftModel, _filter_logits, greedy, self_speculative
from translator.inference import self_speculative_ids, translate_ids

PAD, BOS, EOS, WRONG, V = 0, 1, 2, 3, 12


def heads(draft_logits):
    """A proposer from parallel heads' logits: draft_logits(h) -> (n, K, V)."""
    return lambda h, token, choose: choose(draft_logits(h))


class Scripted:
    """A test double of a model with draft heads. Row r's greedy continuation is SEQS[r] then EOS; off that path
    the model says WRONG. The heads propose the path too, except where `mistakes` holds (row, output position,
    head): there head k proposes WRONG, so rows accept different numbers of proposals in the same round."""

    SEQS = [[4, 5, 6, 7, 8, 9, 10, 11], [5, 5, 5, 6], [11, 10, 9, 8, 7, 6, 5], [7], [6, 7, 8, 9, 10, 11, 4, 5, 6]]

    def __init__(self, mistakes, heads=3):
        self.mistakes, self.heads = set(mistakes), heads

    def next_token(self, row, history):  # history: the tokens after BOS
        path = self.SEQS[row] + [EOS]
        return path[len(history)] if history == path[:len(history)] and len(history) < len(path) else WRONG

    def one_hot(self, token):
        logits = torch.full((V,), -5.0)
        logits[token] = 5.0
        return logits

    # The step function greedy() reads: the whole prefix per row.
    def step(self, tokens, state):
        return torch.stack([self.one_hot(self.next_token(row, t[1:])) for row, t in zip(state.rows, tokens.tolist())])

    # feed / main / draft for self_speculative: hidden states are (row, history length) pairs.
    def feed(self, new, state):
        h = []
        for i, tokens in enumerate(new.tolist()):
            start = len(state.fed[i])
            state.fed[i] += tokens
            h.append([[state.rows[i], start + j + 1] for j in range(len(tokens))])
        state.last = [len(t) for t in new.tolist()]
        self.histories = state
        return torch.tensor(h, dtype=torch.float)

    def history(self, row, length):
        i = self.histories.rows.index(row)
        return self.histories.fed[i][1:length]  # after BOS

    def main(self, h):
        flat = h.reshape(-1, 2).long().tolist()
        return torch.stack([self.one_hot(self.next_token(r, self.history(r, n))) for r, n in flat]).view(*h.shape[:-1], V)

    def draft(self, h):
        out = []
        for r, n in h.reshape(-1, 2).long().tolist():
            history = self.history(r, n)
            path = self.SEQS[r] + [EOS] * 10
            proposals = []
            for k in range(1, self.heads + 1):
                wrong = (r, len(history), k) in self.mistakes or history != path[:len(history)]
                proposals.append(self.one_hot(WRONG if wrong else path[len(history) + k]))
            out.append(torch.stack(proposals))
        return torch.stack(out).view(*h.shape[:-1], self.heads, V)


class ScriptedState:
    def __init__(self, n):
        self.rows, self.fed, self.last = list(range(n)), [[] for _ in range(n)], None

    def reorder(self, index, group=1, sentences=None):
        keep = index.tolist()
        self.rows, self.fed = [self.rows[i] for i in keep], [self.fed[i] for i in keep]

    def reject(self, kept, fed):
        for i, n in enumerate(kept):
            self.fed[i] = self.fed[i][:len(self.fed[i]) - fed + n]


@pytest.mark.parametrize("mistakes", [[], [(0, 1, 2), (0, 4, 1), (2, 0, 1), (2, 3, 3), (4, 2, 2)],
                                      [(r, i, 1) for r in range(5) for i in range(12)]])
def test_speculative_greedy_equals_greedy_with_rows_accepting_different_counts(mistakes):
    model = Scripted(mistakes)
    n = len(Scripted.SEQS)
    prefix = torch.full((n, 1), BOS)

    class Rows:
        rows = list(range(n))

        def reorder(self, index, group=1, sentences=None):
            self.rows = [self.rows[i] for i in index.tolist()]

    expected = greedy(model.step, Rows(), prefix, 20, EOS, banned=(PAD, BOS))
    assert expected == Scripted.SEQS
    got, stats = self_speculative(model.feed, model.main, heads(model.draft), ScriptedState(n), prefix, 20, EOS,
                                  banned=(PAD, BOS))
    assert got == expected
    if not mistakes:  # every proposal right: each pass yields the main token plus 3
        assert stats.accepted == stats.proposed - sum(3 - (len(s) % 4 or 4) + 1 for s in Scripted.SEQS) or \
            stats.tokens_per_pass > 3
    limited, _ = self_speculative(model.feed, model.main, heads(model.draft), ScriptedState(n), prefix, 5, EOS,
                                  banned=(PAD, BOS))
    assert limited == greedy(model.step, Rows(), prefix, 5, EOS, banned=(PAD, BOS))  # the output limit binds
    # Proposals only once at most 2 rows are unfinished; plain steps before.
    few, few_stats = self_speculative(model.feed, model.main, heads(model.draft), ScriptedState(n), prefix, 20, EOS,
                                      banned=(PAD, BOS), max_rows=2)
    assert few == expected
    assert 0 < few_stats.proposed < 3 * few_stats.passes and few_stats.passes >= stats.passes


@pytest.mark.parametrize("proposer", ["heads", "draft_model"])
def test_speculative_sampling_follows_the_target_distribution(proposer):
    # The model's next-token distribution p is fixed; the proposals come from q. Every sampled token, the main
    # one and the accepted proposals alike, must follow p, and with filtering, p filtered.
    p = torch.tensor([0.0, 0.0, 0.05, 0.45, 0.2, 0.3])  # EOS (2) ends some rows early
    q = torch.tensor([0.0, 0.0, 0.3, 0.1, 0.5, 0.1])

    class State:
        def reorder(self, index, group=1, sentences=None):
            pass

        def reject(self, kept, fed):
            pass

    def feed(new, state):
        return torch.zeros(new.size(0), new.size(1), 1)

    def scores(probs, k=None):  # fresh tensors, as the model's are (self_speculative writes into them)
        return lambda h: probs.log().expand(*h.shape[:-1], *([k] if k else []), 6).clone()

    def run(n, k, sampling, seed):
        prefix = torch.full((n, 1), BOS)
        propose = heads(scores(q, k)) if proposer == "heads" else DraftModel(feed, scores(q), State(), prefix, k)
        return self_speculative(feed, scores(p), propose, State(), prefix, 3, EOS, banned=(PAD, BOS),
                                sampling=sampling, generator=torch.Generator().manual_seed(seed))

    out, stats = run(4000, 2, {"temperature": 1.0}, 0)
    assert 0 < stats.accepted < stats.proposed
    for position in range(3):  # the first token is the model's own; the later ones pass the acceptance rule
        alive = [o for o in out if len(o) >= position]  # rows that had not ended (an ended row's token is EOS)
        counts = torch.bincount(torch.tensor([o[position] if len(o) > position else EOS for o in alive]), minlength=6)
        assert (counts / counts.sum() - p).abs().sum() / 2 < 0.03, position  # total variation distance
    filtered = _filter_logits(p.log()[None], 1.0, 2, 1.0).softmax(-1)[0]
    out, _ = run(2000, 2, {"top_k": 2}, 1)  # (q's top two are not p's: nothing is accepted)
    counts = torch.bincount(torch.tensor([t for o in out for t in o]), minlength=6).float()
    assert set(counts.nonzero().flatten().tolist()) == {3, 5}
    assert ((counts / counts.sum()) - filtered).abs().sum() / 2 < 0.04


def tiny_with_heads(arch, heads=3, chain=False):
    extra = {"prefix_lm": True} if arch == "decoder_only" else {}
    cfg = ModelConfig.from_name("tiny" if arch == "encoder_decoder" else "lm_tiny", vocab_size=30, dropout=0.0,
                                draft_heads=heads, draft_chain=chain, **extra)
    return build_model(cfg).eval()


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_no_heads_is_the_papers_model_exactly(arch):
    torch.manual_seed(0)
    plain = tiny_with_heads(arch, heads=0)
    torch.manual_seed(0)
    with_heads = tiny_with_heads(arch, heads=3)
    assert count_parameters(plain) == count_parameters(tiny_with_heads(arch, heads=0))
    assert set(with_heads.state_dict()) - set(plain.state_dict()) == {f"draft_heads.{i}.proj.{w}" for i in range(3)
                                                                       for w in ("weight", "bias")}
    assert count_parameters(with_heads) - count_parameters(plain) == 3 * (32 * 32 + 32)
    assert count_parameters(tiny_with_heads(arch, heads=3, chain=True)) - count_parameters(plain) == 3 * (64 * 32 + 32)
    assert not any(k.startswith("draft_heads") for k in plain.state_dict())
    # New heads start as the main head (their residual branch is zero).
    h = torch.randn(2, 5, 32)
    assert all(torch.allclose(logits, with_heads.logits(h), atol=1e-6) for logits in with_heads.draft_logits(h).unbind(-2))


@pytest.mark.parametrize("chain", [False, True], ids=["parallel_heads", "chained_heads"])
@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_model_speculative_greedy_equals_greedy_batched_and_alone(arch, chain):
    torch.manual_seed(1)
    model = tiny_with_heads(arch, chain=chain)
    for i, head in enumerate(model.draft_heads):  # heads right some of the time: mixed acceptance
        torch.nn.init.normal_(head.proj.weight, std=0.02 * (i + 1))
    with torch.no_grad():  # an untrained model: keep EOS (logit 0 through the tied embedding) from ending at once
        model.tgt_embed.token.weight[EOS] = 0.0
    sources = [torch.randint(4, 30, (n,)).tolist() for n in (3, 8, 5, 12, 1, 6, 9, 4)]
    options = DecodeConfig(max_len_b=10, batch_tokens=10_000, speculate_rows=0)  # proposing from the start
    expected = [o[0] for o in translate_ids(model, sources, options, mode="greedy")]
    batched, stats = self_speculative_ids(model, sources, options)
    alone, _ = self_speculative_ids(model, sources, DecodeConfig(max_len_b=10, batch_tokens=1))
    assert batched == expected and alone == expected
    assert 0 < stats.accepted < stats.proposed and stats.passes > 0
    assert stats.proposed == 3 * stats.passes
    for k in (1, 2):  # the first k heads propose: k tokens a pass, the same output
        fewer, fewer_stats = self_speculative_ids(model, sources, options, k=k)
        assert fewer == expected and fewer_stats.proposed == k * fewer_stats.passes
    # Plain steps while more than 3 sentences are unfinished, then proposals.
    tail, tail_stats = self_speculative_ids(model, sources, DecodeConfig(max_len_b=10, batch_tokens=10_000,
                                                                          speculate_rows=3))
    assert tail == expected and 0 < tail_stats.proposed < 3 * tail_stats.passes


def test_rejected_positions_no_row_keeps_are_forgotten():
    torch.manual_seed(0)
    model = tiny_with_heads("encoder_decoder")
    state = model.start(torch.randint(4, 30, (2, 5)))
    model.hidden(torch.full((2, 1), BOS), state)
    model.hidden(torch.randint(4, 30, (2, 4)), state)  # a main token and 3 proposals per row
    state.reject([2, 2], 4)  # both rows keep 2: the last 2 positions are gone, nothing is hidden
    assert state.length == 3 and state.rejected is None and all(cache.length == 3 for cache, _ in state.kv)
    model.hidden(torch.randint(4, 30, (2, 4)), state)
    state.reject([1, 3], 4)  # row 0 hides 2 of the 3 positions row 1 keeps
    assert state.length == 6 and state.rejected.tolist() == [[False] * 4 + [True] * 2, [False] * 6]
    assert state.positions(torch.zeros(2, 1, dtype=torch.long)).tolist() == [[4], [6]]


@pytest.mark.parametrize("k", [0, 4])
def test_more_heads_than_the_model_has_are_refused(k):
    with pytest.raises(ValueError, match=f"--draft-k {k}: the model has 3 draft heads"):
        self_speculative_ids(tiny_with_heads("encoder_decoder"), [[5, 6]], DecodeConfig(), k=k)


def test_chained_heads_train_on_what_they_propose_from():
    """Teacher-forced, head k at position i reads head k-1's state there and the target at i + k - 1; decoding,
    it reads the token proposed before its own. Where the proposals are the targets, the logits agree."""
    torch.manual_seed(3)
    model = tiny_with_heads("encoder_decoder", chain=True)
    for head in model.draft_heads:
        torch.nn.init.normal_(head.proj.weight, std=0.3)
    h, targets = torch.randn(2, 7, 32), torch.randint(4, 30, (2, 7))
    states = model.draft_states(h, targets)
    assert [s.shape[1] for s in states] == [6, 5, 4]
    for i in range(4):
        seen = []

        def forced(logits, i=i):  # the chain follows the targets
            seen.append(logits)
            return targets[:, i + len(seen)], logits.log_softmax(-1)

        proposals, _ = model.draft(h[:, i], targets[:, i], forced)
        assert torch.equal(proposals, targets[:, i + 1:i + 4])
        for k, logits in enumerate(seen):
            torch.testing.assert_close(logits, model.logits(states[k][:, i]))
    assert model.draft_states(h[:, :2], targets[:, :2])[0].shape[1] == 1 and len(model.draft_states(h[:, :2], targets[:, :2])) == 1


def test_a_model_without_heads_is_refused():
    with pytest.raises(ValueError, match="no draft heads"):
        self_speculative_ids(tiny_with_heads("encoder_decoder", heads=0), [[5, 6]], DecodeConfig())


@pytest.mark.parametrize("heads_dir", ["toy_heads_dir", "toy_chain_heads_dir"])
def test_heads_trained_onto_a_frozen_model_speed_it_up_and_change_nothing_else(toy_model_dir, heads_dir, request):
    from translator.checkpoint import load_model

    run_dir, data_dir = toy_model_dir
    base, tokenizer, _ = load_model(run_dir)
    model, _, recipe = load_model(request.getfixturevalue(heads_dir))
    assert model.cfg.draft_chain == (heads_dir == "toy_chain_heads_dir")
    heads = {k for k in model.state_dict() if k.startswith("draft_heads.")}
    assert len(heads) == 6 and all(torch.equal(v, model.state_dict()[k]) for k, v in base.state_dict().items())
    sources = tokenizer.encode((data_dir / "toy/valid.en").read_text().splitlines()[:60])
    options = DecodeConfig(beam=1, batch_tokens=10_000, speculate_rows=0)  # 60 rows, proposing from the start
    expected = [o[0] for o in translate_ids(model, sources, options, mode="greedy")]
    batched, stats = self_speculative_ids(model, sources, options)
    alone, _ = self_speculative_ids(model, sources, DecodeConfig(beam=1, batch_tokens=1))
    assert batched == expected and alone == expected
    assert stats.tokens_per_pass > 1.5, stats  # the heads learned to propose what the model says


def test_generate_with_heads_equals_greedy_generation():
    from translator.inference import generate_ids

    torch.manual_seed(2)
    model = tiny_with_heads("decoder_only")
    model.cfg.prefix_lm = False  # a plain language model
    for i, head in enumerate(model.draft_heads):
        torch.nn.init.normal_(head.proj.weight, std=0.02 * (i + 1))
    with torch.no_grad():
        model.tgt_embed.token.weight[EOS] = 0.0
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    expected = generate_ids(model, prompts, 12, mode="greedy")
    assert generate_ids(model, prompts, 12, mode="greedy", speculate_heads=True) == expected
    assert generate_ids(model, prompts, 12, mode="greedy", speculate_heads=True, draft_k=1) == expected
    assert all(len(c) > 0 for c in expected)
