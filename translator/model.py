"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), and its decoder-only sibling.

Read top-down: positions -> attention -> feed-forward -> Block -> Stack -> EncoderDecoder / DecoderOnly.
One `Block` serves all three stacks: the encoder (bidirectional self-attention), the decoder (causal
self-attention + cross-attention) and the decoder-only model (causal self-attention, no cross-attention).

Incremental decoding keeps past keys/values in a `DecodeState` (cache.py) that the caller owns and passes in, in
buffers that grow in place; beam search reorders it, copying only the rows that change. Nothing is cached
inside the modules, so training and inference run the same code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KV, DecodeState, KVCache
from .config import ModelConfig



def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))  (Section 3.5)."""
    position = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    frequency = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.float()


class _CpuDropout(torch.autograd.Function):
    """Dropout whose masks come four per 64-bit random draw. PyTorch's CPU generator spends one draw per
    element, which made dropout a third of a small model's training step on a 2-core CPU. Each element is
    kept with probability 1 - p, quantised to 1/65536, and scaled by 1 / (1 - p), as nn.Dropout does."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        n = x.numel()
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        uniform16 = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
        keep = uniform16 >= round(p * 65536) - 32768
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class Dropout(nn.Dropout):
    """nn.Dropout, with a faster mask on CPU (see _CpuDropout); CUDA uses the native kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x  # not even a dispatch: decoding steps are short of host time on a GPU
        if x.device.type != "cpu":
            return super().forward(x)
        return _CpuDropout.apply(x, self.p)


class MultiHeadAttention(nn.Module):
    """h heads of scaled dot-product attention (Section 3.2), as self-attention or as cross-attention to
    the encoder's memory. Q, K and V projections are stacked in one matrix so that self-attention needs
    one matmul; cross-attention uses its query rows on x and its key/value rows on the memory."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, cross: bool = False):
        super().__init__()
        self.cross = cross
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)  # [W_Q; W_K; W_V]
        self.out = nn.Linear(d_model, d_model)  # W_O
        # Cross-attention's two projections as modules of their own, where set (int8: see quantize.py).
        self.query_proj: nn.Module | None = None
        self.memory_proj: nn.Module | None = None

    def _heads(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, H, T, C/H)
        B, T, C = x.shape
        return x.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)

    def memory_kv(self, memory: Tensor) -> KV:
        """Keys and values of the encoder output: computed once per sentence when decoding."""
        if self.memory_proj is not None:
            k, v = self.memory_proj(memory).chunk(2, dim=-1)
        else:
            d = memory.size(-1)
            k, v = F.linear(memory, self.qkv.weight[d:], self.qkv.bias[d:]).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def query(self, x: Tensor) -> Tensor:
        """Cross-attention's queries of x: (B, H, T, C/H)."""
        if self.query_proj is not None:
            return self._heads(self.query_proj(x))
        C = x.size(-1)
        return self._heads(F.linear(x, self.qkv.weight[:C], self.qkv.bias[:C]))

    def probabilities(self, x: Tensor, memory: Tensor, mask: Tensor | None = None) -> Tensor:
        """Cross-attention's weights, (B, H, T, S), for word alignments: the fused kernel that decoding uses does
        not return them."""
        q, (k, _) = self.query(x), self.memory_kv(memory)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        if mask is not None:
            scores = scores.masked_fill(~mask, -torch.inf)
        return scores.softmax(dim=-1)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False,
                memory: Tensor | None = None, past: KVCache | KV | None = None) -> tuple[Tensor, KV]:
        """x: (B, T, C). mask: bool, broadcastable to (B, H, T, S), True where attending is allowed.
        past: for self-attention the cache of earlier positions' keys/values (the new ones are appended to
        it); for cross-attention the memory's keys/values (reused as they are). Returns the output (B, T, C)
        and the keys/values attended to."""
        B, T, C = x.shape
        if not self.cross:
            qkv = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(0, 2, 3, 1, 4)  # (B, 3, H, T, C/H)
            q, k, v = qkv.unbind(1)
            if past is not None:
                k, v = past.append(qkv[:, 1:])
        else:
            q = self.query(x)
            k, v = past if past is not None else self.memory_kv(memory)
        # Beam search keeps the memory once per sentence: the sentence's rows (beams) become more queries.
        group = B // k.size(0)
        if group > 1:
            q = q.view(k.size(0), group, self.n_heads, T, -1).transpose(1, 2).reshape(k.size(0), self.n_heads, group * T, -1)
        dropout = self.dropout if self.training else 0.0
        if not dropout and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU flash attention (no dropout) runs its backward 3-4x slower in bf16 than in float32, while bf16
            # matmuls gain ~2x: under autocast the projections take bf16 and attention float32.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        if group > 1:
            y = y.view(k.size(0), self.n_heads, group, T, -1).transpose(1, 2).reshape(B, self.n_heads, T, -1)
        return self.out(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2  (Section 3.3); GELU as a switch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)
        self.activation = nn.ReLU(inplace=True) if cfg.activation == "relu" else nn.GELU()  # up's output serves nothing else
        self.dropout = Dropout(cfg.activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(self.activation(self.up(x))))


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each wrapped in a residual connection
    and LayerNorm: post-norm LN(x + Dropout(f(x))) as in the paper, or pre-norm x + Dropout(f(LN(x)))."""

    def __init__(self, cfg: ModelConfig, cross_attention: bool):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model)
        self.cross_attn = (MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, cross=True)
                           if cross_attention else None)
        self.cross_attn_norm = nn.LayerNorm(cfg.d_model) if cross_attention else None
        self.ff = FeedForward(cfg)
        self.ff_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = Dropout(cfg.dropout)

    def _input(self, x: Tensor, norm: nn.Module) -> Tensor:
        return norm(x) if self.norm_first else x

    def _residual(self, x: Tensor, y: Tensor, norm: nn.Module) -> Tensor:
        return x + self.dropout(y) if self.norm_first else norm(x + self.dropout(y))

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False,
                memory: Tensor | None = None, memory_mask: Tensor | None = None,
                cache: KVCache | None = None, memory_kv: KV | None = None) -> tuple[Tensor, KV | None]:
        """When decoding, `cache` holds the self-attention keys/values of earlier positions and `memory_kv` the
        cross-attention ones of the memory, once computed. Returns x and the memory's keys/values."""
        y, _ = self.self_attn(self._input(x, self.self_attn_norm), mask, causal, past=cache)
        x = self._residual(x, y, self.self_attn_norm)
        if self.cross_attn is not None:
            y, memory_kv = self.cross_attn(self._input(x, self.cross_attn_norm), memory_mask, memory=memory, past=memory_kv)
            x = self._residual(x, y, self.cross_attn_norm)
        x = self._residual(x, self.ff(self._input(x, self.ff_norm)), self.ff_norm)
        return x, memory_kv


class Stack(nn.Module):
    """N identical Blocks; pre-norm adds the final LayerNorm (post-norm outputs are normalised already)."""

    def __init__(self, cfg: ModelConfig, n_layers: int, cross_attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, cross_attention) for _ in range(n_layers))
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False,
                memory: Tensor | None = None, memory_mask: Tensor | None = None,
                state: DecodeState | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            cache, memory_kv = state.kv[i] if state is not None else (None, None)
            x, memory_kv = block(x, mask, causal, memory, memory_mask, cache, memory_kv)
            if state is not None:
                state.kv[i] = (cache, memory_kv)
        return self.norm(x)


class Embedding(nn.Module):
    """Token embedding times sqrt(d_model), plus sinusoidal positions, then dropout (Sections 3.4, 3.5, 5.4). With
    word_dropout, training also zeroes whole tokens' embeddings (the positions stay)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, token: nn.Embedding | None = None):
        super().__init__()
        self.token = token if token is not None else nn.Embedding(vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.scale = math.sqrt(cfg.d_model)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False)
        self.dropout = Dropout(cfg.dropout)
        self.word_dropout = Dropout(cfg.word_dropout)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, end: int | None = None) -> Tensor:
        """tokens: (B, T); positions: (T,) or (B, T), default 0..T-1, all below `end`. Returns (B, T, C)."""
        end = tokens.size(1) if end is None else end
        if end > self.positions.size(0):  # checked on sizes, not values: no host sync per step
            raise ValueError(f"sequence of {end} positions but max_positions is {self.positions.size(0)}; "
                             "truncate the input or raise max_positions")
        if positions is None:
            positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.token(tokens) * self.scale
        if self.word_dropout.training and self.word_dropout.p:  # one mask entry per token, over all its features
            x = x * self.word_dropout(x.new_ones(*tokens.shape, 1))
        return self.dropout(x + self.positions[positions])


class DraftHead(nn.Module):
    """A draft head for self-speculative decoding (Medusa, Cai et al. 2024): a residual feed-forward on the last
    hidden state, h + SiLU(W h), read out through the model's own output projection. Head k proposes the token k
    positions after the one the main head predicts. Chained (Hydra, Ankner et al. 2024), W also reads the
    embedding of the token proposed before head k's, and h is head k-1's state: h + SiLU(W [h; e]). W starts at
    zero, so a new head starts as the main head."""

    def __init__(self, d_model: int, chain: bool = False):
        super().__init__()
        self.proj = nn.Linear(2 * d_model if chain else d_model, d_model)

    def forward(self, h: Tensor, previous: Tensor | None = None) -> Tensor:
        return h + F.silu(self.proj(h if previous is None else torch.cat([h, previous], dim=-1)))


class _Seq2SeqBase(nn.Module):
    """What both models share: weight init, the output projection, and the incremental step function."""

    cfg: ModelConfig
    tgt_embed: Embedding
    output: nn.Linear | None

    draft_heads: nn.ModuleList

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.cfg.d_model ** -0.5)
                nn.init.zeros_(module.weight[self.cfg.pad_id])
        for head in self.draft_heads:
            nn.init.zeros_(head.proj.weight)

    def draft_logits(self, h: Tensor, k: int | None = None) -> Tensor:
        """The (parallel) draft heads' logits for hidden states h (..., C), (..., K, V): head k's (k = 1..K, the
        first `k` heads, default all) predict the token k positions after the main head's. One output projection
        for all heads: in small batches its cost is reading the (V, C) matrix, once rather than K times."""
        return self.logits(torch.stack([head(h) for head in self.draft_heads[:k]], dim=-2))

    def draft_states(self, h: Tensor, targets: Tensor) -> list[Tensor]:
        """Teacher-forced states of the draft heads for training: head k's (B, T - k, C) at positions i < T - k,
        whose logits predict targets[:, i + k] (targets (B, T): what the main head predicts at each position).
        Heads beyond the sequence's length get none."""
        states, g = [], h
        for k, head in enumerate(self.draft_heads, 1):
            n = h.size(1) - k
            if n <= 0:
                break
            if self.cfg.draft_chain:  # head k reads head k-1's state and the token at offset k-1
                g = head(g[:, :n], self.tgt_embed.token(targets[:, k - 1:k - 1 + n]) * self.tgt_embed.scale)
            else:
                g = head(h[:, :n])
            states.append(g)
        return states

    def draft(self, h: Tensor, token: Tensor, choose, k: int | None = None) -> tuple[Tensor, Tensor]:
        """The proposals of the first `k` heads (default all) after the main head's `token` (n,) at hidden states
        h (n, C): tokens (n, k) and their log-probabilities (n, k, V), by choose(logits) -> (tokens,
        log-probabilities). Parallel heads propose in one output projection, chained heads one after another."""
        if not self.cfg.draft_chain:
            return choose(self.draft_logits(h, k))
        g, previous, tokens, lprobs = h, token, [], []
        for head in self.draft_heads[:k]:
            g = head(g, self.tgt_embed.token(previous) * self.tgt_embed.scale)
            previous, q = choose(self.logits(g))
            tokens.append(previous)
            lprobs.append(q)
        return torch.stack(tokens, dim=1), torch.stack(lprobs, dim=1)

    @property
    def output_weight(self) -> Tensor:  # (V, C): the target embedding when tied (Section 3.4)
        return self.tgt_embed.token.weight if self.output is None else self.output.weight

    def logits(self, h: Tensor) -> Tensor:
        if self.output is not None and not isinstance(self.output, nn.Linear):
            return self.output(h)  # a quantized projection (quantize.py)
        return F.linear(h, self.output_weight)

    @torch.no_grad()
    def step(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """The step function for decoding: tokens (N, T) are all tokens so far; the ones the state has
        not seen yet are fed. Returns the logits of the next token, (N, V). With state.reuse_logits, on CPU,
        they are written into a buffer of the state that the next step overwrites (for callers that read
        them at once, as the decoding functions do): a fresh (N, V) tensor each step cost about a sixth of the
        projection's time in new memory pages. GPU allocators reuse memory already."""
        h = self.hidden(tokens[:, state.length:], state)[:, -1]
        if (not state.reuse_logits or h.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                or not (self.output is None or isinstance(self.output, nn.Linear))):
            return self.logits(h)
        weight = self.output_weight
        size = h.size(0) * weight.size(0)
        if state.logits is None or state.logits.numel() < size or state.logits.dtype != h.dtype:
            state.logits = h.new_empty(size)
        return torch.mm(h, weight.t(), out=state.logits[:size].view(h.size(0), weight.size(0)))

    def decode_incremental(self, new: Tensor, state: DecodeState) -> Tensor:
        """Feed the new tokens (N, T) after those the state holds; returns their logits (N, T, V)."""
        return self.logits(self.hidden(new, state))

    def hidden(self, new: Tensor, state: DecodeState) -> Tensor:
        raise NotImplementedError


class EncoderDecoder(_Seq2SeqBase):
    """The 2017 Transformer: encoder and decoder stacks joined by cross-attention (Figure 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is not set (it comes from the tokenizer)")
        self.cfg = cfg
        self.src_embed = Embedding(cfg, cfg.source_vocab_size)
        self.tgt_embed = Embedding(cfg, cfg.vocab_size, self.src_embed.token if cfg.share_embeddings else None)
        self.encoder = Stack(cfg, cfg.n_encoder_layers, cross_attention=False)
        self.decoder = Stack(cfg, cfg.n_decoder_layers, cross_attention=True)
        self.output = None if cfg.tie_output else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.draft_heads = nn.ModuleList(DraftHead(cfg.d_model, cfg.draft_chain) for _ in range(cfg.draft_heads))
        self._init_weights()

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src: (B, S) token ids, padded with pad_id. Returns memory (B, S, C) and its mask (B, 1, 1, S)."""
        src_mask = (src != self.cfg.pad_id)[:, None, None, :]
        return self.encoder(self.src_embed(src), src_mask), src_mask

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Teacher-forced decoding: tgt (B, T) starts with BOS. Returns the decoder's output (B, T, C).
        Padding sits at the end of tgt, so the causal mask alone keeps real positions off it."""
        return self.decoder(self.tgt_embed(tgt), None, True, memory, memory_mask)

    def states(self, src: Tensor, tgt: Tensor) -> Tensor:
        """The decoder's last hidden states (B, T, C), teacher-forced: what the output projection (and the draft
        heads) read."""
        memory, memory_mask = self.encode(src)
        return self.decode(tgt, memory, memory_mask)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Logits (B, T, V) of the next target token at every position."""
        return self.logits(self.states(src, tgt))

    @torch.no_grad()
    def start(self, src: Tensor) -> DecodeState:
        """Encode src once and return an empty decoding state for it."""
        memory, memory_mask = self.encode(src)
        return DecodeState(kv=[(KVCache(), None) for _ in self.decoder.blocks], memory=memory, memory_mask=memory_mask)

    def hidden(self, new: Tensor, state: DecodeState) -> Tensor:
        """The decoder's output for the new tokens (N, T) after those the state holds."""
        x = self.tgt_embed(new, state.positions(new), end=state.end(new))
        h = self.decoder(x, state.attention_mask(new), False, state.memory, state.memory_mask, state)
        state.advance(new.size(1))
        state.memory = None  # its keys/values are cached in every layer now
        return h


class DecoderOnly(_Seq2SeqBase):
    """A language model from the same Block: causal self-attention, no cross-attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is not set (it comes from the tokenizer)")
        self.cfg = cfg
        self.tgt_embed = Embedding(cfg, cfg.vocab_size)
        self.decoder = Stack(cfg, cfg.n_decoder_layers, cross_attention=False)
        self.output = None if cfg.tie_output else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.draft_heads = nn.ModuleList(DraftHead(cfg.d_model, cfg.draft_chain) for _ in range(cfg.draft_heads))
        self._init_weights()

    def states(self, tokens: Tensor, prefix_len: Tensor | None = None) -> Tensor:
        """tokens: (B, T), right-padded. prefix_len (B,): positions that attend bidirectionally among
        themselves (a prefix LM over the source); None: fully causal. Returns the last hidden states (B, T, C)."""
        if prefix_len is None:
            return self.decoder(self.tgt_embed(tokens), None, True)
        idx = torch.arange(tokens.size(1), device=tokens.device)
        causal = idx[None, :] <= idx[:, None]  # (T, T)
        in_prefix = idx[None, :] < prefix_len[:, None]  # (B, T): key inside the prefix
        mask = (causal[None] | (in_prefix[:, None, :] & in_prefix[:, :, None]))[:, None]
        return self.decoder(self.tgt_embed(tokens), mask, False)

    def forward(self, tokens: Tensor, prefix_len: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) of the next token at every position (see states)."""
        return self.logits(self.states(tokens, prefix_len))

    @torch.no_grad()
    def start(self, prompt: Tensor | None = None) -> DecodeState:
        """An empty state; `prompt` (B, T) may be left-padded with pad_id, which is then masked out."""
        pad_len = None
        if prompt is not None:
            is_pad = prompt == self.cfg.pad_id
            pad_len = is_pad.long().cumprod(dim=1).sum(dim=1)  # leading pads per row
            if not bool(pad_len.any()):
                pad_len = None
        return DecodeState(kv=[(KVCache(), None) for _ in self.decoder.blocks], pad_len=pad_len)

    def hidden(self, new: Tensor, state: DecodeState) -> Tensor:
        """The stack's output for the new tokens (N, T) after those the state holds."""
        x = self.tgt_embed(new, state.positions(new), end=state.end(new))
        prompt = self.cfg.prefix_lm and state.length == 0  # a prefix LM reads its prompt (the source) both ways
        h = self.decoder(x, state.attention_mask(new, bidirectional=prompt), False, state=state)
        state.advance(new.size(1))
        return h


def build_model(cfg: ModelConfig) -> EncoderDecoder | DecoderOnly:
    _choose_attention_kernels()
    return EncoderDecoder(cfg) if cfg.arch == "encoder_decoder" else DecoderOnly(cfg)


def _choose_attention_kernels() -> None:
    """Process-wide, as PyTorch has no per-call switch short of a context manager around every attention call.
    Measured on an H100 (bf16, Multi30k batches of 25k tokens, benchmarks/profile_train_step.py):
    - cuDNN attention, PyTorch's first choice on Hopper, builds a plan for every new (batch, length) shape: a
      transformer_base step took 1254 ms on unseen shapes and 50 ms on seen ones, and batching by tokens
      makes new shapes all the time.
    - flash attention's backward took 1.64 ms per call on these short sentences against 0.47 ms for the
      memory-efficient kernel's: a transformer_big step took 90 ms with flash for causal self-attention and
      82 ms without. The memory-efficient kernel remains (and math, for what it cannot take).
    The flash switch also governs the CPU's flash kernel (else the slower math one runs), so it is flipped only
    where CUDA is present."""
    torch.backends.cuda.enable_cudnn_sdp(False)
    if torch.cuda.is_available():
        torch.backends.cuda.enable_flash_sdp(False)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters: a matrix shared by several modules counts once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
