"""Static, preallocated KV cache with one position per row (gpt-fast's cache, extended for ExeGPT).

gpt-fast shares one ``input_pos`` across the batch. ExeGPT mixes queries at different positions in one decode
batch, finishes them early and compacts the survivors, so here every row keeps its own length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from exegpt.errors import ExeGPTError


def as_rows(rows: Tensor | list[int] | range) -> Tensor:
    """Row indices as a CPU LongTensor ``[n]``."""
    return torch.as_tensor(list(rows) if isinstance(rows, range) else rows, dtype=torch.long).reshape(-1).cpu()


def row_range(rows: Tensor) -> slice | None:
    """``rows`` as a slice when they are consecutive (a copy-free cache view), else None."""
    n = rows.numel()
    if n == 0:
        return None
    r0 = int(rows[0])
    return slice(r0, r0 + n) if torch.equal(rows, torch.arange(r0, r0 + n)) else None


def row_index(rows: Tensor, device: torch.device | str) -> Tensor | slice:
    """Cache rows ``rows`` (CPU ``[n]``) as an index: a slice when they are consecutive (views, no copies), else
    the indices on ``device``."""
    r = row_range(rows)
    return r if r is not None else rows.to(device)


def fill_holes(keep: list[int]) -> list[int]:
    """A compaction order for surviving rows ``keep`` (ascending): rows already in ``0..m-1`` stay where they
    are, and the survivors beyond ``m`` move into the holes, so ``compact`` copies as few rows as possible."""
    m = len(keep)
    tail = [r for r in keep if r >= m]
    survivors = set(keep)
    order, t = [], 0
    for pos in range(m):
        if pos in survivors:
            order.append(pos)
        else:
            order.append(tail[t])
            t += 1
    return order


class KVCache:
    """Per-row KV cache of the decoder layers one module holds.

    ``k``, ``v``: ``[n_layers, max_rows, n_kv_heads, max_len, head_dim]`` on ``device``; ``lengths``: CPU LongTensor
    ``[max_rows]``, the number of valid positions of each row (host-side bookkeeping, so no device sync is needed to
    build masks). Encoder-decoder models also keep the cross-attention K/V of their encoder output
    (``cross_k``, ``cross_v``: ``[n_layers, max_rows, n_cross_heads, cross_len, head_dim]``, ``cross_lengths``).
    """

    def __init__(self, n_layers: int, max_rows: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 cross_len: int = 0, n_cross_heads: int = 0):
        if max_rows < 1 or max_len < 1:
            raise ExeGPTError(f"KV cache needs max_rows >= 1 and max_len >= 1, got {max_rows=} {max_len=}")
        self.n_layers, self.max_rows, self.max_len = n_layers, max_rows, max_len
        self.n_kv_heads, self.head_dim, self.dtype, self.device = n_kv_heads, head_dim, dtype, torch.device(device)
        shape = (n_layers, max_rows, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(max_rows, dtype=torch.long)
        self.cross_len = cross_len
        if cross_len:
            cshape = (n_layers, max_rows, n_cross_heads, cross_len, head_dim)
            self.cross_k = torch.zeros(cshape, dtype=dtype, device=device)
            self.cross_v = torch.zeros(cshape, dtype=dtype, device=device)
            self.cross_lengths = torch.zeros(max_rows, dtype=torch.long)

    def matches(self, n_layers: int, max_rows: int, max_len: int, n_kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device | str, cross_len: int = 0) -> bool:
        """Whether this cache already has exactly this geometry (``setup_cache`` is idempotent)."""
        return (self.n_layers, self.max_rows, self.max_len, self.n_kv_heads, self.head_dim, self.dtype,
                self.cross_len) == (n_layers, max_rows, max_len, n_kv_heads, head_dim, dtype, cross_len) \
            and self.device == torch.device(device)

    @property
    def nbytes(self) -> int:
        n = self.k.nbytes + self.v.nbytes
        return n + (self.cross_k.nbytes + self.cross_v.nbytes if self.cross_len else 0)

    # --- writes from the attention layers -----------------------------------------------------

    def write_prompt(self, layer: int, rows: Tensor | slice, k: Tensor, v: Tensor) -> None:
        """Writes a padded prompt batch ``k``, ``v``: ``[n, H, S, D]`` to positions ``[0, S)`` of ``rows``."""
        S = k.shape[2]
        self.k[layer, rows, :, :S] = k.to(self.dtype)  # a wider cache (``cache_dtype``) takes the prompt widened
        self.v[layer, rows, :, :S] = v.to(self.dtype)

    def write_chunks(self, layer: int, rows: list[int], starts: list[int], lens: list[int], k: Tensor, v: Tensor,
                     kv_len: int) -> tuple[Tensor, Tensor]:
        """Writes prompt chunks ``k``, ``v`` ``[n, H, S, D]`` (padded) at ``[starts[i], starts[i] + lens[i])`` of row
        ``rows[i]``; returns the rows' keys and values ``[n, H, kv_len, D]`` (gathered)."""
        for i, (r, s, m) in enumerate(zip(rows, starts, lens)):
            self.k[layer, r, :, s:s + m] = k[i, :, :m].to(self.dtype)
            self.v[layer, r, :, s:s + m] = v[i, :, :m].to(self.dtype)
        idx = torch.as_tensor(rows, device=self.k.device)
        return self.k[layer, idx, :, :kv_len], self.v[layer, idx, :, :kv_len]

    def append(self, layer: int, rows: Tensor | slice, pos: Tensor | int, k: Tensor, v: Tensor, kv_len: int
               ) -> tuple[Tensor, Tensor]:
        """Writes one step ``k``, ``v``: ``[n, H, 1, D]`` at per-row positions ``pos`` (``[n]`` on the device, or
        one int that every row shares).

        Returns the keys and values ``[n, H, kv_len, D]`` of those rows (a view when ``rows`` is a slice).
        """
        if isinstance(pos, int):  # one position for all rows: a strided copy, no scatter
            self.k[layer, rows, :, pos] = k[:, :, 0].to(self.dtype)
            self.v[layer, rows, :, pos] = v[:, :, 0].to(self.dtype)
        elif isinstance(rows, slice):  # consecutive rows: write into a view, no copy
            kc, vc = self.k[layer, rows], self.v[layer, rows]  # [n, H, max_len, D]
            idx = torch.arange(k.shape[0], device=k.device)
            kc[idx, :, pos] = k[:, :, 0].to(self.dtype)  # [n, H, D]
            vc[idx, :, pos] = v[:, :, 0].to(self.dtype)
        else:
            self.k[layer, rows, :, pos] = k[:, :, 0].to(self.dtype)  # [n, H, D]
            self.v[layer, rows, :, pos] = v[:, :, 0].to(self.dtype)
        return self.k[layer, rows, :, :kv_len], self.v[layer, rows, :, :kv_len]  # views, or gathered (index rows)

    def write_cross(self, layer: int, rows: Tensor | slice, k: Tensor, v: Tensor) -> None:
        """Stores cross-attention K/V ``[n, H, S_src, D]`` of an encoder batch."""
        S = k.shape[2]
        self.cross_k[layer, rows, :, :S] = k
        self.cross_v[layer, rows, :, :S] = v

    # --- row management -----------------------------------------------------------------------

    def reset(self, rows: Tensor | list[int]) -> None:
        """Marks ``rows`` empty (their data is overwritten by the next prefill)."""
        rows = as_rows(rows)
        self.lengths[rows] = 0
        if self.cross_len:
            self.cross_lengths[rows] = 0

    def _copy_rows(self, src: Tensor, dst: Tensor) -> None:
        """Copies the KV (and T5's cross K/V) of rows ``src`` to rows ``dst``, up to the longest of them. The
        right side is a gathered copy, so the two row sets may overlap."""
        if not src.numel():
            return
        s, d = src.to(self.device), dst.to(self.device)
        caches = [(self.lengths, self.k, self.v)]
        if self.cross_len:
            caches.append((self.cross_lengths, self.cross_k, self.cross_v))
        for lengths, k, v in caches:
            L = int(lengths[src].max())
            if L > 0:
                k[:, d, :, :L] = k[:, s, :, :L]
                v[:, d, :, :L] = v[:, s, :, :L]

    def _length_tensors(self) -> list[Tensor]:
        return [self.lengths] + ([self.cross_lengths] if self.cross_len else [])

    def compact(self, keep: Tensor | list[int]) -> None:
        """Moves rows ``keep`` (in order) to rows ``0..len(keep)-1`` and zeroes the lengths of the rest.

        Only rows that change place are copied, so an order from ``fill_holes`` (survivors stay, the last
        rows move into the holes) costs the KV of the rows that moved, not of the whole batch.
        """
        keep = as_rows(keep)
        m = keep.numel()
        moved = torch.nonzero(keep != torch.arange(m)).flatten()  # destinations whose row changes
        self._copy_rows(keep[moved], moved)
        for lengths in self._length_tensors():
            kept = lengths[keep].clone()
            lengths.zero_()
            lengths[:m] = kept

    def move(self, src: Tensor | list[int], dst: Tensor | list[int]) -> None:
        """Copies rows ``src`` to rows ``dst`` (distinct, no overlap between the two) and marks ``src`` empty:
        filling the holes finished rows leave, so a decode batch stays a contiguous range of rows."""
        src, dst = as_rows(src), as_rows(dst)
        self._copy_rows(src, dst)
        for lengths in self._length_tensors():
            moved = lengths[src].clone()
            lengths[src] = 0
            lengths[dst] = moved

    def export_rows(self, rows: Tensor | list[int]) -> dict[str, Tensor]:
        """Contiguous K/V of ``rows``, trimmed to the longest of them, plus their lengths (WAA's KV hand-off)."""
        rows = as_rows(rows)
        lengths = self.lengths[rows].clone()
        L, idx = int(lengths.max()) if rows.numel() else 0, rows.to(self.device)
        out = {"k": self.k[:, idx, :, :L].contiguous(), "v": self.v[:, idx, :, :L].contiguous(), "lengths": lengths}
        if self.cross_len:
            cross = self.cross_lengths[rows].clone()
            Lc = int(cross.max()) if rows.numel() else 0
            out |= {"cross_k": self.cross_k[:, idx, :, :Lc].contiguous(),
                    "cross_v": self.cross_v[:, idx, :, :Lc].contiguous(), "cross_lengths": cross}
        return out

    def import_rows(self, rows: Tensor | list[int], exported: dict[str, Tensor]) -> None:
        """Writes an ``export_rows`` result into ``rows`` of this cache (any device, same head layout)."""
        rows = as_rows(rows)
        idx = rows.to(self.device)
        L = exported["k"].shape[3]
        if L > self.max_len:
            raise ExeGPTError(f"imported KV of {L} positions does not fit max_len={self.max_len}")
        self.k[:, idx, :, :L] = exported["k"].to(self.device, self.dtype)
        self.v[:, idx, :, :L] = exported["v"].to(self.device, self.dtype)
        self.lengths[rows] = exported["lengths"].cpu()
        if self.cross_len and "cross_k" in exported:
            Lc = exported["cross_k"].shape[3]
            self.cross_k[:, idx, :, :Lc] = exported["cross_k"].to(self.device, self.dtype)
            self.cross_v[:, idx, :, :Lc] = exported["cross_v"].to(self.device, self.dtype)
            self.cross_lengths[rows] = exported["cross_lengths"].cpu()
