"""Encoder-decoder T5 for the built-in backend: relative position bias, cross-attention, relu or gated-gelu FF.

Reuses ``runner.model``'s ``Attention`` (no RoPE, scale 1, additive bias mask), ``FeedForward`` and ``RMSNorm``
(T5's LayerNorm is an RMSNorm). Decoding follows the decoder-only API, plus ``encode``:

- ``encode(ids, seq_lens, rows)`` runs the encoder and stores every decoder layer's cross-attention K/V in the
  cache rows (``cache.cross_k``, ``cache.cross_lengths``);
- ``prefill(ids, seq_lens, rows)`` / ``decode(ids, rows)`` run the decoder on those rows, as ``Transformer`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exegpt.errors import ExeGPTError
from runner.kv_cache import KVCache, as_rows, row_index
from runner.linear import Linear
from runner.model import Attention, FeedForward, ModelArgs, RMSNorm, TransformerBlock
from runner.step import Step


def relative_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position ``key - query`` (Mesh TensorFlow's scheme, as in HF)."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class CrossAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wkv = Linear(args.dim, 2 * args.n_heads * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def project_kv(self, enc: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output ``[n, S_src, dim]`` → K, V ``[n, H, S_src, D]``."""
        n, S, _ = enc.shape
        k, v = self.wkv(enc).view(n, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [2, n, H, S, D]
        return k, v

    def forward(self, x: Tensor, step: Step, cache: KVCache, layer: int) -> Tensor:
        n, S, _ = x.shape  # [n, S, dim]
        H, D = self.n_heads, self.head_dim
        q = self.wq(x).view(n, S, H, D).transpose(1, 2)  # [n, H, S, D]
        k = cache.cross_k[layer, step.rows, :, :step.cross_len]  # [n, H, S_src, D]
        v = cache.cross_v[layer, step.rows, :, :step.cross_len]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.cross_mask, scale=1.0)  # [n, H, S, D]
        return self.wo(y.transpose(1, 2).reshape(n, S, H * D))  # [n, S, dim]


class T5DecoderBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm, self.cross_norm, self.ffn_norm = (RMSNorm(args.dim, args.norm_eps) for _ in range(3))
        self.attention = Attention(args)
        self.attention.scale = 1.0  # T5 folds 1/sqrt(d) into its initialization
        self.cross_attention = CrossAttention(args)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, step: Step, cache: KVCache, layer: int) -> Tensor:
        h = x + self.attention(self.attention_norm(x), step, cache, layer)
        h = h + self.cross_attention(self.cross_norm(h), step, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class T5(nn.Module):
    """A whole T5 model (encoder + decoder + LM head); the token embedding is shared."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.family != "t5" or args.n_encoder_layers < 1:
            raise ExeGPTError(f"T5 needs family 't5' with encoder layers, got {args.family!r}")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.encoder_layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_encoder_layers)})
        for block in self.encoder_layers.values():
            block.attention.scale = 1.0
        self.encoder_bias = nn.Embedding(args.rel_buckets, args.n_heads)
        self.encoder_norm = RMSNorm(args.dim, args.norm_eps)
        self.layers = nn.ModuleDict({str(i): T5DecoderBlock(args) for i in range(args.n_layers)})
        self.decoder_bias = nn.Embedding(args.rel_buckets, args.n_heads)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.decoder_start_id = 0  # T5's pad token starts every decoder sequence
        self.cache: KVCache | None = None
        self.tp_rank, self.tp_size = 0, 1

    def tie_weights(self) -> None:
        if self.args.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight

    embed = head = True  # whole model: the pipeline code asks every stage these

    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        p = self.tok_embeddings.weight
        return p.dtype, p.device

    def setup_cache(self, max_rows: int, max_len: int, max_src_len: int | None = None) -> KVCache:
        """Preallocates decoder self-attention KV (``max_len``) and cross-attention KV (``max_src_len`` input
        tokens, default ``max_len``) for ``max_rows`` rows (idempotent)."""
        dtype, device = self._dtype_device()
        a = self.args
        geometry = (a.n_layers, max_rows, max_len, a.n_heads, a.head_dim, dtype, device)
        cross_len = max_src_len or max_len
        if self.cache is None or not self.cache.matches(*geometry, cross_len=cross_len):
            self.cache = KVCache(*geometry, cross_len=cross_len, n_cross_heads=a.n_heads)
        return self.cache

    def _cache(self) -> KVCache:
        if self.cache is None:
            raise ExeGPTError("no KV cache: call model.setup_cache(max_rows, max_len, max_src_len) first")
        return self.cache

    def _bias(self, table: nn.Embedding, rel: Tensor, bidirectional: bool) -> Tensor:
        """Position bias ``[..., H, q, k]`` from relative positions ``rel`` ``[..., q, k]``."""
        b = table(relative_bucket(rel, bidirectional, self.args.rel_buckets, self.args.rel_max_distance))
        return b.movedim(-1, -3)  # [..., q, k, H] -> [..., H, q, k]

    def _pad(self, x: Tensor, seq_lens: Tensor, max_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """Packed ids ``[T]`` → padded ids ``[n, S]``, valid ``[n, S]`` (CPU) and valid on the device."""
        n, S = seq_lens.numel(), int(seq_lens.max())
        if S > max_len or int(seq_lens.min()) < 1:
            raise ExeGPTError(f"sequence lengths must be in [1, {max_len}], got {seq_lens.tolist()}")
        valid = torch.arange(S)[None, :] < seq_lens[:, None]  # [n, S]
        valid_d = valid.to(x.device)
        return x.new_zeros(n, S).index_put_((valid_d,), x), valid, valid_d

    def _cross(self, rows: Tensor, device: torch.device) -> tuple[Tensor | None, int]:
        src = self.cache.cross_lengths[rows]  # [n]
        L = int(src.max())
        if L < 1:
            raise ExeGPTError("decoder rows have no encoder output: call encode() for them first")
        mask = None if int(src.min()) == L else (torch.arange(L)[None] < src[:, None])[:, None, None].to(device)
        return mask, L

    @torch.no_grad()
    def encode(self, x: Tensor, seq_lens: Tensor | list[int], rows: Tensor | list[int]) -> Tensor:
        """Encodes packed input ids ``x`` ``[T]`` and stores the cross-attention K/V of cache rows ``rows``.

        Returns:
            the encoder output ``[T, dim]``.
        """
        cache = self._cache()
        seq_lens, rows = as_rows(seq_lens), as_rows(rows)
        ids, valid, valid_d = self._pad(x, seq_lens, cache.cross_len)  # [n, S]
        S, device = ids.shape[1], ids.device
        pos = torch.arange(S, device=device)
        bias = self._bias(self.encoder_bias, pos[None, :] - pos[:, None], bidirectional=True)[None]  # [1, H, S, S]
        mask = bias.masked_fill(~valid_d[:, None, None, :], float("-inf"))  # [n, H, S, S]
        step = Step(rows=None, decode=False, mask=mask)
        h = self.tok_embeddings(ids)  # [n, S, dim]
        for i, layer in enumerate(self.encoder_layers.values()):
            h = layer(h, step, None, i)
        h = self.encoder_norm(h)
        r = row_index(rows, device)
        for i, layer in enumerate(self.layers.values()):
            cache.write_cross(i, r, *layer.cross_attention.project_kv(h))
        cache.cross_lengths[rows] = seq_lens
        return h[valid_d]  # [T, dim]

    def _run_decoder(self, h: Tensor, step: Step) -> Tensor:
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, step, self.cache, i)
        return h

    def _logits(self, h: Tensor) -> Tensor:
        return self.output(self.norm(h) * self.args.output_scale).float()  # [n, vocab]

    @torch.no_grad()
    def prefill(self, x: Tensor, seq_lens: Tensor | list[int], rows: Tensor | list[int]) -> Tensor:
        """Runs packed decoder prompts ``[T]`` (usually one start token each) from position 0 on encoded rows.

        Returns:
            float32 logits of each prompt's last token ``[n, vocab]``.
        """
        cache = self._cache()
        seq_lens, rows = as_rows(seq_lens), as_rows(rows)
        ids, valid, valid_d = self._pad(x, seq_lens, cache.max_len)
        n, S = ids.shape
        device = ids.device
        pos = torch.arange(S, device=device)
        bias = self._bias(self.decoder_bias, pos[None, :] - pos[:, None], bidirectional=False)[None]  # [1,H,S,S]
        allowed = torch.ones(S, S, dtype=torch.bool).tril()[None] & valid[:, None, :]  # [n, S, S]
        mask = bias.masked_fill(~allowed[:, None].to(device), float("-inf"))  # [n, H, S, S]
        cross_mask, cross_len = self._cross(rows, device)
        step = Step(rows=row_index(rows, device), decode=False, mask=mask, cross_mask=cross_mask,
                    cross_len=cross_len)
        h = self._run_decoder(self.tok_embeddings(ids), step)  # [n, S, dim]
        cache.lengths[rows] = seq_lens
        return self._logits(h[torch.arange(n, device=device), (seq_lens - 1).to(device)])

    @torch.no_grad()
    def decode(self, x: Tensor, rows: Tensor | list[int]) -> Tensor:
        """Advances decoder rows ``rows`` by one token ``x`` ``[n]`` each; float32 logits ``[n, vocab]``."""
        cache = self._cache()
        rows = as_rows(rows)
        pos = cache.lengths[rows]  # [n]
        kv_len = int(pos.max()) + 1
        if kv_len > cache.max_len:
            raise ExeGPTError(f"decode past the cache: position {kv_len - 1} >= max_len={cache.max_len}")
        device = x.device
        pos_d = pos.to(device)
        keys = torch.arange(kv_len, device=device)
        bias = self._bias(self.decoder_bias, (keys[None, :] - pos_d[:, None])[:, None], bidirectional=False)
        mask = bias.masked_fill((keys[None, :] > pos_d[:, None])[:, None, None], float("-inf"))  # [n, H, 1, kv]
        cross_mask, cross_len = self._cross(rows, device)
        step = Step(rows=row_index(rows, device), decode=True, pos=pos_d, kv_len=kv_len, mask=mask,
                    cross_mask=cross_mask, cross_len=cross_len)
        h = self._run_decoder(self.tok_embeddings(x)[:, None], step)[:, 0]  # [n, dim]
        cache.lengths[rows] += 1
        return self._logits(h)
