"""Batch plans from length arrays, and collation: what training reads from a store."""

import copy

import numpy as np
import pytest
import torch

from translator.batching import TokenBatches, token_batches
from translator.data import BOS_ID, EOS_ID, PAD_ID
from translator.store import Pairs


def synthetic(n=500, seed=0):
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, 50, rng.integers(1, 30)).tolist() for _ in range(n)]
    tgt = [rng.integers(4, 50, rng.integers(1, 30)).tolist() for _ in range(n)]
    return Pairs.of(src, tgt), src, tgt


def test_batches_respect_max_tokens_and_cover_every_pair_once():
    data, _, _ = synthetic()
    loader = TokenBatches(data, max_tokens=200, shuffle=True, seed=3)
    seen = []
    for indices in loader.batches(0):
        batch = loader.collate(indices)
        B, S = batch["src"].shape
        T = batch["tgt_in"].shape[1]
        assert B * max(S, T) <= 200 and "index" not in batch  # the corpus line is for evaluation batches
        seen.extend(indices.tolist())
    assert sorted(seen) == list(range(500))
    evaluation = TokenBatches(data, max_tokens=200, shuffle=False)
    assert sorted(i for b in evaluation for i in b["index"].tolist()) == list(range(500))


def test_batch_contents_teacher_forcing_layout():
    data, src, tgt = synthetic(20)
    batch = TokenBatches(data, max_tokens=10_000, shuffle=False).collate(np.array([3, 7]))
    for row, i in enumerate([3, 7]):
        s, t = src[i], tgt[i]
        assert batch["src"][row, :len(s) + 1].tolist() == s + [EOS_ID]
        assert batch["tgt_in"][row, :len(t) + 1].tolist() == [BOS_ID] + t
        assert batch["tgt_out"][row, :len(t) + 1].tolist() == t + [EOS_ID]
        assert (batch["src"][row, len(s) + 1:] == PAD_ID).all() and (batch["tgt_out"][row, len(t) + 1:] == PAD_ID).all()
    assert batch["ntokens"] == len(tgt[3]) + len(tgt[7]) + 2


def test_decoder_only_batches_hold_source_and_target_in_one_sequence():
    data, src, tgt = synthetic(20)
    batch = TokenBatches(data, max_tokens=10_000, shuffle=False, joint=True).collate(np.array([4, 9]))
    for row, i in enumerate([4, 9]):
        s, t = src[i], tgt[i]
        n = len(s) + len(t) + 2
        assert batch["tgt_in"][row, :n].tolist() == [BOS_ID] + s + [EOS_ID] + t
        assert batch["tgt_out"][row, :n].tolist() == [PAD_ID] * (len(s) + 1) + t + [EOS_ID]
        assert (batch["tgt_in"][row, n:] == PAD_ID).all() and batch["prefix_len"][row] == len(s) + 2
    assert batch["ntokens"] == len(tgt[4]) + len(tgt[9]) + 2


def test_sentences_of_similar_length_share_a_batch():
    data, _, _ = synthetic(2000)
    loader = TokenBatches(data, max_tokens=400, shuffle=True)
    real = sum(loader.tgt_lens) + sum(loader.src_lens)
    padded = sum(b["src"].numel() + b["tgt_in"].numel() for b in loader)
    assert real / padded > 0.85  # random batching would waste about half


def test_shuffling_is_seeded_and_changes_per_epoch():
    data, _, _ = synthetic()
    order = lambda seed, epoch: [b.tolist() for b in TokenBatches(data, 200, True, seed=seed).batches(epoch)]
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


def test_resuming_mid_epoch_yields_the_remaining_batches():
    data, _, _ = synthetic()
    loader = TokenBatches(data, 200, True, seed=5)
    epoch0 = [b["src"].tolist() for b in loader]
    epoch1 = [(b["position"], b["src"].tolist()) for b in loader]  # a finished pass advances the epoch
    assert epoch1[0][0] == (1, 0) and [x for _, x in epoch1] != epoch0
    loader.resume_at = (0, 7)
    resumed = [(b["position"], b["src"].tolist()) for b in loader]
    assert resumed[0][0] == (0, 7) and [x for _, x in resumed] == epoch0[7:]
    assert [b["position"] for b in loader][0] == (1, 0)  # then the next epoch, from its start
    loader.resume_at = (0, len(epoch0))  # stopped right at the end of epoch 0
    assert [b["position"] for b in loader][0] == (1, 0)


def test_ranks_take_disjoint_equal_shares():
    data, _, _ = synthetic()
    shards = [[b.tolist() for b in TokenBatches(data, 200, True, seed=1, rank=r, world=3).batches(0)] for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat))


def reference_token_batches(src_lens, tgt_lens, max_tokens, order):
    """The batching rule one sentence at a time: what token_batches computes a batch at a time."""
    batches, start, longest = [], 0, 0
    lengths = np.maximum(src_lens, tgt_lens)[order]
    for i, n in enumerate(lengths):
        if i > start and max(longest, n) * (i - start + 1) > max_tokens:
            batches.append(order[start:i])
            start, longest = i, 0
        longest = max(longest, n)
    batches.append(order[start:])
    return batches


def test_batch_plans_equal_the_sentence_by_sentence_rule():
    rng = np.random.default_rng(0)
    for max_tokens in (20, 200, 4096):
        src, tgt = rng.integers(1, 120, 3000), rng.integers(1, 120, 3000)
        order = rng.permutation(3000)
        ours = token_batches(src, tgt, max_tokens, order)
        assert [b.tolist() for b in ours] == [b.tolist() for b in reference_token_batches(src, tgt, max_tokens, order)]
    assert [b.tolist() for b in token_batches(np.array([5, 50, 5]), np.array([5, 50, 5]), 20, np.arange(3))] == \
        [[0], [1], [2]]  # a sentence longer than max_tokens gets its own batch


def test_workers_collate_the_same_batches_in_the_same_order_and_resume():
    from translator.batching import Prefetched

    data, _, _ = synthetic()
    plain = TokenBatches(data, 200, True, seed=5)
    expected = [(b["position"], b["src"].tolist()) for _ in range(2) for b in plain]  # two epochs
    for workers in (1, 2):
        prefetched = Prefetched(TokenBatches(data, 200, True, seed=5), workers)
        got = [(b["position"], b["src"].tolist()) for _ in range(2) for b in prefetched]
        assert got == expected and len(prefetched) == len(plain.batches(0))
    resumed = TokenBatches(data, 200, True, seed=5)
    resumed.resume_at = expected[7][0]
    got = [(b["position"], b["src"].tolist()) for b in Prefetched(resumed, 2)]
    assert got == [x for x in expected if x[0][0] == 0][7:]


def test_a_consumer_that_takes_exactly_len_batches_still_gets_a_new_shuffle_each_epoch():
    """Lightning knows the length and stops after the last batch without asking for another: the next pass
    must still be the next epoch (the epoch used to advance only when the iterator was exhausted, so every
    epoch of training repeated the first one's order)."""
    import itertools

    data, _, _ = synthetic()
    loader = TokenBatches(data, 200, True, seed=5)
    passes = [[b["position"] for b in itertools.islice(iter(loader), len(loader))] for _ in range(3)]
    assert [{epoch for epoch, _ in p} for p in passes] == [{0}, {1}, {2}]
    from translator.batching import Prefetched

    prefetched = Prefetched(TokenBatches(data, 200, True, seed=5), 2)
    passes = [[b["position"] for b in itertools.islice(iter(prefetched), len(prefetched))] for _ in range(2)]
    assert [{epoch for epoch, _ in p} for p in passes] == [{0}, {1}]


# -- Subword regularization: training batches segmented anew, seeded by position -----------------------------

def _sampled_loaders(tmp_path, *overrides):
    """Training and validation loader factories over a store of the toy corpus, with the recipe's overrides."""
    from tests.conftest import TOY_RECIPE, write_toy_corpus
    from translator.config import load_recipe
    from translator.store import open_store, prepare
    from translator.training import _loaders

    data_dir = tmp_path / "data"
    if not (tmp_path / "store").exists():
        write_toy_corpus(data_dir, n_train=600, n_valid=50)
        (tmp_path / "toy.yaml").write_text(TOY_RECIPE)
    recipe = load_recipe(tmp_path / "toy.yaml", ["train.max_tokens=400", *overrides])
    if not (tmp_path / "store").exists():
        prepare(recipe, data_dir, tmp_path / "store")
    store = open_store(tmp_path / "store", recipe, data_dir)
    return _loaders(recipe, store), store


def _texts(tokenizer, rows):
    return tokenizer.decode([[t for t in row if t not in (PAD_ID, BOS_ID, EOS_ID)] for row in rows])


def test_sampling_resegments_training_batches_only_and_keeps_their_text(tmp_path):
    from translator.data import Tokenizer

    (make_train, make_valid, _), store = _sampled_loaders(tmp_path)
    (make_sampled, make_valid_too, _), _ = _sampled_loaders(tmp_path, "tokenizer.sampling={alpha: 0.3}")
    tokenizer, pairs = Tokenizer(store.tokenizer_file), store.pairs("train")
    loader = make_sampled(0, 1)
    changed = total = 0
    for b in loader:
        epoch, index = b["position"]
        indices = loader.batches(epoch)[index]
        for key, side in (("src", pairs.src), ("tgt_out", pairs.tgt)):
            stored = [side[i].tolist() for i in indices]
            assert _texts(tokenizer, b[key].tolist()) == tokenizer.decode(stored)  # the same sentences, in order
            rows = [[t for t in r if t not in (PAD_ID, EOS_ID)] for r in b[key].tolist()]
            changed += sum(x != y for x, y in zip(rows, stored))
            total += len(rows)
        assert b["ntokens"] == int((b["tgt_out"] != PAD_ID).sum())
        assert torch.equal(b["tgt_in"][:, 1:][b["tgt_out"][:, 1:] != PAD_ID], b["tgt_out"][b["tgt_out"] != PAD_ID][
            ~(b["tgt_out"] == EOS_ID)[b["tgt_out"] != PAD_ID]])  # inputs are the outputs shifted
        assert len(b["src"]) * max(b["src"].shape[1], b["tgt_out"].shape[1]) <= 400  # within max_tokens, as planned
    assert sorted(i for batch in loader.batches(0) for i in batch.tolist()) == list(range(len(pairs)))
    assert changed > 0.5 * total, (changed, total)
    assert len(loader.batches(0)) > len(make_train(0, 1).batches(0))  # planned for longer sentences: fewer per batch
    joint = TokenBatches(pairs, 400, True, seed=1, joint=True, sampling=loader.sampling)  # decoder-only: one sequence
    for b in joint:
        indices = joint.batches(0)[b["position"][1]]
        assert b["tgt_in"].numel() <= 400
        assert _texts(tokenizer, b["src"].tolist()) == tokenizer.decode([pairs.src[i].tolist() for i in indices])
        targets = [[t for t, keep in zip(row, mask) if keep] for row, mask in
                   zip(b["tgt_out"].tolist(), (torch.arange(b["tgt_out"].shape[1]) >= b["prefix_len"][:, None] - 1).tolist())]
        assert _texts(tokenizer, targets) == tokenizer.decode([pairs.tgt[i].tolist() for i in indices])
    # Validation keeps the deterministic segmentation.
    for a, b in zip(make_valid(0, 1), make_valid_too(0, 1)):
        assert torch.equal(a["src"], b["src"]) and torch.equal(a["tgt_out"], b["tgt_out"])
    with pytest.raises(ValueError, match="for training batches"):
        TokenBatches(store.pairs("valid"), 400, False, sampling=make_sampled(0, 1).sampling)


def test_sampled_batches_follow_the_seed_and_resume_exactly_in_workers(tmp_path):
    from translator.batching import Prefetched

    (make_sampled, _, _), _ = _sampled_loaders(tmp_path, "tokenizer.sampling={alpha: 0.3}")
    first = make_sampled(0, 1)
    expected = [(b["position"], b["src"].tolist(), b["tgt_out"].tolist()) for _ in range(2) for b in first]
    second = make_sampled(0, 1)
    again = [(b["position"], b["src"].tolist(), b["tgt_out"].tolist()) for _ in range(2) for b in second]
    assert again == expected
    # The same batch in the next epoch, or under another seed, is sampled anew.
    other_seed = make_sampled(0, 1)
    other_seed.sampling = copy.copy(other_seed.sampling)
    other_seed.sampling.seed += 1
    epoch0 = [x for x in expected if x[0][0] == 0]
    other = [(b["position"], b["src"].tolist(), b["tgt_out"].tolist()) for b in other_seed]
    assert sum(x[1] != y[1] for x, y in zip(epoch0, other)) > 0.5 * len(epoch0)
    # Resumed mid-epoch, in two worker processes: the same batches from there on.
    resumed = make_sampled(0, 1)
    resumed.resume_at = epoch0[5][0]
    got = [(b["position"], b["src"].tolist(), b["tgt_out"].tolist()) for b in Prefetched(resumed, 2)]
    assert got == epoch0[5:]


def test_sampling_settings_are_checked():
    from translator.config import ConfigError, Recipe

    for bad in ({"alpha": 0}, {"alpha": 1.5}, {"alpha": 0.1, "nbest": 0}, {"alpha": 0.1, "best": 3}, {"nbest": 5}):
        with pytest.raises(ConfigError, match="tokenizer.sampling"):
            Recipe.from_dict({"tokenizer": {"sampling": bad}})
    Recipe.from_dict({"tokenizer": {"sampling": {"alpha": 0.1, "nbest": 64}}})
