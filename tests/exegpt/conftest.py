"""Factories for solver tests: a small synthetic profile with realistic shapes (fixed cost + linear
terms, quadratic prefill attention), built from a seed so that randomized cases differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exegpt import Kernel, Profile, ProfileTable

BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SEQ = (1, 16, 64, 128, 256, 512, 1024, 2048)
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
BYTES = (1e3, 1e5, 1e7, 1e9)


def make_profile(model="opt-13b", device="A40", tps=(1, 2, 4), seed=0, noise=0.0, step_overhead_s=2e-4,
                 padded=False, handoff_on_compute=False, padded_decode=None):
    """A GPU-like synthetic profile for ``model``: per-layer seconds on one rank at degree tp."""
    rng = np.random.default_rng(seed)
    scale = 1.0 + 0.3 * rng.random()

    def jitter(a):
        return a * (1 + noise * rng.standard_normal(np.shape(a))) if noise else a

    tables = []
    for tp in tps:
        b, s = np.meshgrid(BATCH, SEQ, indexing="ij")
        enc = jitter(scale * (2e-5 + 1e-9 * b * s * s / tp))
        dec = jitter(scale * (1e-5 + 2e-9 * b * s / tp))
        tok = np.asarray(TOKENS, float)
        dense = jitter(scale * (4e-4 / tp + 2e-7 * tok / tp))
        tables += [ProfileTable(Kernel.ATTN_ENCODE, tp, BATCH, SEQ, tuple(map(tuple, enc))),
                   ProfileTable(Kernel.ATTN_DECODE, tp, BATCH, SEQ, tuple(map(tuple, dec))),
                   ProfileTable(Kernel.ATTN_CROSS, tp, BATCH, SEQ, tuple(map(tuple, dec))),
                   ProfileTable(Kernel.DENSE_ENCODE, tp, TOKENS, (), tuple(dense), extrapolate=True),
                   ProfileTable(Kernel.DENSE_DECODE, tp, TOKENS, (), tuple(dense), extrapolate=True)]
        if tp > 1:
            tables.append(ProfileTable(Kernel.ALLREDUCE, tp, BYTES, (),
                                       tuple(1e-5 + np.asarray(BYTES) / 20e9), extrapolate=True))
    tables.append(ProfileTable(Kernel.LM_HEAD, 1, TOKENS, (), tuple(1e-3 + 1e-7 * np.asarray(TOKENS, float)),
                               extrapolate=True))
    tables.append(ProfileTable(Kernel.SEND_RECV, 1, BYTES, (), tuple(1e-5 + np.asarray(BYTES) / 20e9),
                               extrapolate=True))
    tables.append(ProfileTable(Kernel.KV_HANDOFF, 1, BYTES, (), tuple(5e-5 + np.asarray(BYTES) / 10e9),
                               extrapolate=True))
    return Profile(model=model, device=device, tables=tuple(tables), step_overhead_s=step_overhead_s,
                   source="synthetic", padded_batches=padded,
                   padded_decode=padded if padded_decode is None else padded_decode,
                   handoff_on_compute=handoff_on_compute)


def tiny_cpu_profile() -> Profile:
    """The profile of the ``tiny`` preset measured on a CPU, shipped with the tests (``tests/data/tiny-cpu.json``)."""
    return Profile.load(Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json")


@pytest.fixture
def profile():
    return make_profile()
