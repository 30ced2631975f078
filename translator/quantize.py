"""Inference forms of a trained model on the CPU: int8 linear layers, or float32 ones prepacked for oneDNN.

int8: PyTorch's dynamic quantization. Weights are stored as int8 (one scale per output row); each call quantizes
its input on the fly, multiplies in int8 with fbgemm (x86) or qnnpack (ARM) kernels and returns float32. This is
the established PyTorch path for Transformer inference on CPU and needs no calibration data.

prepacked: the same float32 weights, reordered once into oneDNN's blocked layout and multiplied by oneDNN, the
kernel torch.compile's CPU backend emits for frozen weights. PyTorch's eager float32 linear calls MKL's sgemm,
which on some x86 CPUs (measured on AMD EPYC) takes about twice as long for 2-16 rows as for one: the row
counts of decoding (a beam, a speculative pass). Results equal float32's up to summation order.

Both forms cover the output projection (about 40% of a decoding step's multiply-adds in a base model with an 8k
vocabulary); where it is tied to the embeddings, it gets a copy and the embedding lookups keep the float32 table.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .model import MultiHeadAttention


def _rows(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    part = nn.Linear(linear.in_features, stop - start)
    with torch.no_grad():
        part.weight.copy_(linear.weight[start:stop])
        part.bias.copy_(linear.bias[start:stop])
    return part


def _linear_modules(model: nn.Module) -> nn.Module:
    """Make every product with a weight an nn.Linear of its own (in place, CPU, eval mode). Cross-attention uses
    the query rows and the key/value rows of its [W_Q; W_K; W_V] on different inputs, so they become two layers
    (the full matrix is dropped); a tied output projection gets an untied copy."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 and prepacked linear layers run on the CPU; pass --device cpu")
    for module in model.modules():
        if isinstance(module, MultiHeadAttention) and module.cross and module.query_proj is None:
            d = module.out.in_features
            module.query_proj, module.memory_proj = _rows(module.qkv, 0, d), _rows(module.qkv, d, 3 * d)
            del module.qkv
    if model.output is None:
        model.output = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
        with torch.no_grad():
            model.output.weight.copy_(model.tgt_embed.token.weight)
    return model.eval()


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize every linear layer of a model (in place, CPU, for inference) and return it."""
    _linear_modules(model)
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it works as documented
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # One scale per output row, as CTranslate2 quantizes: the same speed as one per matrix, closer to float32.
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


class PrepackedLinear(nn.Module):
    """A frozen float32 linear layer whose weight oneDNN has reordered once into its blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def prepack(model: nn.Module) -> nn.Module:
    """Prepack every linear layer of a model for oneDNN (in place, CPU, for inference) and return it."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        raise ValueError("prepacked linear layers need PyTorch built with oneDNN (mkldnn), which this one is not")
    _linear_modules(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PrepackedLinear(child))
    return model
