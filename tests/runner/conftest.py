"""Factories for the runner tests: tiny seeded models and ragged prompt sets (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from runner.weights import load_model

# NOTE: the runner tests run tiny ops on 2 shared cores; OpenMP barriers across 2 threads under load cost ~1000x
# the op itself (measured: an 8 us attention call took 8 ms), so these tests use one intra-op thread.
torch.set_num_threads(1)


def _make_model(name: str = "tiny", **kw):
    """A preset with seeded random weights: (model, args)."""
    model, args, _ = load_model(name, **kw)
    return model, args


def _make_prompts(n: int, vocab: int, min_len: int = 2, max_len: int = 12, seed: int = 0) -> list[list[int]]:
    """``n`` random prompts of random lengths in ``[min_len, max_len]``."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (s,), generator=g).tolist() for s in lens]


@pytest.fixture
def make_model():
    """Factory: ``make_model(name="tiny", **load_model_kwargs) -> (model, args)``."""
    return _make_model


@pytest.fixture
def make_prompts():
    """Factory: ``make_prompts(n, vocab, min_len=2, max_len=12, seed=0) -> list of id lists``."""
    return _make_prompts


@pytest.fixture(params=["tiny", "tiny-opt"])
def decoder_model(request):
    return _make_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M (fp32), loaded once per session."""
    pytest.importorskip("gguf")
    from runner.weights import smollm2_path

    try:
        smollm2_path()
    except ValueError as e:
        pytest.skip(str(e))
    return load_model("smollm2")
