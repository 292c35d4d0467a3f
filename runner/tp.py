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


def _shard_rows(linear: nn.Linear, sizes: list[int], rank: int, world_size: int) -> None:
    """Column-parallel: keeps this rank's slice of each output block of ``sizes`` (q/k/v-aware for a fused wqkv)."""
    parts = linear.weight.data.split(sizes, dim=0)  # [out_i, in]
    linear.weight = nn.Parameter(torch.cat([p.tensor_split(world_size, dim=0)[rank] for p in parts]),
                                 requires_grad=False)
    if linear.bias is not None:
        bparts = linear.bias.data.split(sizes)
        linear.bias = nn.Parameter(torch.cat([b.tensor_split(world_size)[rank] for b in bparts]),
                                   requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def _shard_cols(linear: nn.Linear, rank: int, world_size: int) -> None:
    """Row-parallel: keeps this rank's input slice; the bias stays on rank 0 only, so the all-reduce adds it once."""
    linear.weight = nn.Parameter(linear.weight.data.tensor_split(world_size, dim=1)[rank].contiguous(),
                                 requires_grad=False)
    if linear.bias is not None and rank != 0:
        linear.bias = nn.Parameter(torch.zeros_like(linear.bias), requires_grad=False)
    linear.in_features = linear.weight.shape[1]


def apply_tp(model: nn.Module, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shards ``model`` (a ``runner.model.Transformer``) for ``rank`` of a TP group of ``world_size``, in place.

    Column split of ``wqkv`` (per q/k/v block), ``w1`` and ``w3``; row split of ``wo`` and ``w2``; the embedding and
    LM head stay whole. ``model.args`` becomes a new ``ModelArgs`` with the local head and FFN counts. Any existing
    KV cache is dropped: call ``setup_cache`` afterwards.

    Raises:
        ExeGPTError: ``world_size`` does not divide the head counts or the FFN width.
    """
    args = model.args
    if world_size < 1 or not 0 <= rank < world_size:
        raise ExeGPTError(f"bad TP rank/world size: {rank=} {world_size=}")
    if args.n_heads % world_size or args.n_kv_heads % world_size or args.ffn_dim % world_size:
        raise ExeGPTError(f"TP degree {world_size} must divide n_heads={args.n_heads}, "
                          f"n_kv_heads={args.n_kv_heads} and ffn_dim={args.ffn_dim}")
    if not hasattr(model, "layers") or args.family == "t5":
        raise ExeGPTError(f"apply_tp supports decoder-only llama/opt models, not family {args.family!r}")
    if world_size == 1:
        return model
    local = dataclasses.replace(args, n_heads=args.n_heads // world_size, n_kv_heads=args.n_kv_heads // world_size,
                                ffn_dim=args.ffn_dim // world_size)
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    with torch.no_grad():
        for block in model.layers.values():
            attn, ffn = block.attention, block.feed_forward
            _shard_rows(attn.wqkv, [q_out, kv_out, kv_out], rank, world_size)
            _shard_cols(attn.wo, rank, world_size)
            attn.n_heads, attn.n_kv_heads = local.n_heads, local.n_kv_heads
            _shard_rows(ffn.w1, [args.ffn_dim], rank, world_size)
            if ffn.w3 is not None:
                _shard_rows(ffn.w3, [args.ffn_dim], rank, world_size)
            _shard_cols(ffn.w2, rank, world_size)
            for m in (attn, ffn):
                m.tp_group, m.tp_size = group, world_size
    model.args = local
    model.tp_rank, model.tp_size = rank, world_size
    model.cache = None
    return model
