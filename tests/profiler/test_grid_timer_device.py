"""Grids, the timer and device facts (no model needed)."""

import time

import pytest
import torch

from exegpt.errors import ExeGPTError
from exegpt.models import get_model
from profiler.device import describe_device, gpu_short_name, resolve_device
from profiler.grid import Grid, bytes_sizes, full_sizes, make_grid, quick_sizes
from profiler.timer import TimingStats, time_interleaved, time_region


def test_quick_and_full_sizes_are_dense_small_sparse_large():
    assert quick_sizes(512) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert quick_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    full = full_sizes(512)
    assert full[:8] == (1, 2, 3, 4, 5, 6, 7, 8) and full[-1] == 512
    steps = [b / a for a, b in zip(full[8:], full[9:])]
    assert all(1.3 <= r <= 1.5 for r in steps)
    assert bytes_sizes(4096, quick=True) == (16, 256, 4096)


def test_default_grid_covers_the_model():
    tiny = get_model("tiny")
    g = make_grid(tiny, quick=True)
    assert g.seqs[0] == g.contexts[0] == g.batches[0] == g.tokens[0] == 1
    assert g.seqs[-1] == g.contexts[-1] == tiny.max_seq_len
    assert g.batches[-1] == 128 and g.tokens[-1] == 4096
    full = make_grid(tiny)
    assert len(full.batches) > len(g.batches) and full.seqs[-1] == tiny.max_seq_len


def test_the_backends_row_breaks_join_the_token_axis():
    """Both sides of each count where the backend changes how it computes a layer are measured; counts beyond the
    axis are not added."""
    tiny = get_model("tiny")
    g = make_grid(tiny, quick=True, breaks=(8, 9, 32, 33, 10 ** 6))
    assert g.tokens[:8] == (1, 2, 4, 8, 9, 16, 32, 33) and g.tokens[-1] == 4096
    assert g.batches == make_grid(tiny, quick=True).batches
    from profiler.sweep import resolve_target
    from runner import cpu_kernels

    t = resolve_target("tiny", quick=True, device="cpu")
    assert set(cpu_kernels.row_breaks(torch.float32, torch.device("cpu"))) <= set(t.grid.tokens)
    if cpu_kernels.load() is not None:
        assert cpu_kernels.row_breaks(torch.float32, torch.device("cpu")) == (8, 9, 64, 65)


@pytest.mark.parametrize("bad", [(0, 1, 2), (-4,), (), (1, 1), (4, 2), (1.5,), ("a",)])
def test_grid_rejects_bad_sizes(bad):
    with pytest.raises(ExeGPTError, match="grid axis batches"):
        Grid(batches=bad, seqs=(1,), contexts=(1,), tokens=(1,), bytes=(16,))


def test_grid_ranges_reject_zero():
    with pytest.raises(ExeGPTError):
        quick_sizes(0)


def test_timer_on_cpu_is_sane():
    calls = []
    s = time_region(lambda: time.sleep(0.002), warmup=1, repeat=5, setup=lambda: calls.append(1))
    assert isinstance(s, TimingStats) and s.repeat == 5 and len(calls) == 6
    assert 0.0019 <= s.min_s <= s.median_s < 0.5
    assert s.p10_s <= s.median_s <= s.p90_s and s.spread_s >= 0
    a, b = time_interleaved([lambda: time.sleep(0.001), lambda: time.sleep(0.003)], warmup=0, repeat=4)
    assert a.min_s < b.min_s


def test_timer_rejects_bad_counts():
    with pytest.raises(ExeGPTError):
        time_region(lambda: None, repeat=0)


def test_stats_from_samples():
    s = TimingStats.from_samples([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.median_s == 3.0 and s.min_s == 1.0 and s.spread_s == pytest.approx(3.2)


def test_cpu_device_facts():
    d = describe_device("cpu")
    assert d.name == "cpu" and d.kind == "cpu"
    assert d.memory_bytes > 0 and 0 < d.available_bytes <= d.memory_bytes
    assert d.facts["logical_cores"] >= 1 and d.facts["torch_threads"] == torch.get_num_threads()


def test_gpu_names_map_to_known_devices():
    assert gpu_short_name("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_short_name("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_short_name("NVIDIA A10G") == "A10G"
    assert gpu_short_name("NVIDIA L40S") == "L40S"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_missing_cuda_is_one_line():
    with pytest.raises(ExeGPTError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device(None).type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_events_time_the_kernel_not_its_launch():
    """A 4096^3 fp32 product takes milliseconds on the GPU and microseconds to launch: the event timer must see the
    former, as a synchronized wall clock does."""
    a = torch.randn(4096, 4096, device="cuda")
    s = time_region(lambda: a @ a, device="cuda", repeat=10)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    wall_s = (time.perf_counter() - t0) / 10
    assert 0.5 * wall_s < s.median_s < 2 * wall_s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_facts():
    d = describe_device("cuda")
    assert d.kind == "cuda" and d.memory_bytes > 2**30 and d.facts["device_count"] >= 1
    assert d.name == gpu_short_name(d.model) and d.facts["compute_capability"]
