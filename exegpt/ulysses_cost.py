"""Shift Parallelism's base-mode layer from its measured tables (``profiler.sp_layer``), where the profile has them.

The profiler times a whole Ulysses layer (``sp_encode``: a prefill of one prompt of T tokens; ``sp_decode``: a
decode step of B rows at context C) on SP = P ranks, TP 1 within. A step's attention depends on more than its
token count (prompt lengths, contexts), so the cost model keeps its attention tables for that part and takes the
rest of the layer (projections, MLP, the two all-to-alls, the rank's overheads) from the measurement:

    rest(T) = sp_encode(T) - attn_encode(P; 1, T)
    rest(B) = mean over C of [sp_decode(B, C) - attn_decode(P; B, C)]

linear between the measured points and beyond them (the rest grows linearly in tokens: dense work and messages).
``composed_vs_measured`` sets the kernel-table composition beside each measurement.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .profile import Kernel, Profile


class CostModel(Protocol):
    """What these functions read of an ``exegpt.cost.CostModel`` (which calls them: no import back)."""

    profile: Profile

    def _get(self, kernel: Kernel, tp: int, x, y=None): ...

    def ulysses_comm(self, sp: int, tp: int, tokens): ...


def has_measured(cost: CostModel, sp: int, tp: int) -> bool:
    """Whether the profile measured the base-mode layer of this stage (SP = the stage's devices, TP 1 within)."""
    return sp == tp and cost.profile.has(Kernel.SP_ENCODE, tp) and cost.profile.has(Kernel.SP_DECODE, tp)


def _linear(xs: np.ndarray, ys: np.ndarray, x) -> np.ndarray:
    """Piecewise linear through (xs, ys), its end segments extended."""
    x = np.asarray(x, dtype=float)
    if len(xs) == 1:
        return np.full(x.shape, ys[0])
    inside = np.interp(x, xs, ys)
    lo = ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    hi = ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return np.maximum(np.where(x < xs[0], lo, np.where(x > xs[-1], hi, inside)), 0.0)


def encode_rest(cost: CostModel, tp: int, tokens) -> np.ndarray:
    """The measured prefill layer less its attention, at ``tokens`` tokens a step."""
    table = cost.profile.table(Kernel.SP_ENCODE, tp)
    xs = np.asarray(table.xs)
    attn, _ = cost._get(Kernel.ATTN_ENCODE, tp, np.ones_like(xs), xs)
    return _linear(xs, np.asarray(table.seconds) - attn, tokens)


def decode_rest(cost: CostModel, tp: int, rows) -> np.ndarray:
    """The measured decode layer less its attention, at ``rows`` rows a step."""
    table = cost.profile.table(Kernel.SP_DECODE, tp)
    b, c = np.meshgrid(np.asarray(table.xs), np.asarray(table.ys), indexing="ij")
    attn, _ = cost._get(Kernel.ATTN_DECODE, tp, b, c)
    rest = (np.asarray(table.seconds) - attn).mean(axis=1)
    return _linear(np.asarray(table.xs), rest, rows)


def composed_vs_measured(cost: CostModel, tp: int) -> list[tuple[str, float, float]]:
    """(point, composed seconds, measured seconds) at every measured point of the stage of ``tp`` devices at
    SP = ``tp``: the kernel-table composition (``CostModel.ulysses_comm`` and the dense and attention tables)
    against the measured layer."""
    out = []
    table = cost.profile.table(Kernel.SP_ENCODE, tp)
    for t, m in zip(table.xs, table.seconds):
        dense, _ = cost._get(Kernel.DENSE_ENCODE, 1, np.ceil(t / tp))
        attn, _ = cost._get(Kernel.ATTN_ENCODE, tp, 1.0, t)
        comm, _ = cost.ulysses_comm(tp, tp, t)
        out.append((f"prefill {t:.0f} tokens", float(dense + attn + comm), float(m)))
    table = cost.profile.table(Kernel.SP_DECODE, tp)
    for i, b in enumerate(table.xs):
        for j, c in enumerate(table.ys):
            dense, _ = cost._get(Kernel.DENSE_DECODE, 1, np.ceil(b / tp))
            attn, _ = cost._get(Kernel.ATTN_DECODE, tp, b, c)
            comm, _ = cost.ulysses_comm(tp, tp, b)
            out.append((f"decode {b:.0f} rows at {c:.0f}", float(dense + attn + comm), float(table.seconds[i][j])))
    return out
