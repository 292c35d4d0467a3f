"""Distribution: a discrete probability mass function over sequence lengths (tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from .checks import MAX_TOKENS, number, whole
from .errors import ExeGPTError
from .jsonfile import known_fields

_SUM_TOL = 1e-6


@dataclass(frozen=True, slots=True)
class Distribution:
    """A length PMF: ``probs[i]`` is the probability that a sequence has ``lengths[i]`` tokens."""

    lengths: tuple[int, ...]
    """Strictly increasing lengths, each >= 1."""
    probs: tuple[float, ...]
    """Probabilities, same length as ``lengths``, each >= 0, summing to 1 within 1e-6."""

    def __post_init__(self):
        if len(self.lengths) == 0:
            raise ExeGPTError("a length distribution needs at least one length, got none")
        if len(self.lengths) != len(self.probs):
            raise ExeGPTError(f"lengths ({len(self.lengths)}) and probs ({len(self.probs)}) differ in size")
        for x in self.lengths:
            if int(x) != x or x < 1:
                raise ExeGPTError(f"sequence length {x!r} is not a whole number of tokens >= 1")
        if any(b <= a for a, b in zip(self.lengths, self.lengths[1:])):
            raise ExeGPTError(f"lengths must be strictly increasing, got {self.lengths[:8]}...")
        if self.lengths[-1] > MAX_TOKENS:
            raise ExeGPTError(f"sequence length {self.lengths[-1]:,} is above the {MAX_TOKENS:,} tokens any model "
                              f"holds")
        for p in self.probs:
            if not np.isfinite(p) or p < 0:
                raise ExeGPTError(f"probability {p!r} is not a finite number >= 0")
        total = float(sum(self.probs))
        if abs(total - 1.0) > _SUM_TOL:
            raise ExeGPTError(f"probabilities sum to {total:.9g}, expected 1")

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_pmf(cls, lengths, probs) -> Distribution:
        """From parallel sequences; zero-probability lengths are dropped."""
        lengths = np.asarray(lengths)
        probs = np.asarray(probs, dtype=float)
        if lengths.shape != probs.shape:
            raise ExeGPTError(f"lengths {lengths.shape} and probs {probs.shape} differ in shape")
        keep = probs > 0
        return cls(tuple(int(x) for x in lengths[keep]), tuple(float(p) for p in probs[keep]))

    @classmethod
    def from_samples(cls, samples) -> Distribution:
        """The empirical PMF of observed lengths (each a whole number >= 1)."""
        arr = np.asarray(samples)
        if arr.size == 0:
            raise ExeGPTError("cannot build a length distribution from zero samples")
        if not np.issubdtype(arr.dtype, np.number):
            raise ExeGPTError(f"length samples must be numbers, got dtype {arr.dtype}")
        bad = arr[(arr < 1) | (arr != np.round(arr)) | (arr > MAX_TOKENS)]
        if bad.size:
            raise ExeGPTError(f"sequence length {bad[0].item()!r} is not a whole number of tokens in "
                              f"[1, {MAX_TOKENS:,}]")
        values, counts = np.unique(arr.astype(np.int64), return_counts=True)
        return cls(tuple(int(v) for v in values), tuple(float(c) for c in counts / counts.sum()))

    @classmethod
    def truncated_normal(cls, mean: float, std: float, max_len: int) -> Distribution:
        """The paper's length model: a normal(mean, std) truncated below at 0 and above at ``max_len``,
        discretised on 1..max_len (length ``n`` takes the mass of ``(n - 1, n]``)."""
        mean = number(mean, "mean length", lo=0, lo_open=True)
        std = number(std, "length std", lo=0)
        max_len = whole(max_len, "max length", 1, MAX_TOKENS)
        if mean > max_len:
            raise ExeGPTError(f"mean length {mean:g} is above the max length {max_len}; expected max >= mean")
        if std == 0:
            n = min(max(int(round(mean)), 1), max_len)
            return cls((n,), (1.0,))
        edges = np.arange(0, max_len + 1, dtype=float)
        cdf = stats.norm.cdf(edges, loc=mean, scale=std)
        mass = np.diff(cdf)
        if mass.sum() <= 0:
            raise ExeGPTError(f"truncated normal(mean={mean}, std={std}) has no mass on 1..{max_len}")
        return cls.from_pmf(np.arange(1, max_len + 1), mass / mass.sum())

    @classmethod
    def fit(cls, samples, max_len: int | None = None) -> Distribution:
        """The truncated normal (``truncated_normal``) most likely to have produced ``samples`` (whole lengths
        >= 1), truncated at ``max_len`` (default: the longest sample); ``fit_truncated_normal`` gives its
        parameters."""
        return cls.truncated_normal(*fit_truncated_normal(samples, max_len))

    # --- statistics ---------------------------------------------------------------------------

    @property
    def lengths_array(self) -> np.ndarray:
        return np.asarray(self.lengths, dtype=np.int64)

    @property
    def probs_array(self) -> np.ndarray:
        return np.asarray(self.probs, dtype=float)

    @property
    def max(self) -> int:
        return self.lengths[-1]

    @property
    def min(self) -> int:
        return self.lengths[0]

    def mean(self) -> float:
        return float(np.dot(self.lengths_array, self.probs_array))

    def moment(self, k: int) -> float:
        return float(np.dot(self.lengths_array.astype(float) ** k, self.probs_array))

    def std(self) -> float:
        return float(np.sqrt(max(self.moment(2) - self.mean() ** 2, 0.0)))

    def cdf(self, x) -> np.ndarray | float:
        """P(length <= x)."""
        c = np.concatenate([[0.0], np.cumsum(self.probs_array)])
        idx = np.searchsorted(self.lengths_array, x, side="right")
        return c[idx]

    def quantile(self, q: float) -> int:
        """The smallest length whose CDF reaches ``q`` (0 < q <= 1)."""
        if not (0 < q <= 1):
            raise ExeGPTError(f"quantile {q!r} must be in (0, 1]")
        c = np.cumsum(self.probs_array)
        i = int(np.searchsorted(c, q - 1e-12, side="left"))
        return self.lengths[min(i, len(self.lengths) - 1)]

    def expected_max(self, n: int) -> float:
        """E[max of n independent draws]: how long a static batch of n sequences runs."""
        if n < 1:
            raise ExeGPTError(f"batch size {n!r} must be >= 1")
        lengths = self.lengths_array
        c = np.cumsum(self.probs_array)
        c_prev = np.concatenate([[0.0], c[:-1]])
        return float(np.dot(lengths, np.clip(c, 0, 1) ** n - np.clip(c_prev, 0, 1) ** n))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self.lengths_array, size=n, p=self.probs_array)

    def scaled(self, factor: float, max_len: int | None = None) -> Distribution:
        """Every length multiplied by ``factor`` (rounded, at least 1, at most ``max_len``)."""
        if not (factor > 0):
            raise ExeGPTError(f"scale factor {factor!r} must be > 0")
        new = np.maximum(np.round(self.lengths_array * factor), 1).astype(np.int64)
        if max_len is not None:
            new = np.minimum(new, max_len)
        values, inv = np.unique(new, return_inverse=True)
        probs = np.zeros(len(values))
        np.add.at(probs, inv, self.probs_array)
        return Distribution(tuple(int(v) for v in values), tuple(float(p) for p in probs / probs.sum()))

    def to_dict(self) -> dict:
        return {"lengths": list(self.lengths), "probs": list(self.probs)}

    @classmethod
    def from_dict(cls, d: dict) -> Distribution:
        known_fields(d, ("lengths", "probs"), "a distribution")
        try:
            return cls(tuple(int(x) for x in d["lengths"]), tuple(float(p) for p in d["probs"]))
        except (KeyError, TypeError) as e:
            raise ExeGPTError(f"a distribution needs 'lengths' and 'probs' lists, got {d!r:.80}") from e

    def __repr__(self) -> str:
        return (f"Distribution(mean={self.mean():.1f}, std={self.std():.1f}, "
                f"p99={self.quantile(0.99)}, max={self.max}, support={len(self.lengths)})")


def fit_truncated_normal(samples, max_len: int | None = None) -> tuple[float, float, int]:
    """(mean, std, max_len) of the normal whose truncation to 1..max_len, discretised as ``truncated_normal``
    does, gives ``samples`` the highest likelihood (scipy's minimiser, from the samples' own mean and std). The
    mean and std are the underlying normal's, which truncation hides: a trace of short outputs cut at a maximum
    has a sample mean above the normal's."""
    lengths = Distribution.from_samples(samples)  # validates: whole numbers >= 1
    n, p = lengths.lengths_array, lengths.probs_array
    top = int(n.max()) if max_len is None else int(max_len)
    if top < n.max():
        raise ExeGPTError(f"max_len={max_len!r} is below the longest sample ({int(n.max())})")
    if len(n) == 1:
        return float(n[0]), 0.0, top

    def nll(x):
        mu, sigma = x[0], np.exp(x[1])
        mass = stats.norm.cdf((n - mu) / sigma) - stats.norm.cdf((n - 1 - mu) / sigma)
        total = stats.norm.cdf((top - mu) / sigma) - stats.norm.cdf(-mu / sigma)
        return -float(np.dot(p, np.log(np.maximum(mass, 1e-300)))) + float(np.log(max(total, 1e-300)))

    m, sd = lengths.mean(), float(np.sqrt(max(lengths.moment(2) - lengths.mean() ** 2, 0.25)))
    res = optimize.minimize(nll, x0=[m, np.log(sd)], method="Nelder-Mead", options=dict(xatol=1e-4, fatol=1e-9),
                            bounds=[(1e-3, top), (None, None)])  # the mean a truncated normal may have
    return float(res.x[0]), float(np.exp(res.x[1])), top
