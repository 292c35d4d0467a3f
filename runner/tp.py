"""Tensor parallelism by rewriting Linear layers after construction (gpt-fast's tp.py, with explicit collectives).

The model files stay TP-agnostic: ``apply_tp`` shards the weights in place, stores the group on the attention and
feed-forward modules, and their forwards call ``all_reduce`` explicitly (a no-op for one rank). Differences from
gpt-fast: rank and world size are arguments; local head counts go into a new ``ModelArgs``; no forward hooks.
"""

from __future__ import annotations

import dataclasses
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from exegpt.errors import ExeGPTError
from exegpt.models import even_shares, kv_shares


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for ``init_method=f"tcp://127.0.0.1:{port}"``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_dist(rank: int, world_size: int, init_method: str, backend: str | None = None,
              timeout_s: float = 120.0) -> None:
    """Joins the default process group: NCCL when CUDA is available, else gloo (CPU).

    With NCCL each rank uses ``cuda:{rank % device_count}``.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def all_reduce(x: Tensor, group: dist.ProcessGroup | None = None, world_size: int | None = None) -> Tensor:
    """Sums ``x`` over the TP group in place and returns it; a no-op when the group has one rank.

    ``world_size`` None: the size of ``group`` (1 without an initialized process group). The model passes its
    modules' ``tp_size`` explicitly, so a shard built for timing can set it to 1.
    """
    if world_size is None:
        world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world_size > 1:
        dist.all_reduce(x, group=group)
    return x


def _shard_rows(linear: nn.Linear, blocks: list[tuple[int, ...]], rank: int) -> None:
    """Column-parallel: keeps this rank's slice of each output block (q, k and v of a fused wqkv); ``blocks``: per
    block, every rank's rows of it."""
    parts = linear.weight.data.split([sum(b) for b in blocks], dim=0)  # [out_i, in]
    linear.weight = nn.Parameter(torch.cat([p.split(b, dim=0)[rank] for p, b in zip(parts, blocks)]),
                                 requires_grad=False)
    if linear.bias is not None:
        bparts = linear.bias.data.split([sum(b) for b in blocks])
        linear.bias = nn.Parameter(torch.cat([p.split(b)[rank] for p, b in zip(bparts, blocks)]),
                                   requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def _shard_cols(linear: nn.Linear, sizes: tuple[int, ...], rank: int) -> None:
    """Row-parallel: keeps this rank's input slice (``sizes``: every rank's); the bias stays on rank 0 only, so
    the all-reduce adds it once."""
    linear.weight = nn.Parameter(linear.weight.data.split(sizes, dim=1)[rank].contiguous(), requires_grad=False)
    if linear.bias is not None and rank != 0:
        linear.bias = nn.Parameter(torch.zeros_like(linear.bias), requires_grad=False)
    linear.in_features = linear.weight.shape[1]


def head_split(args, world_size: int, kv_split: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Every rank's KV heads at TP degree ``world_size``: ``kv_split`` when given (it must cover the KV heads),
    else whole GQA groups as even as they go (``exegpt.models.kv_shares``)."""
    if kv_split is None:
        if not 1 <= world_size <= args.n_kv_heads:
            raise ExeGPTError(f"TP degree {world_size} must divide n_kv_heads={args.n_kv_heads} into whole GQA "
                              f"groups (a KV head and its {args.n_heads // args.n_kv_heads} query heads) a rank: "
                              f"1 to {args.n_kv_heads} ranks")
        return kv_shares(args.n_kv_heads, world_size)
    kv_split = tuple(kv_split)
    if len(kv_split) != world_size or sum(kv_split) != args.n_kv_heads or min(kv_split) < 1:
        raise ExeGPTError(f"kv_split {kv_split} must give each of {world_size} ranks >= 1 of the "
                          f"{args.n_kv_heads} KV heads")
    return kv_split


def apply_tp(model: nn.Module, rank: int, world_size: int, group: dist.ProcessGroup | None = None,
             kv_split: tuple[int, ...] | None = None) -> nn.Module:
    """Shards ``model`` (a ``runner.model.Transformer``) for ``rank`` of a TP group of ``world_size``, in place.

    Column split of ``wqkv`` (per q/k/v block), ``w1`` and ``w3``; row split of ``wo`` and ``w2``; the embedding and
    LM head stay whole. Heads go in whole GQA groups: ``kv_split`` (every rank's KV heads) or, by default, as even
    as they go, the first ranks holding one more where ``world_size`` does not divide the KV heads (SmolLM2's 3 KV
    and 9 query heads on 2 ranks: 2 + 1 and 6 + 3); the FFN width likewise. ``model.args`` becomes a new
    ``ModelArgs`` with this rank's head and FFN counts. Any existing KV cache is dropped: call ``setup_cache``
    afterwards (it sizes the cache to this rank's KV heads).

    Raises:
        ExeGPTError: a rank would hold no whole GQA group (``world_size`` above the KV heads).
    """
    args = model.args
    if world_size < 1 or not 0 <= rank < world_size:
        raise ExeGPTError(f"bad TP rank/world size: {rank=} {world_size=}")
    kv = head_split(args, world_size, kv_split)
    if not hasattr(model, "layers") or args.family == "t5":
        raise ExeGPTError(f"apply_tp supports decoder-only llama/opt models, not family {args.family!r}")
    if world_size == 1:
        return model
    group_size, D = args.n_heads // args.n_kv_heads, args.head_dim
    q_rows, kv_rows = tuple(k * group_size * D for k in kv), tuple(k * D for k in kv)
    ffn = even_shares(args.ffn_dim, world_size)
    local = dataclasses.replace(args, n_heads=kv[rank] * group_size, n_kv_heads=kv[rank], ffn_dim=ffn[rank])
    with torch.no_grad():
        for block in model.layers.values():
            attn, ff = block.attention, block.feed_forward
            _shard_rows(attn.wqkv, [q_rows, kv_rows, kv_rows], rank)
            _shard_cols(attn.wo, q_rows, rank)
            attn.n_heads, attn.n_kv_heads = local.n_heads, local.n_kv_heads
            _shard_rows(ff.w1, [ffn], rank)
            if ff.w3 is not None:
                _shard_rows(ff.w3, [ffn], rank)
            _shard_cols(ff.w2, ffn, rank)
            for m in (attn, ff):
                m.tp_group, m.tp_size = group, world_size
    model.args = local
    model.tp_rank, model.tp_size = rank, world_size
    model.cache = None
    return model
