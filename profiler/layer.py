"""One rank's shard of one decoder layer, built from the runner's own modules, split into timeable regions.

What is measured is what runs: the layer is ``runner.model.TransformerBlock`` built by ``runner.weights.load_model``
(one layer, no embedding, no head) and sharded by ``runner.tp.apply_tp`` for rank 0 of a group of ``tp``. Every
rank of a TP group holds a shard of the same size, so rank 0's time is every rank's. There is no process group
here: after sharding, the attention and feed-forward modules are told they form a group of one, which makes their
``all_reduce`` a no-op; the all-reduce is timed separately (``profiler.collectives``), as vidur does.

The layer forward (``TransformerBlock.forward`` -> ``Attention.forward``) splits into two regions whose sum is the
layer:

- **attention core** (``attn_encode(batch, seq)``, ``attn_decode(batch, context)``): the KV-cache update
  (``KVCache.write_prompt`` / ``KVCache.append``) and ``runner.model.attend`` (SDPA, or grouped matmuls for
  half-precision CPU decode) over the cache, exactly the calls ``Attention.forward`` makes. This is the part whose
  cost depends on the sequence length.
- **the rest** (``dense_encode(tokens)``, ``dense_decode(tokens)``): the two norms, the fused ``wqkv`` projection,
  the head reshapes, RoPE, the ``wo`` projection, the feed-forward module and both residual adds. Its cost depends
  only on the number of tokens.

The per-call setup the model does once for all its layers (building the attention mask and slicing the RoPE
tables, the ``Step``) is not per layer; it is part of ``step_overhead_s`` (``profiler.sweep``).

Workloads mirror the runner's real batches:

- encode: ``batch`` prompts padded to ``seq`` tokens. With several prompts one is a token shorter, so the runner's
  ragged path runs (an explicit causal-and-padding mask, as ``Transformer._prefill`` builds it); a single prompt
  (or ``seq`` 1) takes the ``is_causal`` path, as in the runner.
- decode: ``batch`` rows whose positions are staggered (row ``i`` at ``context - 1 - i`` clipped at 0), so the
  longest row attends to ``context`` keys and the runner's masked path runs, as it does in ExeGPT's mixed decode
  batches; a single row takes the unmasked path. Where the decode core is fused (``own_prefix_decode``: each row
  attends its own prefix, whatever the others' lengths) every row sits at ``context``, so the point costs ``batch``
  rows of ``context`` keys, what the cost model asks it for at a batch's mean context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from exegpt.errors import ExeGPTError
from runner import cpu_kernels
from runner.kv_cache import KVCache
from runner.model import OPT_POS_OFFSET, ModelArgs, TransformerBlock
from runner.step import Step, prefill_step
from runner.step import decode_step as model_decode_step
from runner.tp import apply_tp
from runner.weights import load_model

Region = tuple[Callable[[], object], Callable[[], object] | None]
"""A timeable region: ``(fn, setup)``; ``setup`` (or None) runs untimed before every call of ``fn``."""


@dataclass
class LayerShard:
    """One decoder layer of one rank of a TP group of ``tp``, with a KV cache of ``max_rows`` x ``max_len``."""

    model: nn.Module
    """A one-layer ``runner.model.Transformer`` (no embedding, no head), sharded."""
    args: ModelArgs
    """Per-rank args (local head and FFN counts) as ``apply_tp`` left them."""
    full_args: ModelArgs
    """The whole model's args."""
    tp: int
    device: torch.device
    dtype: torch.dtype

    @property
    def block(self) -> TransformerBlock:
        return next(iter(self.model.layers.values()))

    @property
    def cache(self) -> KVCache:
        return self.model.cache

    @property
    def rope(self) -> tuple[Tensor, Tensor] | None:
        return self.model.rope


def check_tp(args: ModelArgs, tp: int) -> None:
    """One-line ``ExeGPTError`` unless ``tp`` ranks can each hold whole GQA groups (``runner.tp.apply_tp``)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ExeGPTError(f"TP degree {tp!r} must be an integer >= 1")
    if tp > args.n_kv_heads:
        raise ExeGPTError(f"TP degree {tp} does not divide the heads of {args.name or args.family} "
                          f"(n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}) into whole GQA groups a rank; "
                          f"valid degrees: {', '.join(map(str, range(1, args.n_kv_heads + 1)))}")


def build_layer_shard(spec: str, tp: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      max_rows: int = 1, max_len: int = 1, seed: int = 0) -> LayerShard:
    """Rank 0's shard of decoder layer 0 of ``spec`` at TP degree ``tp``, on one device, with its KV cache.

    Args:
        spec: what ``runner.weights.load_model`` accepts (preset name, HF folder, ``"smollm2"``).
        tp: TP degree, 1 to the KV heads (rank 0 holds the largest share where it does not divide them).
        max_rows, max_len: KV-cache geometry (rows, positions) the timed regions need.
    """
    model, full_args, _ = load_model(spec, dtype=dtype, device=device, layers=(0, 1), embed=False, head=False,
                                     seed=seed)
    if full_args.family not in ("llama", "opt"):
        raise ExeGPTError(f"the profiler times decoder-only llama/opt layers; family {full_args.family!r} "
                          f"is not supported yet")
    check_tp(full_args, tp)
    apply_tp(model, rank=0, world_size=tp, group=None)
    # NOTE: a group of one for the forwards (all_reduce becomes a no-op); the shard sizes stay those of `tp`.
    for block in model.layers.values():
        block.attention.tp_size = block.feed_forward.tp_size = 1
    if max_len > full_args.max_seq_len:
        raise ExeGPTError(f"grid length {max_len} exceeds {full_args.name or spec}'s max_seq_len="
                          f"{full_args.max_seq_len}")
    model.setup_cache(max_rows, max_len)
    return LayerShard(model=model, args=model.args, full_args=full_args, tp=tp, device=torch.device(device),
                      dtype=dtype)


# --- inputs ---------------------------------------------------------------------------------------


def _randn(shard: LayerShard, seed: int, *shape: int) -> Tensor:
    """Seeded random values of the shard's dtype, drawn on its device (a GPU point's inputs are gigabytes)."""
    g = torch.Generator(device=shard.device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=shard.device, dtype=shard.dtype)


def _hidden(shard: LayerShard, *shape: int) -> Tensor:
    return _randn(shard, 1234, *shape, shard.args.dim)


def _encode_lengths(batch: int, seq: int) -> Tensor:
    """Prompt lengths ``[batch]``: all ``seq`` except the last one a token shorter (a ragged batch)."""
    lens = torch.full((batch,), seq, dtype=torch.long)
    if batch > 1 and seq > 1:
        lens[-1] = seq - 1
    return lens


def encode_step(shard: LayerShard, batch: int, seq: int) -> Step:
    """The ``Step`` ``Transformer._prefill`` builds for ``batch`` prompts padded to ``seq`` in rows ``0..batch-1``."""
    return prefill_step(_encode_lengths(batch, seq), torch.arange(batch), shard.rope, shard.device)


def decode_positions(batch: int, context: int) -> Tensor:
    """Per-row positions ``[batch]`` of the new token: row ``i`` at ``context - 1 - i`` (clipped at 0)."""
    return (context - 1 - torch.arange(batch)).clamp(min=0)


def decode_step(shard: LayerShard, batch: int, context: int) -> Step:
    """The ``Step`` ``Transformer.decode`` builds for rows ``0..batch-1`` at ``decode_positions``, or all at
    ``context - 1`` where each row attends its own prefix only (``own_prefix_decode``)."""
    pos = torch.full((batch,), context - 1) if own_prefix_decode(shard) else decode_positions(batch, context)
    return model_decode_step(pos, slice(0, batch), shard.rope, shard.device)


def own_prefix_decode(shard: LayerShard) -> bool:
    """Whether the shard's decode attention attends each row over its own prefix only (the fused CPU core,
    ``Attention.fused_decode``), so that a step costs as its rows' contexts add up; else (torch's masked path)
    every row is attended over the step's longest context (``Profile.padded_decode``)."""
    # two rows at different positions: the mixed batches of real steps
    step = model_decode_step(decode_positions(2, 2), slice(0, 2), shard.rope, shard.device)
    return shard.block.attention.fused_decode(_hidden(shard, 2, 1), step, shard.cache)


def _check_fits(shard: LayerShard, batch: int, length: int) -> None:
    c = shard.cache
    if batch > c.max_rows or length > c.max_len:
        raise ExeGPTError(f"point batch={batch} length={length} does not fit the shard's cache "
                          f"({c.max_rows} rows x {c.max_len} positions)")


# --- the two halves of a layer --------------------------------------------------------------------


def _qkv(shard: LayerShard, n: int, S: int) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key, value ``[n, H, S, D]`` / ``[n, Hkv, S, D]`` of the right local shapes (random)."""
    a = shard.block.attention
    return tuple(_randn(shard, 99 + i, n, h, S, a.head_dim)
                 for i, h in enumerate((a.n_heads, a.n_kv_heads, a.n_kv_heads)))


def attention_core(shard: LayerShard, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
    """The attention core of ``Attention.forward`` (``Attention.core``): cache update, then attention over the cache
    -> ``[n, H, S, D]``."""
    return shard.block.attention.core(q, k, v, step, shard.cache, 0)


def layer_rest(shard: LayerShard, x: Tensor, step: Step, attn_out: Tensor) -> Tensor:
    """Everything of ``TransformerBlock.forward`` except the attention core: ``x`` ``[n, S, dim]`` -> ``[n, S, dim]``.

    ``attn_out`` ``[n, H, S, D]`` stands in for the core's output (its value does not change the work); ``[n, 1, H D]``
    where the decode core is fused (``Attention.fused_decode``: RoPE belongs to the core there).
    """
    block = shard.block
    if block.fused_decode(x, step, shard.cache):  # the whole layer is one kernel call: time it without its core
        return block.decode_fused(x, step, shard.cache, 0, attention=False)
    a, xn = block.attention, block.attention_norm(x)
    if a.fused_decode(xn, step, shard.cache):
        a.wqkv(xn)  # the fused core's input (discarded here)
    else:
        a.project(xn, step)  # q, k, v (the core's inputs; discarded here)
    h = a.out(attn_out, residual=x)
    return block.feed_forward(block.ffn_norm(h), residual=h)


# --- timeable regions -----------------------------------------------------------------------------


def attn_encode_region(shard: LayerShard, batch: int, seq: int) -> Region:
    """Attention core of ``batch`` prompts padded to ``seq`` tokens (one layer)."""
    _check_fits(shard, batch, seq)
    step = encode_step(shard, batch, seq)
    q, k, v = _qkv(shard, batch, seq)
    return (lambda: attention_core(shard, q, k, v, step)), None


def attn_decode_region(shard: LayerShard, batch: int, context: int) -> Region:
    """Attention core of one decode step of ``batch`` rows, the longest attending to ``context`` keys; where the
    core is fused (each row attends its own prefix only, ``own_prefix_decode``), every row attends ``context``
    keys: the table then reads as rows x context, looked up at a batch's mean context."""
    _check_fits(shard, batch, context)
    a = shard.block.attention
    x = _hidden(shard, batch, 1)
    # The cache writes go to the same positions every call: no state to rewind between repetitions.
    step = decode_step(shard, batch, context)
    if shard.block.fused_decode(x, step, shard.cache):
        # Inside the whole layer's one call (whose Python cost dense_decode holds): the core's C call alone
        return cpu_kernels.attn_decode_call(a.wqkv(x), shard.cache.k[0], shard.cache.v[0], a.n_heads, a.n_kv_heads,
                                            a.softmax_scale, step.kernel_args), None
    if a.fused_decode(x, step, shard.cache):  # RoPE + cache write + attention in one kernel call
        qkv = a.wqkv(x)
        return (lambda: a.decode_core(qkv, step, shard.cache, 0)), None
    q, k, v = _qkv(shard, batch, 1)
    return (lambda: attention_core(shard, q, k, v, step)), None


def _dense_shape(shard: LayerShard, tokens: int) -> tuple[int, int]:
    """``(n, S)`` with ``n * S == tokens`` and ``S`` the largest divisor within the RoPE table (one long prompt
    when it fits: the dense work depends only on the token count)."""
    limit = shard.cache.max_len
    S = max(d for d in range(1, min(tokens, limit) + 1) if tokens % d == 0)
    return tokens // S, S


def dense_encode_region(shard: LayerShard, tokens: int) -> Region:
    """The rest of a prefill layer for ``tokens`` tokens (``[n, S, dim]`` with ``n * S = tokens``)."""
    n, S = _dense_shape(shard, tokens)
    step = encode_step(shard, 1, S)
    x = _hidden(shard, n, S)
    attn_out = _qkv(shard, n, S)[0]
    return (lambda: layer_rest(shard, x, step, attn_out)), None


def dense_decode_region(shard: LayerShard, tokens: int) -> Region:
    """The rest of a decode layer for ``tokens`` rows of one token each (``[tokens, 1, dim]``)."""
    step = decode_step(shard, tokens, min(shard.cache.max_len, tokens + 1))
    x = _hidden(shard, tokens, 1)
    attn_out = _qkv(shard, tokens, 1)[0]  # [n, H, 1, D]
    if shard.block.attention.fused_decode(x, step, shard.cache):  # the fused core's output layout
        attn_out = attn_out.transpose(1, 2).reshape(tokens, 1, -1)
    return (lambda: layer_rest(shard, x, step, attn_out)), None


def layer_encode_region(shard: LayerShard, batch: int, seq: int) -> Region:
    """The whole ``TransformerBlock.forward`` of a prefill (the reference the two halves must add up to)."""
    _check_fits(shard, batch, seq)
    step = encode_step(shard, batch, seq)
    x = _hidden(shard, batch, seq)
    return (lambda: shard.block(x, step, shard.cache, 0)), None


def layer_decode_region(shard: LayerShard, batch: int, context: int) -> Region:
    """The whole ``TransformerBlock.forward`` of one decode step."""
    _check_fits(shard, batch, context)
    step = decode_step(shard, batch, context)
    x = _hidden(shard, batch, 1)
    return (lambda: shard.block(x, step, shard.cache, 0)), None


def probe_regions(spec: str, dtype: torch.dtype = torch.float32) -> list[Region]:
    """A fixed piece of the runner's decode work on layer 0 of ``spec``: the rest of a layer at 8, 32 and 128 rows
    and its attention at 32 rows of context 64 (the machine-speed probe of ``profiler.loop.speed_probe`` and of
    ``profiler.collectives``' rank slowdown)."""
    shard = build_layer_shard(spec, 1, dtype=dtype, max_rows=128, max_len=160)
    return [dense_decode_region(shard, 8), dense_decode_region(shard, 32), dense_decode_region(shard, 128),
            attn_decode_region(shard, 32, 64)]


# --- embedding + LM head --------------------------------------------------------------------------


def build_head(spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0) -> nn.Module:
    """The embedding, final norm and LM head of ``spec`` (no layers), whole (tp=1)."""
    model, _, _ = load_model(spec, dtype=dtype, device=device, layers=(0, 0), embed=True, head=True, seed=seed)
    return model


def lm_head_region(head: nn.Module, tokens: int) -> Region:
    """Embedding lookup (and learned positions) of ``tokens`` ids, final norm, LM head in float32 and greedy
    argmax, for ``tokens`` rows: the per-token work outside the layers."""
    device = next(head.parameters()).device
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, head.args.vocab_size, (tokens,), generator=g).to(device)
    pos = torch.zeros(tokens, dtype=torch.long, device=device) + OPT_POS_OFFSET

    def fn():
        h = head.tok_embeddings(ids)  # [T, dim]
        if head.pos_embeddings is not None:
            h = h + head.pos_embeddings(pos)
        return head.output(head.norm(h)).float().argmax(-1)  # [T]

    return fn, None
