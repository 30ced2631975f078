"""A tiny Transformer learns to reverse sequences on CPU: the whole model, trained end to end."""

import pytest
import torch
import torch.nn.functional as F

from translator import ModelConfig, build_model
from translator.decoding import beam_search, greedy

PAD, BOS, EOS, VOCAB, MAX_LEN = 0, 1, 2, 14, 8


def reverse_batch(n, generator):
    lengths = torch.randint(3, MAX_LEN + 1, (n,), generator=generator)
    src = torch.full((n, MAX_LEN), PAD)
    tgt_in = torch.full((n, MAX_LEN + 1), PAD)
    tgt_out = torch.full((n, MAX_LEN + 1), PAD)
    for i, length in enumerate(lengths.tolist()):
        seq = torch.randint(4, VOCAB, (length,), generator=generator)
        src[i, :length] = seq
        tgt_in[i, 0], tgt_in[i, 1:length + 1] = BOS, seq.flip(0)
        tgt_out[i, :length], tgt_out[i, length] = seq.flip(0), EOS
    return src, tgt_in, tgt_out


@pytest.mark.slow
def test_tiny_model_learns_to_reverse():
    cfg = ModelConfig.from_name("tiny", vocab_size=VOCAB, d_model=64, d_ff=128, n_heads=4)
    model = build_model(cfg)
    steps, warmup, lr = 800, 100, 1.5e-3
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup)))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        src, tgt_in, tgt_out = reverse_batch(64, g)
        loss = F.cross_entropy(model(src, tgt_in).view(-1, VOCAB), tgt_out.view(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()

    model.eval()
    src, _, tgt_out = reverse_batch(500, torch.Generator().manual_seed(99))  # unseen sequences
    reference = [[t for t in row if t not in (PAD, EOS)] for row in tgt_out.tolist()]
    prefix = torch.full((500, 1), BOS)
    by_greedy = greedy(model.step, model.start(src), prefix, MAX_LEN + 4, EOS, banned=(PAD, BOS))
    by_beam = [h[0].tokens for h in beam_search(model.step, model.start(src), prefix, MAX_LEN + 4, EOS,
                                                  beam_size=4, banned=(PAD, BOS))]
    greedy_acc = sum(a == b for a, b in zip(by_greedy, reference)) / 500
    beam_acc = sum(a == b for a, b in zip(by_beam, reference)) / 500
    assert greedy_acc >= 0.99 and beam_acc >= 0.99, (greedy_acc, beam_acc)
