"""Request pools whose prompts share prefixes, with a stated prefix-sharing ratio and compute density.

Offline batch inference knows every request in advance, token ids included, and the prompts of real pools share
prefixes: few-shot templates (a long instruction with examples, then one question), system prompts (a shorter
preamble shared by a larger group) and multi-turn conversations (each turn's prompt is the previous turn's prompt,
its answer and a new message). ``shared_prefix_pool`` draws such a pool: requests are compute-heavy (long prompt,
short output) or memory-heavy (short prompt, long output); the share of memory-heavy ones sets the pool's compute
density and the prefixes' length the sharing ratio, both fitted to the targets by bisection. The requests of one
group (one task) are of one class. ``random_prompt_pool``
is the control: a workload's (or trace's) lengths with uniformly random prompts (almost no sharing), the requests
``runner.requests.make_requests`` draws for the same seed.

A pool carries token ids from here through both engines: ``run_simulated(plan, lengths=pool.lengths,
prompts=pool.prompts)`` and ``runner.run_plan(plan, requests=runner.requests.requests_of(pool))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrivals import request_stream
from .blend_tree import pool_density, sharing_ratio
from .errors import ExeGPTError
from .workload import Workload

KINDS = ("few-shot", "system", "multi-turn")


@dataclass(frozen=True, eq=False)
class PrefixPool:
    """Requests with their prompts' token ids, in arrival order (ids 0, 1, ...)."""

    prompts: tuple[tuple[int, ...], ...]
    outputs: tuple[int, ...]
    """Tokens each request generates (the prefill's first token included)."""
    sharing: float
    """The optimal prefix-sharing ratio: the share of prompt tokens a perfect prefix cache skips."""
    density: float
    """The pool's compute density (``blend_tree.pool_density``): above 1 compute-bound, below memory-bound."""
    name: str = ""

    def __post_init__(self):
        if not self.prompts:
            raise ExeGPTError("a request pool needs at least one request, got none")
        if len(self.outputs) != len(self.prompts) or min(self.outputs) < 1 or min(map(len, self.prompts)) < 1:
            raise ExeGPTError("a request pool needs one output length >= 1 per prompt of >= 1 token")

    @property
    def lengths(self) -> np.ndarray:
        """``[n, 2]`` (input, output) tokens."""
        return np.array([(len(q), d) for q, d in zip(self.prompts, self.outputs)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """What ``shared_prefix_pool`` draws."""

    num_requests: int
    sharing: float
    """Target optimal prefix-sharing ratio, in [0, 0.9]."""
    density: float
    """Target pool density (> 0), reached by the share of memory-heavy requests."""
    kappa: float
    """The model on the device (``blend_tree.machine_kappa``)."""
    max_len: int
    """Prompt plus output of a request at most."""
    vocab_size: int
    group_size: int = 8
    """Requests sharing one few-shot template (system prompts: twice as many; conversations: up to as many turns)."""
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.num_requests, bool) or not isinstance(self.num_requests, int) or self.num_requests < 1:
            raise ExeGPTError(f"a workload with no requests: num_requests={self.num_requests!r}, expected a whole "
                              f"number >= 1")
        if not 0.0 <= self.sharing <= 0.9:
            raise ExeGPTError(f"sharing={self.sharing!r} must be a ratio in [0, 0.9]")
        if not self.density > 0:
            raise ExeGPTError(f"density={self.density!r} must be > 0")
        if not isinstance(self.max_len, int) or self.max_len < 16:
            raise ExeGPTError(f"max_len={self.max_len!r} must be a whole number >= 16 tokens")
        if self.group_size < 2 or self.vocab_size < 2 or not self.kappa > 0:
            raise ExeGPTError(f"group_size={self.group_size!r} and vocab_size={self.vocab_size!r} must be >= 2 and "
                              f"kappa={self.kappa!r} > 0")


def shared_prefix_pool(opts: PoolOptions) -> PrefixPool:
    """A pool of ``opts.num_requests`` requests fitted to ``opts.sharing`` and ``opts.density``."""
    n, g, L = opts.num_requests, opts.group_size, opts.max_len
    rng = np.random.default_rng(opts.seed)
    u_p, u_d = rng.random(n), rng.random(n)
    # Groups of consecutive requests; conversations only where sharing is high enough to hold them. A group is one
    # task, so its requests are of one class: a template's answers are alike (all short, or all long).
    weights = np.array([0.45, 0.35, 0.2]) if opts.sharing >= 0.2 else np.array([0.55, 0.45, 0.0])
    groups, i = [], 0
    while i < n:
        kind = KINDS[int(rng.choice(3, p=weights))]
        size = min(n - i, 2 * g if kind == "system" else g)
        groups.append((kind, list(range(i, i + size))))
        i += size
    # Memory-heavy: the requests with ``u_class < f``: whole groups in a random order, one member at a time.
    u_class = np.empty(n)
    for rank, (_, members) in zip(rng.permutation(len(groups)), groups):
        u_class[members] = (rank + (np.arange(len(members)) + 0.5) / len(members)) / len(groups)

    def lengths(f: float, z: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        heavy = u_class < f  # memory-heavy: short prompt, long output (``z`` times)
        p = np.maximum((np.where(heavy, 0.10 + 0.15 * u_p, 0.55 + 0.3 * u_p) * L).astype(int), 4)
        d = np.where(heavy, (0.45 + 0.3 * u_d) * z, 0.01 + 0.04 * u_d) * L
        return p, np.clip(d.astype(int), 1, L - p)

    def structure(x: float, p: np.ndarray) -> list[tuple[str, list[int], int]]:
        """Per group: kind, members (conversations: by prompt length) and the shared prefix (templates)."""
        out = []
        for kind, members in groups:
            if kind == "multi-turn" or len(members) < 2:
                out.append((kind, sorted(members, key=lambda r: p[r]), 0))
                continue
            frac = x * len(members) / (len(members) - 1)
            out.append((kind, members, int(min(frac * np.mean(p[members]), max(p[members]) - 1))))
        return out

    def distinct(x: float, p: np.ndarray) -> int:
        total = 0
        for kind, members, a in structure(x, p):
            if kind == "multi-turn":
                total += int(p[members[-1]])
            else:  # a member shorter than the template shares all of its prompt but the last token
                own = np.minimum(a, p[members] - 1)
                total += int(own.max()) + int(np.sum(p[members] - own))
        return total

    def measures(x: float, f: float, z: float = 1.0) -> tuple[float, float]:
        p, d = lengths(f, z)
        dist = distinct(x, p)
        mem = float(np.sum(p * d + d * d / 2.0))
        return 1.0 - dist / p.sum(), opts.kappa * (dist + d.sum()) / mem

    x, f = 0.5, 0.5
    for _ in range(3):  # the two measures depend a little on each other: alternate
        x = _bisect(lambda v: measures(v, f)[0] - opts.sharing, 0.0, 1.0)
        f = _bisect(lambda v: opts.density - measures(x, v)[1], 0.0, 1.0)
    # The share of memory-heavy groups moves the density in steps; their outputs' length closes the gap.
    z = _bisect(lambda v: opts.density - measures(x, f, v)[1], 0.6, 1.3)
    p, d = lengths(f, z)
    prompts: list[tuple[int, ...]] = [()] * n
    for kind, members, a in structure(x, p):
        if kind == "multi-turn":  # each turn extends the one before
            prev: tuple[int, ...] = ()
            for r in members:
                prev = prev + _tokens(rng, int(p[r]) - len(prev), opts.vocab_size)
                prompts[r] = prev
        else:
            head = _tokens(rng, a, opts.vocab_size)
            for r in members:
                k = min(a, int(p[r]) - 1)
                prompts[r] = head[:k] + _tokens(rng, int(p[r]) - k, opts.vocab_size)
    order = rng.permutation(n)  # the pool arrives shuffled: arrival order is not the tree's
    prompts = [prompts[r] for r in order]
    outs = [int(d[r]) for r in order]
    return PrefixPool(tuple(prompts), tuple(outs), sharing_ratio(prompts), pool_density(prompts, outs, opts.kappa),
                      f"shared s={opts.sharing:g} rho={opts.density:g}")


def random_prompt_pool(workload: Workload, num_requests: int, vocab_size: int, kappa: float, seed: int = 0
                       ) -> PrefixPool:
    """The control: ``workload``'s lengths with uniformly random prompts (the requests ``runner.requests.
    make_requests`` draws for the same seed)."""
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise ExeGPTError(f"a workload with no requests: num_requests={num_requests!r}, expected a whole number "
                          f">= 1")
    stream = request_stream(workload, num_requests, seed)
    prompts = [tuple(int(t) for t in stream.rng.integers(0, vocab_size, size=int(i))) for i, _ in stream.lengths]
    outs = [int(o) for _, o in stream.lengths]
    return PrefixPool(tuple(prompts), tuple(outs), sharing_ratio(prompts), pool_density(prompts, outs, kappa),
                      workload.name)


def _tokens(rng: np.random.Generator, k: int, vocab: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.integers(0, vocab, size=max(k, 0)))


def _bisect(fn, lo: float, hi: float, iters: int = 30) -> float:
    """The root of the increasing ``fn`` in [lo, hi] (an end when it has none)."""
    if fn(lo) >= 0:
        return lo
    if fn(hi) <= 0:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) < 0 else (lo, mid)
    return (lo + hi) / 2
