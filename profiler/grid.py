"""Sweep grids: batch sizes, sequence lengths, token counts, message sizes and TP degrees.

Grids are dense at small sizes, where times change shape (launch- and overhead-bound), and sparse at large sizes,
where times grow linearly or quadratically and interpolation is accurate (vidur's ``get_num_tokens_to_profile``
does the same). Every axis starts at 1 (or the smallest message) so that lookups never fall below the table, and
the attention axes end exactly at the model's ``max_seq_len``.

- quick grid: powers of two (1, 2, 4, 8, ...), plus the axis maximum;
- full grid: every size up to 8, then alternating x1.5 / x4/3 steps (12, 16, 24, 32, 48, ...), plus the maximum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from exegpt.errors import ExeGPTError
from exegpt.models import ModelShape

QUICK_MAX_BATCH = 128
"""Largest batch of the attention tables in a quick grid (the solver's B_E / B_D on CPU models)."""
FULL_MAX_BATCH = 256
QUICK_MAX_TOKENS = 4096
"""Largest token count of the dense / LM-head tables in a quick grid (they extrapolate linearly beyond)."""
FULL_MAX_TOKENS = 16384
MIN_BYTES = 16
"""Smallest message of the collective tables (below one activation row of any model)."""
QUICK_MAX_BYTES = 16 * 2 ** 20
FULL_MAX_BYTES = 256 * 2 ** 20


def quick_sizes(hi: int, lo: int = 1) -> tuple[int, ...]:
    """Powers of two from ``lo`` (rounded up to one) below ``hi``, then ``hi`` itself."""
    _check_range(lo, hi)
    out, v = [], 1
    while v < hi:
        if v >= lo:
            out.append(v)
        v *= 2
    return tuple(out + [hi])


def full_sizes(hi: int, lo: int = 1) -> tuple[int, ...]:
    """Every integer from ``lo`` up to 8, then 12, 16, 24, 32, 48, 64, ... (x1.5 / x4/3 steps), then ``hi``."""
    _check_range(lo, hi)
    out = [v for v in range(lo, min(hi, 9))]
    v = 8
    while v < hi:
        out += [s for s in (v * 3 // 2, v * 2) if lo <= s < hi]
        v *= 2
    return tuple(sorted(set(out) | {hi}))


def bytes_sizes(hi: int, quick: bool, lo: int = MIN_BYTES) -> tuple[int, ...]:
    """Message sizes from ``lo`` to ``hi``: x16 steps (quick) or x4 steps (full)."""
    _check_range(lo, hi)
    step = 16 if quick else 4
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= step
    return tuple(out + [hi])


def _check_range(lo: int, hi: int) -> None:
    if int(lo) != lo or int(hi) != hi or lo < 1 or hi < lo:
        raise ExeGPTError(f"grid range [{lo!r}, {hi!r}] must be integers with 1 <= lo <= hi")


@dataclass(frozen=True, slots=True)
class Grid:
    """The sizes one sweep measures. Every axis: strictly increasing integers >= 1."""

    batches: tuple[int, ...]
    """Batch axis of attn_encode and attn_decode (prompts, or decode rows)."""
    seqs: tuple[int, ...]
    """Prompt lengths of attn_encode (tokens per prompt)."""
    contexts: tuple[int, ...]
    """KV lengths attended by one decode step (attn_decode), counting the new token."""
    tokens: tuple[int, ...]
    """Token counts of dense_encode, dense_decode and lm_head."""
    bytes: tuple[int, ...]
    """Message sizes of allreduce, send_recv and kv_handoff (bytes)."""

    def __post_init__(self):
        for name in ("batches", "seqs", "contexts", "tokens", "bytes"):
            axis = getattr(self, name)
            try:
                values = tuple(axis)
            except TypeError:
                raise ExeGPTError(f"grid axis {name} must be a sequence of sizes, got {axis!r}") from None
            if not values:
                raise ExeGPTError(f"grid axis {name} is empty")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
                    raise ExeGPTError(f"grid axis {name} holds {v!r}; sizes must be integers >= 1")
            values = tuple(int(v) for v in values)
            if any(b <= a for a, b in zip(values, values[1:])):
                raise ExeGPTError(f"grid axis {name} must be strictly increasing, got {list(values)[:8]}")
            object.__setattr__(self, name, values)

    @property
    def max_rows(self) -> int:
        """Most cache rows any attention point needs."""
        return self.batches[-1]

    @property
    def max_len(self) -> int:
        """Longest cache row any attention point needs."""
        return max(self.seqs[-1], self.contexts[-1])

    def num_points(self, num_tp: int = 1) -> int:
        """Measurements of the per-layer kernels for ``num_tp`` TP degrees, plus the LM head."""
        per_tp = len(self.batches) * (len(self.seqs) + len(self.contexts)) + 2 * len(self.tokens)
        return num_tp * per_tp + len(self.tokens)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


def make_grid(shape: ModelShape, quick: bool = False, max_batch: int | None = None,
              max_tokens: int | None = None, max_bytes: int | None = None, breaks: tuple[int, ...] = (),
              max_seq: int | None = None, max_context: int | None = None) -> Grid:
    """The default grid for ``shape``: attention axes up to ``shape.max_seq_len`` (or ``max_seq`` prompt tokens and
    ``max_context`` context tokens, what a workload reaches), batches up to 128 (quick) or 256 (full), tokens up
    to 4096 / 16384 (dense tables extrapolate linearly beyond), messages up to 16 MiB / 256 MiB.

    ``breaks``: token counts where the backend changes how it computes a layer (``runner.cpu_kernels.row_breaks``:
    the last count of one way and the first of the next). They join the token axis, so that interpolation never
    straddles a step in time. NOTE (``tiny`` on 2 AVX2 cores, when the kernels took up to 32 rows): the rest of a
    decode layer took 0.22 ms at 32 rows (one fused kernel call) and 0.73 ms at 64 (torch's ops), so without 32
    and 33 on the axis a 40-row step was costed at 0.35 ms; plans decoding 32-82 rows ran 1.19-1.35x their
    predicted decode step."""
    sizes = quick_sizes if quick else full_sizes
    max_batch = max_batch or (QUICK_MAX_BATCH if quick else FULL_MAX_BATCH)
    max_tokens = max_tokens or (QUICK_MAX_TOKENS if quick else FULL_MAX_TOKENS)
    max_bytes = max_bytes or (QUICK_MAX_BYTES if quick else FULL_MAX_BYTES)

    def lengths(hi: int) -> tuple[int, ...]:
        # Sequence axes are sparse even in the full grid: attention is smooth (linear / quadratic) in length.
        out = quick_sizes(hi)
        if not quick:
            out = tuple(sorted(set(out) | {3 * s // 2 for s in out if s >= 16 and 3 * s // 2 < hi}))
        return out

    tokens = sizes(max_tokens)
    tokens = tuple(sorted(set(tokens) | {b for b in breaks if 1 <= b < tokens[-1]}))
    return Grid(batches=sizes(max_batch), seqs=lengths(min(max_seq or shape.max_seq_len, shape.max_seq_len)),
                contexts=lengths(min(max_context or shape.max_seq_len, shape.max_seq_len)), tokens=tokens,
                bytes=bytes_sizes(max_bytes, quick))


def fitting_batch(memory_bytes: float, weights_bytes: float, kv_bytes_per_token: float, context: int,
                  limit: int) -> int:
    """The largest batch (at most ``limit``, at least 1) whose KV cache of ``context`` tokens a row fits in
    ``memory_bytes`` beside the weights: a larger batch is one no plan on this device can run."""
    free = memory_bytes - weights_bytes
    if free <= 0 or kv_bytes_per_token <= 0:
        return 1 if free <= 0 else limit
    return int(max(1, min(limit, free // (kv_bytes_per_token * context))))


def tp_degrees_for(shape: ModelShape, limit: int = 8) -> tuple[int, ...]:
    """Every TP degree up to ``limit`` that divides both head counts (whole heads per rank)."""
    return tuple(tp for tp in range(1, limit + 1) if shape.valid_tp(tp))
