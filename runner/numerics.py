"""Batch-invariant numerics: a request's tokens the same alone or batched with any others, in any precision.

Batched serving computes each request's rows beside other rows, and the fastest kernel for a call depends on how
many rows it has: the CPU decode kernels up to a few rows and oneDNN beyond, MKL's fp32 GEMM with a blocking that
depends on the rows, attention over keys padded to the longest row. Each rounds a little differently, and in bf16
a rounding that differs flips a near-tied greedy token now and then, after which the request's text diverges.

``batch_invariant()`` (``RunOptions(batch_invariant=True)``, ``exegpt-run --batch-invariant``) makes every row's
bits independent of the others, at a cost in speed: every Linear runs on oneDNN's prepacked weight (whose result
for a row does not depend on how many rows it has), the CPU kernels are off, and causal self-attention runs one
query of one row at a time over exactly that row's prefix, the same call in a prefill, a prompt chunk and a
decode step. The tokens then equal single-request decoding's under the same mode (tests/runner/test_executors).
CPU ranks, fp32 or bf16 (``runner.cpu_kernels.check_batch_invariant``).
"""

from __future__ import annotations

from contextlib import contextmanager

_on = False


def on() -> bool:
    """Whether batch-invariant numerics are in force in this process."""
    return _on


def set_batch_invariant(value: bool) -> None:
    global _on
    _on = bool(value)


@contextmanager
def batch_invariant(value: bool = True):
    """Batch-invariant numerics inside the block (restored after)."""
    before = _on
    set_batch_invariant(value)
    try:
        yield
    finally:
        set_batch_invariant(before)

