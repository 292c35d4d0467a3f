"""The pairwise interference of a prefill and a decode running at once on one device (Splitwiser's two processes):
each phase's step time alone and beside the other, per batch size and thread (or SM) split, as the profiler
measured it (``profiler.interference``).

Two factors per phase come out of it, both against the kernel tables' condition (one process alone with
``base_threads``):
  * ``scale``: the phase alone on its share of the device (``threads`` of ``cores``) over the tables' time;
  * ``kappa``: how much longer the phase takes while the other phase computes beside it, over alone, minus one.
The simulated engine multiplies a phase's step by ``scale`` and adds ``kappa`` times the part of it the other
process computes through (``exegpt.policies.splitwiser``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ExeGPTError

PHASES = ("prefill", "decode")


def _floats(v, name: str, n: int) -> tuple[float, ...]:
    v = tuple(float(x) for x in v)
    if len(v) != n or not all(np.isfinite(x) and x > 0 for x in v):
        raise ExeGPTError(f"phase interference: {name} must hold {n} positive seconds, got {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class PhasePair:
    """One thread split measured: the prefill process with ``prefill_threads``, the decode process with
    ``decode_threads``; per batch size, each phase's step alone and with the other phase running beside it."""

    prefill_threads: int
    decode_threads: int
    prefill_alone_s: tuple[float, ...]
    decode_alone_s: tuple[float, ...]
    prefill_beside_s: tuple[float, ...]
    decode_beside_s: tuple[float, ...]

    def to_dict(self) -> dict:
        return {f: list(getattr(self, f)) if isinstance(getattr(self, f), tuple) else getattr(self, f)
                for f in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class PhaseInterference:
    """Every thread split measured on one device, at the same batch sizes."""

    cores: int
    """Cores (CPU) or 100 (a GPU's SM percentage) the splits share."""
    base_threads: int
    """Threads of the kernel tables' condition (one process alone)."""
    prompt_len: int
    """Tokens of each prompt a prefill step held."""
    context_len: int
    """Context of each row a decode step attended over."""
    batches: tuple[int, ...]
    prefill_base_s: tuple[float, ...]
    decode_base_s: tuple[float, ...]
    pairs: tuple[PhasePair, ...]

    def __post_init__(self):
        n = len(self.batches)
        if not n or list(self.batches) != sorted(set(self.batches)) or self.batches[0] < 1:
            raise ExeGPTError(f"phase interference: batches must be increasing sizes >= 1, got {self.batches!r}")
        for f in ("prefill_base_s", "decode_base_s"):
            object.__setattr__(self, f, _floats(getattr(self, f), f, n))
        if not self.pairs:
            raise ExeGPTError("phase interference: no thread split measured")
        for p in self.pairs:
            if not (1 <= p.prefill_threads <= self.cores and 1 <= p.decode_threads <= self.cores):
                raise ExeGPTError(f"phase interference: split {p.prefill_threads}+{p.decode_threads} exceeds the "
                                  f"device's {self.cores} cores")
            for f in ("prefill_alone_s", "decode_alone_s", "prefill_beside_s", "decode_beside_s"):
                _floats(getattr(p, f), f, n)

    def pair(self, prefill_threads: int, decode_threads: int) -> PhasePair:
        """The split measured nearest to (``prefill_threads``, ``decode_threads``)."""
        return min(self.pairs, key=lambda p: (abs(p.prefill_threads - prefill_threads) +
                                              abs(p.decode_threads - decode_threads)))

    def factors(self, prefill_threads: int, decode_threads: int, phase: str, rows: float) -> tuple[float, float]:
        """(scale, kappa) of ``phase`` at a step of ``rows`` (interpolated in log batch size, clamped)."""
        if phase not in PHASES:
            raise ExeGPTError(f"phase {phase!r} unknown; expected one of {PHASES}")
        p = self.pair(prefill_threads, decode_threads)
        x = np.log(np.asarray(self.batches, dtype=float))
        at = float(np.log(max(float(rows), 1.0)))
        alone = np.interp(at, x, getattr(p, f"{phase}_alone_s"))
        beside = np.interp(at, x, getattr(p, f"{phase}_beside_s"))
        base = np.interp(at, x, getattr(self, f"{phase}_base_s"))
        return float(alone / base), float(max(0.0, beside / alone - 1.0))

    def to_dict(self) -> dict:
        return {"cores": self.cores, "base_threads": self.base_threads, "prompt_len": self.prompt_len,
                "context_len": self.context_len, "batches": list(self.batches),
                "prefill_base_s": list(self.prefill_base_s), "decode_base_s": list(self.decode_base_s),
                "pairs": [p.to_dict() for p in self.pairs]}

    @classmethod
    def from_dict(cls, d: dict) -> PhaseInterference:
        try:
            pairs = tuple(PhasePair(int(p["prefill_threads"]), int(p["decode_threads"]),
                                    *(tuple(p[f]) for f in ("prefill_alone_s", "decode_alone_s", "prefill_beside_s",
                                                            "decode_beside_s"))) for p in d["pairs"])
            return cls(int(d["cores"]), int(d["base_threads"]), int(d["prompt_len"]), int(d["context_len"]),
                       tuple(int(b) for b in d["batches"]), tuple(d["prefill_base_s"]), tuple(d["decode_base_s"]),
                       pairs)
        except (KeyError, TypeError) as e:
            raise ExeGPTError(f"phase interference JSON misses or mistypes {e}") from None
