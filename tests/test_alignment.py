"""Word alignments from cross-attention: piece-to-word mapping, and the links a trained model gives on tasks
whose true alignment is known (copy: the diagonal; reverse: the anti-diagonal)."""

import pytest
import torch
import torch.nn.functional as F

from translator import ModelConfig, build_model
from translator.alignment import cross_attention, pharaoh, token_links, word_of_piece

PAD, BOS, EOS, VOCAB, MAX_LEN = 0, 1, 2, 14, 8


def test_pieces_map_to_whitespace_words():
    assert word_of_piece(["▁a", "b", "▁c", "▁", ",", "d"]) == [0, 0, 1, 2, 2, 2]
    assert word_of_piece(["x", "▁y"]) == [0, 1]  # a first piece without '▁' still starts word 0


def test_pharaoh_links_words_from_token_attention():
    # Source words: "▁New", "▁York" + "er" -> 0, 1, 1; target: "▁Die", "▁New", "▁Yorker" -> 0, 1, 2.
    src, tgt = ["▁New", "▁York", "er"], ["▁Die", "▁New", "▁Yorker"]
    weights = torch.tensor([[0.1, 0.6, 0.2, 0.1],  # Die -> York (token 1)
                            [0.7, 0.1, 0.1, 0.1],  # New -> New
                            [0.1, 0.1, 0.2, 0.6],  # Yorker -> source EOS (left out), then 'er' (token 2)
                            [0.0, 0.0, 0.0, 1.0]])  # the EOS step: not a target token
    assert token_links(weights) == [(1, 0), (0, 1), (2, 2)]
    assert pharaoh(token_links(weights), src, tgt) == "0-1 1-0 1-2"
    assert token_links(torch.ones(1, 3)) == []  # an empty output has no links


def _task_batch(n, generator, reverse):
    lengths = torch.randint(3, MAX_LEN + 1, (n,), generator=generator)
    sources, outputs = [], []
    for length in lengths.tolist():
        seq = torch.randint(4, VOCAB, (length,), generator=generator).tolist()
        sources.append(seq)
        outputs.append(seq[::-1] if reverse else seq)
    return sources, outputs


def _train(reverse: bool, steps: int = 400):
    """A tiny model trained on copy or reverse. For reverse, the encoder's self-attention is held at zero: an
    encoder free to pass tokens between positions learns to fetch each from a neighbour found relative to the
    end, and attention then points there, not at the token copied (the limit of attention-based alignment that
    guided alignment training addresses)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=VOCAB, d_model=64, d_ff=128, n_heads=4,
                                n_encoder_layers=1 if reverse else 2)
    model = build_model(cfg)
    if reverse:
        out = model.encoder.blocks[0].self_attn.out
        torch.nn.init.zeros_(out.weight)
        torch.nn.init.zeros_(out.bias)
        out.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1.5e-3, betas=(0.9, 0.98),
                                 eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / 100, (steps - s) / (steps - 100)))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        sources, outputs = _task_batch(64, g, reverse)
        src = torch.tensor([s + [EOS] + [PAD] * (MAX_LEN - len(s)) for s in sources])
        tgt_in = torch.tensor([[BOS] + o + [PAD] * (MAX_LEN - len(o)) for o in outputs])
        tgt_out = torch.tensor([o + [EOS] + [PAD] * (MAX_LEN - len(o)) for o in outputs])
        loss = F.cross_entropy(model(src, tgt_in).view(-1, VOCAB), tgt_out.view(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@pytest.mark.slow
def test_copy_task_aligns_on_the_diagonal():
    model = _train(reverse=False)
    sources, outputs = _task_batch(200, torch.Generator().manual_seed(5), reverse=False)
    # layer -1: the first layer of a two-layer decoder, the default's penultimate, is still finding positions.
    links = [token_links(w) for w in cross_attention(model, sources, outputs, layer=-1)]
    on_diagonal = sum(i == j for sentence in links for i, j in sentence) / sum(map(len, outputs))
    assert all(len(sentence) == len(o) for sentence, o in zip(links, outputs))
    assert on_diagonal >= 0.95, on_diagonal


@pytest.mark.slow
def test_reverse_task_aligns_on_the_anti_diagonal():
    model = _train(reverse=True)
    sources, outputs = _task_batch(200, torch.Generator().manual_seed(5), reverse=True)
    links = [token_links(w) for w in cross_attention(model, sources, outputs, layer=-1)]
    offsets = [i - (len(s) - 1 - j) for s, sentence in zip(sources, links) for i, j in sentence]
    near = sum(0 <= d <= 2 for d in offsets) / len(offsets)
    exact = sum(d == 0 for d in offsets) / len(offsets)
    correlation = torch.stack([torch.corrcoef(torch.tensor(sentence, dtype=torch.float).T)[0, 1]
                               for sentence in links]).mean()
    assert near >= 0.95 and exact >= 0.4 and correlation <= -0.9, (near, exact, float(correlation))
