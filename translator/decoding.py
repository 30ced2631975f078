"""Decoding as plain functions over a step function.

A step function `step(tokens, state) -> logits` receives every token so far, (N, T), and returns the
logits of the next one, (N, V). `state` is the caller-owned cache: it must offer `reorder(index, group,
sentences)`, after which row i holds what row index[i] held and each `group` consecutive rows belong to one
sentence (its beams); `sentences` says, from the host, which old sentence each new group comes from (a `range`
when none moved), so that the state need not work it out on the device. Both models' `.step` and `.start(...)`
fit this; so does a scripted test double. A state whose reorders cost the same whatever rows move says so with
`sparse_reorder = False` (beam search then skips keeping continuations in their parents' rows). Each function
drops sentences from the batch once they are finished.

Lengths: at most `max_len` tokens are generated before EOS (per sentence, a*src_len + b in the paper),
then EOS is forced. Returned token lists hold neither the prefix nor EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor


class State(Protocol):
    def reorder(self, index: Tensor, group: int = 1, sentences: Sequence[int] | None = None) -> None: ...


StepFn = Callable[[Tensor, State], Tensor]


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float  # sum of log-probabilities (EOS included) divided by the length penalty


def length_penalty(length: int | Tensor, alpha: float, form: str = "gnmt") -> float | Tensor:
    """'gnmt': ((5 + |Y|) / 6)^alpha, as the paper uses (Wu et al., 2016); 'length': |Y|^alpha, as fairseq,
    Hugging Face and CTranslate2 use. |Y| counts the EOS token."""
    if form == "gnmt":
        return ((5 + length) / 6) ** alpha
    if form == "length":
        return length ** alpha
    raise ValueError(f"length penalty form {form!r}: expected 'gnmt' or 'length'")


def max_lengths(src_lengths: Tensor, a: float = 1.0, b: int = 50, cap: int | None = None) -> Tensor:
    """The paper's output limit: a * source length + b (capped, e.g. by the model's max_positions)."""
    limit = (src_lengths.float() * a + b).long()
    return limit.clamp(max=cap) if cap is not None else limit


def _as_lengths(max_len: int | Tensor, batch: int, device: torch.device) -> Tensor:
    if isinstance(max_len, Tensor):
        return max_len.to(device=device, dtype=torch.long)
    return torch.full((batch,), int(max_len), device=device, dtype=torch.long)


def _excluded(eos: int, banned: Sequence[int], may_end: bool) -> list[int]:
    return list(banned) + ([] if may_end else [eos])


def _restrict(logits: Tensor, eos: int, banned: Sequence[int], must_end: Tensor | None, may_end: bool) -> Tensor:
    """A float32 copy of the logits with banned tokens removed; rows in must_end (None: no row) may only produce EOS."""
    logits = logits.float().clone()
    logits[:, _excluded(eos, banned, may_end)] = -torch.inf
    if must_end is None:
        return logits
    rows = must_end.nonzero().squeeze(1)  # usually none: edit those rows only, not the whole (N, V) matrix
    if rows.numel():
        eos_logits = logits[rows, eos]
        logits[rows] = -torch.inf
        logits[rows, eos] = eos_logits
    return logits


def _exclusions(eos: int, banned: Sequence[int], device: torch.device) -> dict[bool, Tensor | None]:
    """For may_end False/True, the tokens a step may not produce, as a tensor made once per search (a tensor made
    each step is a host-to-device copy each step on a GPU)."""
    return {may_end: torch.tensor(excluded, device=device) if (excluded := _excluded(eos, banned, may_end)) else None
            for may_end in (False, True)}


def _topk(x: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor]:
    """x.topk(k, dim=-1) for 2-D x. On CPU in two stages, since PyTorch's CPU top-k over vocabulary-wide rows
    cost as much as the output projection: a row's k best lie in the k blocks (of `block` columns) whose maxima
    are highest, so only those blocks are ranked. Same values; among equal values the index may differ."""
    n, width = x.shape
    blocks = width // block
    if x.device.type != "cpu" or blocks <= k:
        return x.topk(k, dim=-1)
    best_blocks = x[:, :blocks * block].unflatten(1, (blocks, block)).amax(-1).topk(k, dim=-1).indices
    columns = (best_blocks[:, :, None] * block + torch.arange(block, device=x.device)).flatten(1)
    if blocks * block < width:  # the columns left over after the last whole block always compete
        columns = torch.cat([columns, torch.arange(blocks * block, width, device=x.device).expand(n, -1)], dim=1)
    values, order = x.gather(1, columns).topk(k, dim=-1)
    return values, columns.gather(1, order)


def _log_normaliser(logits: Tensor, top: Tensor | None = None, rows: int = 64) -> Tensor:
    """torch.logsumexp(logits.float(), dim=-1, keepdim=True), (N, 1), given (if known) each row's maximum `top`;
    on CPU a block of rows at a time: its exp needs a temporary as large as the logits, and a fresh (N, V)
    tensor per step cost more than the sum. (On a GPU, or for fewer rows than a block, the loop's extra
    operations would cost more.)"""
    if logits.device.type != "cpu" or logits.size(0) < rows:
        return torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    top = (logits.amax(dim=-1, keepdim=True) if top is None else top).float()
    total = torch.empty_like(top)
    shifted = top.new_empty(min(rows, logits.size(0)), logits.size(1))  # one block's room, reused
    for i in range(0, logits.size(0), rows):
        block = torch.sub(logits[i:i + rows], top[i:i + rows], out=shifted[:min(rows, logits.size(0) - i)])
        total[i:i + rows] = block.exp_().sum(dim=-1, keepdim=True)
    return total.log_() + top


def _best_allowed(logits: Tensor, k: int, eos: int, excluded: Tensor | None,
                  must_end: Tensor | None, ranked: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The k best tokens of each row that are not `excluded` (see _exclusions), best first: (logits in float32,
    tokens), both (N, k), padded with (-inf, EOS) where fewer are allowed; rows in `must_end` (None: no row) offer
    EOS alone. Also each row's largest logit, allowed or not, (N, 1). One top-k over the (N, V) logits, which
    are neither normalised nor copied: argmax and beam search need neither. ranked=False: the k best may come
    among a few more columns, in no order, the others at -inf (for a caller that ranks them anyway: two
    operations fewer)."""
    n_excluded = 0 if excluded is None else excluded.numel()
    values, tokens = _topk(logits, min(k + n_excluded, logits.size(-1)))
    values = values.float()
    top = values[:, :1]
    if excluded is not None:
        values = values.masked_fill(torch.isin(tokens, excluded), -torch.inf)
    if must_end is not None:  # a select on the (N, k) candidates, no host sync
        only_eos = torch.full_like(values, -torch.inf)
        only_eos[:, 0] = logits[:, eos].float()
        values = torch.where(must_end[:, None], only_eos, values)
        tokens = torch.where(must_end[:, None] & (torch.arange(tokens.size(1), device=tokens.device) == 0), eos, tokens)
    if values.size(1) < k:  # a vocabulary smaller than k (tiny test models)
        pad = k - values.size(1)
        values = torch.nn.functional.pad(values, (0, pad), value=-torch.inf)
        tokens = torch.nn.functional.pad(tokens, (0, pad), value=eos)
    if ranked and (values.size(1) > k or must_end is not None):
        values, order = values.topk(k, dim=-1)  # the excluded ones fall behind
        tokens = tokens.gather(1, order)
    return values, tokens, top


def _filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float, epsilon: float = 0.0) -> Tensor:
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    if epsilon > 0:  # epsilon sampling (Hewitt et al. 2022): no token below probability epsilon, but the best one
        probs = logits.float().softmax(dim=-1)
        logits = logits.masked_fill((probs < epsilon) & (probs < probs.amax(dim=-1, keepdim=True)), -torch.inf)
    return logits


def _fill_gaps(done: set[int], n: int) -> list[int]:
    """Of rows 0..n-1, those not done, as a reorder index that leaves each of them where it is, except the last
    ones, which move into the gaps that the done rows leave: a state copies only the rows that move."""
    live = n - len(done)
    movers = (row for row in range(live, n) if row not in done)
    return [next(movers) if row in done else row for row in range(live)]


def _stay_with_parent(parent: Tensor) -> Tensor:
    """For K children per sentence with parent beams `parent` (n, K), an order of the children (n, K) that puts
    each parent's first child in the parent's own place and the other children in the places of parents that
    have none. A beam's cached rows then move only when its parent has several children."""
    n, K = parent.shape
    children = torch.arange(K, device=parent.device).expand(n, K)
    first_child = torch.full_like(parent, K).scatter_reduce_(1, parent, children, "amin")  # per place; K: none
    first_born = first_child.gather(1, parent) == children
    # Places with a child, by their first child, then the childless places; children likewise: the first-born,
    # then the others. The r-th child goes to the r-th place.
    places = first_child.sort(dim=1, stable=True).indices
    ranked = first_born.sort(dim=1, descending=True, stable=True).indices
    return torch.empty_like(parent).scatter_(1, places, ranked)


def _must_end(t: int, limits: list[int], first_limit: int, rows: list[int], width: int,
              device: torch.device) -> Tensor | None:
    """Which rows must end at step t: those whose sentence (rows[i], `width` rows each) has reached its limit.
    None, with no device work, before the first limit is reached."""
    if t < first_limit:
        return None
    return torch.tensor([t >= limits[s] for s in rows], device=device).repeat_interleave(width)


def _generate(step: StepFn, state: State, prefix: Tensor, max_len: int | Tensor, eos: int,
              choose: Callable[[Tensor, Tensor | None, bool], Tensor], min_len: int) -> list[list[int]]:
    """choose(logits, must_end, may_end) -> the next token of each row."""
    B, device = prefix.size(0), prefix.device
    limits = _as_lengths(max_len, B, device).tolist()
    tokens = prefix
    first_limit = min(limits)
    alive = list(range(B))  # original index of each row still generating
    out: list[list[int]] = [[] for _ in range(B)]
    generated = []
    for t in range(max(limits) + 1):
        nxt = choose(step(tokens, state), _must_end(t, limits, first_limit, alive, 1, device), t >= min_len)  # (n,)
        generated.append((alive, nxt))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        ended = set((nxt == eos).nonzero().squeeze(1).tolist())
        if len(ended) == len(alive):
            break
        if ended:
            keep = _fill_gaps(ended, len(alive))
            alive, index = [alive[row] for row in keep], torch.tensor(keep, device=device)
            tokens = tokens[index]
            state.reorder(index, sentences=keep)
    for rows, nxt in generated:  # one host transfer per step, after the loop
        for row, token in zip(rows, nxt.tolist()):
            if token != eos:
                out[row].append(token)
    return out


def greedy(step: StepFn, state: State, prefix: Tensor, max_len: int | Tensor, eos: int,
           banned: Sequence[int] = (), min_len: int = 0) -> list[list[int]]:
    """The most probable next token at every step."""
    excluded = _exclusions(eos, banned, prefix.device)

    def choose(logits: Tensor, must_end: Tensor | None, may_end: bool) -> Tensor:
        return _best_allowed(logits, 1, eos, excluded[may_end], must_end)[1][:, 0]

    return _generate(step, state, prefix, max_len, eos, choose, min_len)


def sample(step: StepFn, state: State, prefix: Tensor, max_len: int | Tensor, eos: int,
           banned: Sequence[int] = (), min_len: int = 0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, epsilon: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Ancestral sampling with temperature, top-k, nucleus (top-p) and epsilon filtering; `generator` seeds it."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive (use greedy for temperature 0)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1]")
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon={epsilon} must lie in [0, 1)")

    def choose(logits: Tensor, must_end: Tensor | None, may_end: bool) -> Tensor:
        allowed = _restrict(logits, eos, banned, must_end, may_end)
        probs = _filter_logits(allowed, temperature, top_k, top_p, epsilon).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _generate(step, state, prefix, max_len, eos, choose, min_len)


def beam_search(step: StepFn, state: State, prefix: Tensor, max_len: int | Tensor, eos: int,
                beam_size: int = 4, alpha: float = 0.6, lp_form: str = "gnmt", nbest: int = 1,
                banned: Sequence[int] = (), min_len: int = 0, stop: str = "early") -> list[list[Hypothesis]]:
    """Batched beam search (fairseq's mechanics): each step ranks 2*beam candidates per sentence, ends the
    EOS candidates among the best `beam` as hypotheses scored by log-probability / length penalty, and
    continues with the best `beam` others. stop='early': a sentence is done once it holds `beam` hypotheses
    (fairseq). stop='optimal': it goes on, keeping the best `beam`, until no live beam can still beat the worst
    of them at any length it may reach (tensor2tensor, the paper's search; log-probabilities only fall).
    Returns, per sentence, the `nbest` best hypotheses, best first."""
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest={nbest} must lie between 1 and beam_size={beam_size}")
    if stop not in ("early", "optimal"):
        raise ValueError(f"stop={stop!r}: expected 'early' or 'optimal'")
    B, K, device = prefix.size(0), beam_size, prefix.device
    limits = _as_lengths(max_len, B, device).tolist()
    first_limit = min(limits)
    excluded = _exclusions(eos, banned, device)
    tokens = prefix  # (n * width, T): a sentence's beams start as one row, so the first step runs once per sentence
    scores = torch.zeros(B, 1, device=device)  # (n, width)
    sentences = list(range(B))  # original index of each sentence still searching
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    start = prefix.size(1)
    for t in range(max(limits) + 1):
        n, width = scores.shape
        logits = step(tokens, state)
        # The best 2K candidates of a sentence lie among the best 2K of each of its beams: rank only those,
        # and normalise only those (log p = logit - log normaliser).
        must_end = _must_end(t, limits, first_limit, sentences, width, device)
        beam_logits, beam_tokens, row_max = _best_allowed(logits, 2 * K, eos, excluded[t >= min_len], must_end,
                                                          ranked=False)
        log_normaliser = _log_normaliser(logits, row_max)
        per_beam = beam_logits.size(1)
        candidates = (scores.view(-1, 1) + (beam_logits - log_normaliser)).view(n, width * per_beam)
        top, index = candidates.topk(2 * K, dim=1)
        beam, token = index // per_beam, beam_tokens.view(n, width * per_beam).gather(1, index)
        is_eos = token == eos

        # EOS among the best K ends a hypothesis: the search's one host sync per step, unless sentences finish.
        i, j = (is_eos[:, :K] & (top[:, :K] > -torch.inf)).nonzero(as_tuple=True)
        done = set()
        if i.numel():
            penalty = length_penalty(t + 1, alpha, lp_form)
            rows = i * width + beam[i, j]
            for row, seq, score in zip(i.tolist(), tokens[rows, start:].tolist(), (top[i, j] / penalty).tolist()):
                hyps = finished[sentences[row]]
                if len(hyps) < K:
                    hyps.append(Hypothesis(seq, score))
                    if len(hyps) == K and stop == "early":
                        done.add(row)
                else:  # optimal: a better hypothesis takes the worst one's place
                    worst = min(range(K), key=lambda h: hyps[h].score)
                    if score > hyps[worst].score:
                        hyps[worst] = Hypothesis(seq, score)
        if stop == "optimal" and any(len(finished[s]) == K for s in sentences):
            # The best a live beam can still reach: its log-probability over the largest penalty ahead of it.
            best_live = top.masked_fill(is_eos, -torch.inf).amax(dim=1).tolist()
            for row, s in enumerate(sentences):
                hyps = finished[s]
                if len(hyps) == K:
                    reachable = max(length_penalty(t + 2, alpha, lp_form), length_penalty(limits[s] + 1, alpha, lp_form))
                    if best_live[row] / reachable <= min(h.score for h in hyps):
                        done.add(row)
        if must_end is not None:
            done.update(row for row, s in enumerate(sentences) if t >= limits[s])
        if len(done) == n:
            break

        # Continue with the best K candidates that are not EOS (with a real vocabulary there are at least K
        # among 2K; where there are not, a candidate scored -inf fills the place, so that it never competes).
        keep = is_eos.sort(dim=1, stable=True).indices[:, :K]
        if width == K and getattr(state, "sparse_reorder", True):  # each continuation in its beam's row where it
            keep = keep.gather(1, _stay_with_parent(beam.gather(1, keep)))  # can: few cache rows move
        scores, token = top.masked_fill(is_eos, -torch.inf).gather(1, keep), token.gather(1, keep)
        rows = (beam.gather(1, keep) + torch.arange(0, n * width, width, device=device)[:, None]).view(-1)
        tokens = torch.cat([tokens[rows], token.view(-1, 1)], dim=1)
        kept = range(n)
        if done:  # drop finished sentences from the batch
            kept = _fill_gaps(done, n)
            sentences, live = [sentences[s] for s in kept], torch.tensor(kept, device=device)
            scores = scores[live]
            live_rows = (live[:, None] * K + torch.arange(K, device=device)).view(-1)
            tokens, rows = tokens[live_rows], rows[live_rows]
        state.reorder(rows, group=K, sentences=kept)
    for hyps in finished:
        hyps.sort(key=lambda h: h.score, reverse=True)
    return [hyps[:nbest] for hyps in finished]


# -- Ensembles and forced prefixes: step functions made from step functions --------------------------------------

class EnsembleState:
    """The states of several models decoding together: reordered together."""

    def __init__(self, states: Sequence[State]):
        self.states = list(states)
        self.sparse_reorder = all(getattr(s, "sparse_reorder", True) for s in self.states)

    def reorder(self, index: Tensor, group: int = 1, sentences: Sequence[int] | None = None) -> None:
        for state in self.states:
            state.reorder(index, group, sentences)


def ensemble(steps: Sequence[StepFn]) -> StepFn:
    """One step function for several models over an EnsembleState: the mean of their next-token
    log-probabilities (as OpenNMT-py and Marian combine ensembles; the searches renormalise it, which makes it
    the normalised geometric mean of the models' distributions)."""
    def step(tokens: Tensor, state: EnsembleState) -> Tensor:
        total = None
        for model_step, model_state in zip(steps, state.states):
            lprobs = torch.log_softmax(model_step(tokens, model_state).float(), dim=-1)
            total = lprobs if total is None else total.add_(lprobs)
        return total.div_(len(steps))
    return step


class ForcedState:
    """A state whose rows must start their output with given tokens: `forced` (N, P), -1 where a row's prefix has
    ended; `start` is the length of the step's input before the first output token. Rows follow reorders."""

    def __init__(self, state: State, forced: Tensor, start: int):
        self.inner, self.forced, self.start = state, forced, start
        self.sparse_reorder = getattr(state, "sparse_reorder", True)

    def reorder(self, index: Tensor, group: int = 1, sentences: Sequence[int] | None = None) -> None:
        self.inner.reorder(index, group, sentences)
        self.forced = self.forced.index_select(0, index)


def forced_prefix(step: StepFn) -> StepFn:
    """A step function over a ForcedState whose rows produce their forced token while they have one (every other
    token -inf: greedy, sampling and beam search all take it, at probability one), then follow `step`. Scores
    thus count the continuation only, the same for every hypothesis of a sentence's prefix."""
    def forced_step(tokens: Tensor, state: ForcedState) -> Tensor:
        logits = step(tokens, state.inner)
        t = tokens.size(1) - state.start
        if t >= state.forced.size(1):
            return logits
        token = state.forced[:, t]
        rows = token >= 0
        only = torch.full_like(logits, -torch.inf).scatter_(1, token.clamp(min=0)[:, None],
                                                            logits.gather(1, token.clamp(min=0)[:, None]))
        return torch.where(rows[:, None], only, logits)
    return forced_step


# -- Speculative decoding, batched: draft heads or a draft model ---------------------------------------------

@dataclass
class SpeculationStats:
    passes: int = 0  # forward passes (verifying proposals, or plain steps above max_rows), summed over sentences
    tokens: int = 0  # tokens those passes produced (EOS included)
    proposed: int = 0  # draft proposals put to the model
    accepted: int = 0  # of which the model kept

    def add(self, other: SpeculationStats) -> None:
        for name in ("passes", "tokens", "proposed", "accepted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / max(self.passes, 1)


class DraftModel:
    """A proposer for self_speculative from a separate, smaller model on the same vocabulary: it drafts K tokens
    after the model's token, one step each, with its own state (which offers reorder and reject as DecodeState
    does). It also feeds its last proposal, so that its state holds every token the model may keep."""

    def __init__(self, feed: Callable[[Tensor, State], Tensor], logits: Callable[[Tensor], Tensor], state, prefix: Tensor,
                 k: int):
        self.feed, self.logits, self.state, self.k = feed, logits, state, k
        self.fed = 0  # positions fed in the last round
        feed(prefix, state)

    def __call__(self, h: Tensor, token: Tensor, choose) -> tuple[Tensor, Tensor]:
        x, proposals, q = token[:, None], [], []
        for _ in range(self.k):
            proposal, lprobs = choose(self.logits(self.feed(x, self.state)[:, -1]))
            proposals.append(proposal)
            q.append(lprobs)
            x = proposal[:, None]
        self.feed(x, self.state)
        self.fed = self.k + 1
        return torch.stack(proposals, dim=1), torch.stack(q, dim=1)

    def skip(self, token: Tensor) -> None:
        """A round without proposals: the draft only reads the model's token."""
        self.feed(token[:, None], self.state)
        self.fed = 1

    def update(self, kept: Sequence[int]) -> None:
        """kept: proposals the model kept per row; the draft forgets the others."""
        self.state.reject([n + 1 for n in kept], self.fed)

    def reorder(self, index: Tensor) -> None:
        self.state.reorder(index, sentences=index.tolist())


def _at(t: Tensor, index: Sequence[int]) -> Tensor:
    """t[i, index[i]] for each row i of t (n, T, ...): a plain slice where every row has the same index (one
    sentence at a time, always), which spares building index tensors."""
    if len(set(index)) == 1:
        return t[:, index[0]]
    return t[torch.arange(t.size(0), device=t.device), torch.tensor(index, device=t.device)]


def self_speculative(feed: Callable[[Tensor, State], Tensor], main: Callable[[Tensor], Tensor], propose, state,
                     prefix: Tensor, max_len: int | Tensor, eos: int, banned: Sequence[int] = (),
                     sampling: dict | None = None, generator: torch.Generator | None = None,
                     max_rows: int | None = None) -> tuple[list[list[int]], SpeculationStats]:
    """Batched speculative decoding (Leviathan et al., 2023), with the model's own draft heads proposing (Medusa's
    scheme: propose=model.draft) or a separate draft model (propose=DraftModel(...)).
    feed(new (N, T), state) -> hidden states (N, T, C) after those the state holds; main(h) -> next-token logits
    (..., V), a fresh tensor (it is overwritten); propose(h, token, choose) -> K proposals (n, K) after the
    model's next `token`, and their log-probabilities (n, K, V), where `choose` turns fresh logits into (tokens,
    log-probabilities); a proposer may offer update(kept), reorder(index) and skip(token) (a round without
    proposals). `state` must offer reorder and reject(kept, fed) (see DecodeState).
    Each round feeds every row its main token and the K proposals in one pass; each row keeps the longest run of
    proposals the model agrees with (rows keep different numbers), plus the model's own next token. Greedy
    (sampling=None) gives exactly greedy()'s output; with sampling (temperature, top_k, top_p, epsilon) every kept token
    follows the model's filtered distribution (a proposal x is kept with probability min(1, p(x) / q(x)), else
    the next token is drawn from max(0, p - q)).
    Rounds propose only while at most `max_rows` rows are unfinished (None: always); until then they are plain
    steps. A pass over K + 1 tokens a row costs about K + 1 steps' arithmetic, which a large batch pays in full,
    whereas a small one is bound by the per-step overhead (vLLM likewise turns speculation off above a batch size)."""
    B, device = prefix.size(0), prefix.device
    limits = _as_lengths(max_len, B, device).tolist()
    banned = torch.tensor(list(banned), dtype=torch.long, device=device)
    stats = SpeculationStats()

    def distribution(logits: Tensor) -> Tensor:  # (..., V) -> log-probabilities, banned tokens excluded
        logits = logits.float()
        if banned.numel():  # in place: main and the proposer return fresh tensors (a copy took ~7% of a pass
            logits.index_fill_(-1, banned, -torch.inf)  # one sentence at a time, in torch's profiler)
        if sampling is None:
            return logits  # greedy reads only the argmax: normalising would not change it
        shape = logits.shape
        logits = _filter_logits(logits.reshape(-1, shape[-1]), sampling.get("temperature", 1.0),
                                sampling.get("top_k", 0), sampling.get("top_p", 1.0),
                                sampling.get("epsilon", 0.0)).view(shape)
        return torch.log_softmax(logits, dim=-1)

    def pick(lprobs: Tensor) -> Tensor:  # (n, V) -> (n,)
        if sampling is None:
            return lprobs.argmax(dim=-1)
        return torch.multinomial(lprobs.exp(), 1, generator=generator).squeeze(1)

    def choose(logits: Tensor) -> tuple[Tensor, Tensor]:  # (..., V) -> tokens (...), log-probabilities (..., V)
        lprobs = distribution(logits)
        return pick(lprobs.reshape(-1, lprobs.size(-1))).view(lprobs.shape[:-1]), lprobs

    def proposals_after(h: Tensor, token: Tensor) -> tuple[Tensor, Tensor | None]:
        if max_rows is None or h.size(0) <= max_rows:
            return propose(h, token, choose)
        if hasattr(propose, "skip"):
            propose.skip(token)
        return token.new_empty(h.size(0), 0), None

    def finished() -> set[int]:  # rows that end: at EOS, or holding their limit (EOS would be forced next)
        return {i for i, row in enumerate(alive) if out[row] and out[row][-1] == eos or len(out[row]) >= limits[row]}

    def drop(ended: set[int]) -> Tensor:  # the rows kept; the last rows fill the gaps, so few cache rows move
        keep = _fill_gaps(ended, len(alive))
        index = torch.tensor(keep, device=device)
        state.reorder(index, sentences=keep)
        if hasattr(propose, "reorder"):
            propose.reorder(index)
        alive[:] = [alive[i] for i in keep]
        return index

    h = feed(prefix, state)[:, -1]
    token = pick(distribution(main(h)))
    proposals, q = proposals_after(h, token)
    alive = list(range(B))  # original index of each row
    out: list[list[int]] = [[] for _ in range(B)]
    while True:
        # The model's own token is kept (EOS where the row is at its limit).
        for row, t in zip(alive, token.tolist()):
            out[row].append(t if len(out[row]) < limits[row] else eos)
        stats.tokens += len(alive)
        ended = finished()
        if ended:
            if len(ended) == len(alive):
                break
            index = drop(ended)
            token, proposals, q = token[index], proposals[index], None if q is None else q[index]
        K = proposals.size(1)
        h = feed(torch.cat([token[:, None], proposals], dim=1), state)  # (n, K + 1, C)
        p = distribution(main(h))  # (n, K + 1, V): p[:, j] follows the main token and the first j proposals
        stats.passes += len(alive)
        best = p.argmax(dim=-1) if sampling is None else None  # (n, K + 1)
        kept = [0] * len(alive)  # proposals each row keeps
        if K:
            if sampling is None:
                agree = best[:, :K] == proposals
            else:
                ratio = (p[:, :K].gather(2, proposals[..., None]) - q.gather(2, proposals[..., None])).squeeze(2).exp()
                agree = torch.rand(ratio.shape, generator=generator, device=device) < ratio
            # A row keeps its leading run of agreed proposals, up to EOS and within its limit (on the host: in
            # tensors this took a dozen small operations a pass).
            for i, (row, agreed, proposed) in enumerate(zip(alive, agree.tolist(), proposals.tolist())):
                room, n = min(K, limits[row] - len(out[row])), 0
                while n < room and agreed[n]:
                    n += 1
                    if proposed[n - 1] == eos:
                        break
                out[row].extend(proposed[:n])
                kept[i] = n
            stats.proposed += K * len(alive)
            stats.accepted += sum(kept)
            stats.tokens += sum(kept)
        state.reject([n + 1 for n in kept], K + 1)
        if hasattr(propose, "update"):
            propose.update(kept)
        h_next = _at(h, kept)  # after the last kept token
        if sampling is None:
            token = _at(best, kept)
        else:
            p_next = _at(p, kept)
            if any(n < K for n in kept):  # where a proposal was refused, the next token comes from what q under-covers
                refused = torch.tensor([n < K for n in kept], device=device)
                q_at = _at(q, [min(n, K - 1) for n in kept])
                residual = (p_next.exp() - q_at.exp()).clamp(min=0)
                usable = refused & (residual.sum(dim=-1) > 0)
                p_next = torch.where(usable[:, None], (residual / residual.sum(dim=-1, keepdim=True).clamp(min=1e-30)).log(),
                                     p_next)
            token = pick(p_next)
        ended = finished()
        if ended:  # finished by an accepted EOS or at the limit: their next token is not taken
            if len(ended) == len(alive):
                break
            index = drop(ended)
            token, h_next = token[index], h_next[index]
        proposals, q = proposals_after(h_next, token)
    for tokens in out:
        if tokens and tokens[-1] == eos:
            tokens.pop()
    return out, stats
