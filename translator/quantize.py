"""int8 inference on CPU: PyTorch's dynamic quantization of the linear layers.

Weights are stored as int8 (one scale per output row); each call quantizes its input on the fly, multiplies in int8
with fbgemm (x86) or qnnpack (ARM) kernels and returns float32. This is the established PyTorch path for
Transformer inference on CPU and needs no calibration data. The output projection is quantized too (it is
about 40% of a decoding step's multiply-adds in a base model with an 8k vocabulary); where it is tied to the
embeddings, it gets an int8 copy and the embedding lookups keep the float32 table.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .model import MultiHeadAttention


def _rows(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    part = nn.Linear(linear.in_features, stop - start)
    with torch.no_grad():
        part.weight.copy_(linear.weight[start:stop])
        part.bias.copy_(linear.bias[start:stop])
    return part


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize every linear layer of a model (in place, CPU, for inference) and return it. Cross-attention
    uses the query rows and the key/value rows of its [W_Q; W_K; W_V] on different inputs, so they become two
    layers first; the full matrix is dropped."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 (dynamic quantization) runs on the CPU; pass --device cpu")
    for module in model.modules():
        if isinstance(module, MultiHeadAttention) and module.cross and module.query_proj is None:
            d = module.out.in_features
            module.query_proj, module.memory_proj = _rows(module.qkv, 0, d), _rows(module.qkv, d, 3 * d)
            del module.qkv
    if model.output is None:  # tied: an untied int8 copy for the projection, the float32 table for lookups
        model.output = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
        with torch.no_grad():
            model.output.weight.copy_(model.tgt_embed.token.weight)
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it works as documented
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # One scale per output row, as CTranslate2 quantizes: the same speed as one per matrix, closer to float32.
        return quantize_dynamic(model.eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
