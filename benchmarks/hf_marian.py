"""The same network in Hugging Face transformers (translator.export.to_marian), for side-by-side speed
measurements on identical work, and a check that the two compute the same function."""

from __future__ import annotations

import torch

from translator.export import marian_config, to_marian  # noqa: F401  (the weight mapping lives with the exports)


@torch.no_grad()
def check_same_function(model, hf, src: torch.Tensor, tgt: torch.Tensor) -> float:
    """Max abs difference of the two models' logits on one batch: the comparison is only fair if this is ~0."""
    ours = model(src, tgt)
    theirs = hf(input_ids=src, attention_mask=(src != model.cfg.pad_id).long(), decoder_input_ids=tgt).logits
    return float((ours - theirs).abs().max())
