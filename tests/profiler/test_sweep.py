"""A quick sweep of 'tiny' -> an exegpt.Profile the solver accepts; bad input is one line."""

import json

import numpy as np
import pytest

from exegpt.errors import ExeGPTError
from exegpt.models import get_model
from exegpt.profile import AXES, REQUIRED, Kernel, Profile
from profiler import profile_model
from profiler.grid import Grid

SMALL_GRID = Grid(batches=(1, 2, 4, 8), seqs=(1, 4, 16, 64), contexts=(1, 8, 64, 512), tokens=(1, 4, 16, 64, 256),
                  bytes=(16, 4096))


@pytest.fixture(scope="module")
def tiny_profile() -> Profile:
    return profile_model("tiny", tp_degrees=(1, 2), quick=True, grid=SMALL_GRID, collectives=False,
                         progress=False, threads=1)


def test_profile_round_trips_and_has_every_kernel(tiny_profile):
    p = Profile.from_json(tiny_profile.to_json())
    assert p.model == "tiny" and p.device == "cpu" and p.dtype == "fp32" and p.source == "measured"
    assert p.device_memory_bytes > 0
    for k in REQUIRED:
        assert p.has(k, 1)
    assert p.supports_tp(1) and p.tp_degrees() == (1, 2)
    prov = p.provenance
    for key in ("torch_version", "torch_threads", "date", "grid", "device", "dtype", "spec", "split"):
        assert key in prov
    assert prov["torch_threads"] == 1 and prov["grid"]["batches"] == [1, 2, 4, 8]
    assert 0 <= p.step_overhead_s < 0.1
    from runner import cpu_kernels

    # the runner pads prefill; its decode rows attend their own prefix on the CPU kernels
    assert p.padded_batches and p.padded_decode is (cpu_kernels.load() is None)


def test_lookups_are_positive(tiny_profile):
    p = tiny_profile
    for tp in (1, 2):
        assert p.seconds(Kernel.ATTN_ENCODE, tp, 3, 40) > 0
        assert p.seconds(Kernel.ATTN_DECODE, tp, 5, 300) > 0
        assert p.seconds(Kernel.DENSE_ENCODE, tp, 100) > 0
        assert p.seconds(Kernel.DENSE_DECODE, tp, 5000) > 0  # extrapolates: linear in tokens
        assert p.seconds(Kernel.ATTN_DECODE, tp, 64, 512) > 0  # extrapolates in batch
    assert p.seconds(Kernel.LM_HEAD, 1, 6) > 0
    enc = p.seconds(Kernel.ATTN_ENCODE, 1, np.array([1, 8]), np.array([64, 64]))
    assert enc[1] >= enc[0]


def test_tables_have_spreads_and_axes(tiny_profile):
    for t in tiny_profile.tables:
        d = t.to_dict()
        assert d["axes"] == list(AXES[t.kernel])
        if t.kernel in (Kernel.ENGINE_ENCODE, Kernel.ENGINE_DECODE):
            assert np.all(np.asarray(t.seconds) >= 0)  # residuals of whole runs: no repeat spread, may be 0
            continue
        assert t.spread_s is not None
        assert np.all(np.asarray(t.seconds) > 0)
    enc = next(t for t in tiny_profile.tables if t.kernel is Kernel.ATTN_ENCODE and t.tp == 1)
    assert not enc.extrapolate  # the grid's seq axis stops below max_seq_len: no quadratic guesswork


def test_points_over_the_cpu_flops_cap_are_fitted_and_flagged():
    """Attention points over the CPU FLOP cap are not run: the cheapest MIN_POINTS are, and the rest are filled by
    the fit (linear in batch along a column), flagged in the table, the fit's held-out error in the provenance."""
    shape = get_model("tiny")
    grid = Grid(batches=(1, 2, 4, 8, 16, 32), seqs=(shape.max_seq_len,), contexts=(1,), tokens=(1,), bytes=(16,))
    from profiler import sweep

    old = sweep.CPU_ATTN_FLOPS_BUDGET[True]
    sweep.CPU_ATTN_FLOPS_BUDGET[True] = 1.0  # every point beyond the table's minimum is fitted, not run
    try:
        p = profile_model("tiny", quick=True, grid=grid, collectives=False, progress=False, threads=1,
                          engine=False)  # the kernel grid alone
    finally:
        sweep.CPU_ATTN_FLOPS_BUDGET[True] = old
    enc = next(t for t in p.tables if t.kernel is Kernel.ATTN_ENCODE)
    assert [row[0] for row in enc.fitted] == [False] * 4 + [True] * 2
    col = np.array([row[0] for row in enc.seconds])
    # on a line a + b B (a, b >= 0) fitted to the three largest measured batches (2, 4, 8): about twice batch 8
    b = (col[5] - col[4]) / 16
    assert b > 0 and col[4] - 16 * b >= -1e-12
    assert col[4] == pytest.approx(2 * col[3], rel=0.35)
    assert enc.extrapolate  # the seq axis reaches max_seq_len: only the batch axis can be exceeded
    fit = p.provenance["fits"]["attn_encode tp=1"]
    assert fit["held_out_error"] >= 0 and fit["fitted_cells"] == 2
    assert p.fit_error(Kernel.ATTN_ENCODE, 1) == fit["held_out_error"]
    back = Profile.from_json(p.to_json())  # the flags survive JSON
    assert next(t for t in back.tables if t.kernel is Kernel.ATTN_ENCODE).fitted == enc.fitted


@pytest.mark.parametrize("kwargs,match", [
    (dict(model_spec="no-such-model"), "unknown model"),
    (dict(model_spec="tiny-t5"), "encoder-decoder"),
    (dict(model_spec="tiny", tp_degrees=(3,)), "TP degree 3 does not divide"),
    (dict(model_spec="tiny", tp_degrees=(0,)), "must be an integer >= 1"),
    (dict(model_spec="tiny", tp_degrees=()), "no TP degree"),
    (dict(model_spec="tiny", dtype="fp8"), "dtype 'fp8' unknown"),
    (dict(model_spec="tiny", max_seq=0), "max_seq 0 must be"),
    (dict(model_spec="tiny", max_batch=-3), "max_batch -3 must be"),
    (dict(model_spec="tiny", device="tpu"), "device"),
    (dict(model_spec="tiny", grid=Grid(batches=(1,), seqs=(1, 4096), contexts=(1,), tokens=(1,), bytes=(16,))),
     "exceeds the model's max_seq_len"),
])
def test_bad_input_is_one_line(kwargs, match):
    with pytest.raises(ExeGPTError, match=match) as e:
        profile_model(progress=False, collectives=False, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_grid_is_one_line():
    with pytest.raises(ExeGPTError, match="sizes must be integers >= 1") as e:
        Grid(batches=(1, 2), seqs=(0, 4), contexts=(1,), tokens=(1,), bytes=(16,))
    assert "\n" not in str(e.value)


def test_committed_tiny_profile_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"
    if not path.exists():
        pytest.skip("tests/data/tiny-cpu.json not generated yet")
    p = Profile.load(path)
    assert p.model == "tiny" and p.supports_tp(1) and p.supports_tp(2)
    assert p.has(Kernel.SEND_RECV) and p.has(Kernel.KV_HANDOFF)
    assert json.loads(path.read_text())["provenance"]["quick"] is True


def test_profile_records_the_runners_kv_cache_dtype(tiny_profile):
    """fp32 on a CPU keeps the model's dtype (no field); bf16 on a CPU runs on the runner's fp32 cache, which the
    solver must count (``Profile.kv_dtype``)."""
    from profiler.sweep import _kv_dtype, resolve_target

    assert tiny_profile.kv_dtype is None
    assert _kv_dtype(resolve_target("tiny", dtype="fp32", device="cpu")) is None
    assert _kv_dtype(resolve_target("tiny", dtype="bf16", device="cpu")) == "fp32"


def test_profile_records_the_runners_packed_weight_copy(tiny_profile):
    """On a CPU the runner keeps a oneDNN-prepacked copy of the Linear weights: fp32 for fp32 models, and for bf16
    models bf16 where the CPU multiplies bf16 natively, else fp32. The profile says which, for weight memory."""
    from profiler.sweep import _packed_weight_dtype, resolve_target
    from runner.linear import _ONEDNN, _ONEDNN_BF16

    if not _ONEDNN:
        pytest.skip("no oneDNN: the runner keeps no packed copy")
    assert tiny_profile.packed_weight_dtype == "fp32"
    assert _packed_weight_dtype(resolve_target("tiny", dtype="bf16", device="cpu")) == (
        "bf16" if _ONEDNN_BF16 else "fp32")


def test_profile_records_the_cpu_kernels_panel_copy(tiny_profile):
    """Where the CPU kernels take decode batches above 8 rows, they keep the Linear weights' panels too, in the
    model's dtype; the profile says so, for weight memory."""
    import torch

    from profiler.sweep import _panel_weight_dtype, resolve_target
    from runner import cpu_kernels

    if cpu_kernels.load() is None:
        assert tiny_profile.panel_weight_dtype is None
        return
    assert tiny_profile.panel_weight_dtype == "fp32"
    bf16 = cpu_kernels.MAX_ROWS[torch.bfloat16] > cpu_kernels.STREAM_ROWS
    assert _panel_weight_dtype(resolve_target("tiny", dtype="bf16", device="cpu")) == ("bf16" if bf16 else None)
