"""Ulysses sequence parallelism and Shift Parallelism: one replica of P = SP x TP ranks that runs each step either
in its base configuration (SP, TP) or shifted to tensor parallelism over all P ranks, over one KV cache.

Base mode (Ulysses, Arctic Inference's Alg. 1), per layer, for the step's T tokens padded to a multiple of SP:
each rank takes T/SP consecutive tokens; its fused QKV projection (weights split TP ways) goes through one
``all_to_all_single`` over its SP group, after which the rank holds every token's q, k and v for its heads (H/P
of them); attention runs over the rank's KV-cache heads; a second all-to-all brings each rank its own tokens'
outputs for every head; the output projection and the MLP run on its own tokens (an all-reduce over TP each).
After the last layer one ``all_gather_into_tensor`` gives every rank every token's hidden state.

Shift mode: plain tensor parallelism over the P ranks (``runner.tp``), an all-reduce per projection pair.

The two place the same heads, hence the same KV-cache heads, on each rank (Arctic's head-order trick): the rank
at (s, t) of the grid ``arange(P).reshape(SP, TP)`` holds TP shard t and, within it, SP chunk s of the heads;
the shift model gives it shard ``t * SP + s`` of P. So one cache serves both and a step may run in either mode.
Weights: each rank keeps the base shard (W/TP) and the shift shard (W/P), as Arctic's two models do.

Heads go in whole GQA groups (``exegpt.models.kv_shares``): where P does not divide the KV heads the first ranks
hold one group more (SmolLM2's 3 KV heads on 2 ranks: 2 + 1), and the all-to-alls take per-rank split sizes.
gloo (torch 2.13) and NCCL implement ``all_to_all_single`` with unequal splits, and ``all_gather_single``
(``all_gather_into_tensor``); the tokens stay split evenly, so the gather's shares are equal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from exegpt.errors import ExeGPTError
from exegpt.models import kv_shares
from exegpt.policies.shift import split_degrees
from runner.model import Transformer, split_qkv
from runner.step import Step
from runner.tp import apply_tp


def shift_order(sp: int, tp: int) -> list[int]:
    """Grid ranks (``s * tp + t``) in the order of their shards in the shift model: the grid transposed and
    flattened (SP = 2, TP = 2: [0, 2, 1, 3])."""
    return [s * tp + t for t in range(tp) for s in range(sp)]


def check_degrees(sp: int, tp: int, n_heads: int, n_kv_heads: int, name: str = "the model") -> None:
    """One line when SP x TP ranks cannot each hold whole GQA groups of ``name``'s heads, naming the degrees that
    can."""
    for what, v in (("sp", sp), ("tp", tp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ExeGPTError(f"{what}={v!r} must be a whole number >= 1")
    p = sp * tp
    if p not in split_degrees(n_heads, n_kv_heads):
        raise ExeGPTError(f"sp={sp} x tp={tp} = {p} ranks do not split {name}'s {n_heads} query and {n_kv_heads} KV "
                          f"heads into whole GQA groups; SP x TP must be one of {split_degrees(n_heads, n_kv_heads)}")


def grid_shares(sp: int, tp: int, n_kv_heads: int) -> tuple[tuple[int, ...], ...]:
    """KV heads of every grid rank, ``[t][s]``: the shift model's shares of P (``kv_shares``), shard ``t * sp + s``
    at (s, t), so that base shard t (the sum over s) holds the same heads as the shift shards t * sp .. + sp - 1."""
    shares = kv_shares(n_kv_heads, sp * tp)
    return tuple(shares[t * sp:(t + 1) * sp] for t in range(tp))


@dataclass(frozen=True)
class ShiftGroups:
    """This rank's place in a replica's (SP, TP) grid and the process groups of its modes."""

    sp: int
    tp: int
    index: int
    """This rank's grid index ``s * tp + t`` (its rank within the replica)."""
    sp_group: object
    """The ranks of this rank's grid column (same t): Ulysses' all-to-all and all-gather."""
    tp_group: object
    """The ranks of this rank's grid row (same s): the base model's all-reduces."""
    shift_group: object
    """Every rank of the replica: the shift model's all-reduces."""

    @property
    def s(self) -> int:
        return self.index // self.tp

    @property
    def t(self) -> int:
        return self.index % self.tp

    @property
    def shift_index(self) -> int:
        """This rank's shard of P in the shift model."""
        return self.t * self.sp + self.s


def make_groups(sp: int, tp: int, first_rank: int, index: int) -> ShiftGroups:
    """The groups of the replica whose ranks are ``first_rank .. first_rank + sp * tp - 1`` (``new_group`` is
    collective: every rank of the world calls this for every replica, in the same order)."""
    p = sp * tp
    ranks = [first_rank + i for i in range(p)]
    whole = dist.new_group(ranks) if p > 1 else None
    cols = [dist.new_group([first_rank + s * tp + t for s in range(sp)]) if 1 < sp < p else whole
            for t in range(tp)]
    rows = [dist.new_group([first_rank + s * tp + t for t in range(tp)]) if 1 < tp < p else whole
            for s in range(sp)]
    mine = index if 0 <= index < p else 0
    return ShiftGroups(sp, tp, mine, cols[mine % tp] if sp > 1 else None, rows[mine // tp] if tp > 1 else None,
                       whole)


class ShiftModel(nn.Module):
    """A whole llama/opt model run by one rank of a Shift Parallelism replica: ``base`` (its TP shard of the
    (SP, TP) configuration) and ``shift`` (its shard of TP = P) over one KV cache. ``prefill`` and ``decode`` take
    ``sp``: True runs the step in the base configuration (Ulysses), False in the shift one."""

    def __init__(self, model: Transformer, groups: ShiftGroups):
        super().__init__()
        if model.embed != model.head or model.tp_size != 1:
            raise ExeGPTError("Shift Parallelism runs whole, unsharded models (no pipeline stages), or a stack of "
                              "layers with neither embedding nor head (the profiler's)")
        args = model.args
        check_degrees(groups.sp, groups.tp, args.n_heads, args.n_kv_heads, args.name or "the model")
        self.g = groups
        p = groups.sp * groups.tp
        shares = grid_shares(groups.sp, groups.tp, args.n_kv_heads)
        self.shift = apply_tp(copy.deepcopy(model) if groups.sp > 1 else model, groups.shift_index, p,
                              groups.shift_group, kv_split=tuple(k for col in shares for k in col))
        self.base = apply_tp(model, groups.t, groups.tp, groups.tp_group,
                             kv_split=tuple(sum(col) for col in shares)) if groups.sp > 1 else None
        self.args = self.shift.args
        group = args.n_heads // args.n_kv_heads
        self.chunks = tuple((k * group, k) for k in shares[groups.t])  # (H, Hkv) of SP rank j in my base shard
        self.heads = self.chunks[groups.s]  # this rank's, in both modes

    embed = property(lambda self: self.shift.embed)
    head = property(lambda self: self.shift.head)

    @property
    def cache(self):
        return self.shift.cache

    @cache.setter
    def cache(self, value) -> None:
        self.shift.cache = value
        if self.base is not None:
            self.base.cache = value

    def setup_cache(self, max_rows: int, max_len: int):
        cache = self.shift.setup_cache(max_rows, max_len)  # H_kv / P heads: the layout of both modes
        if self.base is not None:
            self.base.cache, self.base.rope = cache, self.shift.rope
        return cache

    def _model(self, sp: bool) -> tuple[Transformer, object]:
        if not sp or self.base is None:
            return self.shift, None
        return self.base, self._ulysses_layers

    @torch.no_grad()
    def prefill(self, x: Tensor, seq_lens, rows, starts=None, sp: bool = False) -> Tensor:
        model, layers = self._model(sp)
        return model.prefill(x, seq_lens, rows, starts, layers=layers)

    @torch.no_grad()
    def decode(self, x: Tensor, rows, sp: bool = False) -> Tensor:
        model, layers = self._model(sp)
        return model.decode(x, rows, layers=layers)

    # --- base mode ----------------------------------------------------------------------------------------

    def _ulysses_layers(self, h: Tensor, step: Step, valid: Tensor | None = None) -> Tensor:
        """The base model's layers over ``h`` ``[n, S, dim]`` (every rank holds it; ``valid`` marks the real
        tokens): this rank's T/SP tokens through every layer, then every token's hidden state gathered back."""
        n, S, dim = h.shape
        packed = _packed(h, valid)  # [T, dim], in token order
        T = packed.shape[0]
        per = -(-T // self.g.sp)  # tokens per rank, the last padded
        x = _padded(packed, per * self.g.sp)[self.g.s * per:(self.g.s + 1) * per].contiguous()  # [per, dim]
        for i, block in enumerate(self.base.layers.values()):
            x = self._layer(block, x, step, i, valid, (n, S, T, per))
        out = x.new_empty(per * self.g.sp, dim)
        dist.all_gather_single(out, x, group=self.g.sp_group)  # every token's hidden state, in token order
        return _grid(out[:T], valid, n, S)

    def base_layer(self, x: Tensor, step: Step, n: int, S: int, layer: int = 0) -> Tensor:
        """Base-mode layer ``layer`` alone over this rank's share ``x`` ``[ceil(n S / SP), dim]`` of a step of
        ``n`` rows of ``S`` real tokens each (what ``profiler.sp_layer`` times)."""
        block = list(self.base.layers.values())[layer]
        return self._layer(block, x, step, layer, None, (n, S, n * S, x.shape[0]))

    def _layer(self, block, x: Tensor, step: Step, layer: int, valid: Tensor | None, shape) -> Tensor:
        """One base-mode layer over this rank's tokens ``x`` ``[per, dim]``. SP rank j of the base shard holds
        ``self.chunks[j]`` heads: equal shares when SP x TP divides the KV heads, else whole GQA groups, more on the
        first ranks (the all-to-alls' splits differ then)."""
        n, S, T, per = shape
        sp, group = self.g.sp, self.g.sp_group
        attn = block.attention
        Hs, Hks = self.heads
        D = attn.head_dim
        qkv = attn.wqkv(block.attention_norm(x))  # [per, (H/TP + 2 Hkv/TP) D]: this rank's TP shard of heads
        qs, ks = [h * D for h, _ in self.chunks], [hk * D for _, hk in self.chunks]
        q, k, v = qkv.split([sum(qs), sum(ks), sum(ks)], dim=-1)
        # head chunk j (its q, k and v for this rank's tokens) goes to SP rank j: [per, C_j] each, in rank order
        parts = [torch.cat(c, dim=-1).reshape(-1) for c in zip(q.split(qs, -1), k.split(ks, -1), v.split(ks, -1))]
        send = torch.cat(parts)
        C = (Hs + 2 * Hks) * D
        recv = send.new_empty(sp * per * C)  # every rank's tokens, this rank's heads: [sp, per, C]
        dist.all_to_all_single(recv, send, [per * C] * sp, [p.numel() for p in parts], group=group)
        grid = _grid(recv.view(sp * per, C)[:T], valid, n, S)  # [n, S, (Hs + 2 Hks) D]: every token, my heads
        cache = self.base.cache
        if attn.fused_decode(grid, step, cache):  # the CPU decode kernel: RoPE, cache write, attention in one call
            y = attn.decode_core(grid, step, cache, layer, self.heads)
        else:
            q, k, v = split_qkv(grid, step, Hs, Hks, D)
            y = attn.core(q, k, v, step, cache, layer)  # [n, Hs, S, D]
            y = y.transpose(1, 2).reshape(n, S, Hs * D)
        y = _padded(_packed(y, valid), sp * per).contiguous()  # [sp * per, Hs D]: rank j's tokens are rows j
        back = y.new_empty(per * sum(qs))
        dist.all_to_all_single(back, y.view(-1), [per * c for c in qs], [per * Hs * D] * sp, group=group)
        # own tokens, head chunk j from SP rank j -> [per, H/TP D] in the TP shard's head order
        y = torch.cat([b.view(per, c) for b, c in zip(back.split([per * c for c in qs]), qs)], dim=-1)
        x = attn.out(y, residual=x)
        return block.feed_forward(block.ffn_norm(x), residual=x)


def _packed(t: Tensor, valid: Tensor | None) -> Tensor:
    """``t`` ``[n, S, C]`` -> its real tokens ``[T, C]`` in token order (``valid``: the mask of them; None: all)."""
    return t.reshape(-1, t.shape[-1]) if valid is None else t[valid]


def _grid(packed: Tensor, valid: Tensor | None, n: int, S: int) -> Tensor:
    """``_packed``'s inverse: ``[T, C]`` -> ``[n, S, C]``, zeros where ``valid`` is False."""
    if valid is None:
        return packed.view(n, S, -1)
    return packed.new_zeros(n, S, packed.shape[-1]).index_put_((valid,), packed)


def _padded(t: Tensor, rows: int) -> Tensor:
    """``t`` with zero rows appended up to ``rows`` (Ulysses' equal shares)."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
