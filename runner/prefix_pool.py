"""The KV pool of a rank's prefix cache: the keys and values of cached prompt prefixes, one slot a token.

The engine's radix tree (``exegpt.radix.PrefixCache``, kept by the driver) decides which slots hold which tokens;
every rank of the pipeline holds its own layers' (and TP shard's) KV of those tokens here. ``PREFIX_LOAD`` copies a
cached prefix into a new cache row before the rest of its prompt is prefilled at that offset (a chunk: a copy of
memory, no recomputation); ``PREFIX_SAVE`` copies a prefilled prompt's new tokens from its row into their slots.
The commands travel the pipeline in order with the prefills, so every stage sees the same state.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


class PrefixPool:
    """``k``, ``v``: ``[n_layers, capacity, n_kv_heads, head_dim]`` beside the cache they serve."""

    def __init__(self, cache: KVCache, capacity: int):
        shape = (cache.n_layers, capacity, cache.n_kv_heads, cache.head_dim)
        self.k = torch.zeros(shape, dtype=cache.dtype, device=cache.device)
        self.v = torch.zeros(shape, dtype=cache.dtype, device=cache.device)

    def load(self, cache: KVCache, rows: list[int], lens: list[int], slots: list[int]) -> None:
        """Row ``rows[i]`` gets the ``lens[i]`` cached tokens of the next ``lens[i]`` of ``slots`` at positions
        ``[0, lens[i])``, and holds them."""
        off = 0
        for r, m in zip(rows, lens):
            idx = torch.as_tensor(slots[off:off + m], device=self.k.device)
            cache.k[:, r, :, :m] = self.k[:, idx].transpose(1, 2)  # [L, m, H, D] -> [L, H, m, D]
            cache.v[:, r, :, :m] = self.v[:, idx].transpose(1, 2)
            cache.lengths[r] = m
            off += m

    def save(self, cache: KVCache, rows: list[int], starts: list[int], lens: list[int], slots: list[int]) -> None:
        """Positions ``[starts[i], starts[i] + lens[i])`` of row ``rows[i]`` into the next ``lens[i]`` slots."""
        off = 0
        for r, s, m in zip(rows, starts, lens):
            idx = torch.as_tensor(slots[off:off + m], device=self.k.device)
            self.k[:, idx] = cache.k[:, r, :, s:s + m].transpose(1, 2)  # [L, H, m, D] -> [L, m, H, D]
            self.v[:, idx] = cache.v[:, r, :, s:s + m].transpose(1, 2)
            off += m


def apply(rt, load: bool, cmd) -> None:
    """A ``PREFIX_LOAD`` or ``PREFIX_SAVE`` command on runtime ``rt``'s cache; its pool (``cmd.batch`` slots) is
    made on the first one."""
    cache = rt.model.cache
    pool = getattr(rt, "prefix_pool", None)
    if pool is None:
        pool = rt.prefix_pool = PrefixPool(cache, int(cmd.batch))
    rows, lens, slots = cmd.rows.tolist(), cmd.seq_lens.tolist(), cmd.ids.tolist()
    if load:
        pool.load(cache, rows, lens, slots)
    else:
        pool.save(cache, rows, cmd.req.tolist(), lens, slots)
