"""Shift Parallelism's base-mode (Ulysses) layer timed whole, on a group of real ranks.

The cost model composes a base-mode layer from the kernel tables (dense work at TP = P / SP on T / SP tokens,
attention with the heads split P ways) and the collective tables (two all-to-alls); this pass measures the layer
itself, so the composition's error is known and the cost model can use the measurement instead. A group of
``world`` fresh interpreters (``python -m profiler.sp_layer RANK CONFIG``, launched as the collectives are, gloo
on CPU) each builds decoder layer 0 of the model in a ``runner.ulysses.ShiftModel`` at SP = ``world``, TP = 1,
and times ``ShiftModel.base_layer`` (QKV projection, all-to-all, attention with the cache write, all-to-all,
output projection, MLP; not the forward's one closing all-gather, which the cost model adds per forward):

- ``sp_encode(tokens)`` at ``tp = world``: a prefill step of one prompt of ``tokens`` tokens;
- ``sp_decode(batch, context)`` at ``tp = world``: a decode step of ``batch`` rows at position ``context``.

Each repetition starts after a barrier and runs the layer ``CHAIN`` times back to back, as a forward runs its
layers (a barrier releases the ranks a little apart; in a forward that skew is paid once, not per layer); a
point's time is the slowest rank's mean a layer. One compute thread a rank, as the runner's CPU ranks.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from exegpt.errors import ExeGPTError
from exegpt.profile import Kernel, ProfileTable

from .collectives import GROUP_TIMEOUT_S, TORCH_DTYPES, _launch

PREFILL_TOKENS = (8, 32, 128, 512)
"""Prompt lengths of the ``sp_encode`` table (capped by the grid's tokens)."""
DECODE_BATCHES = (1, 4, 16)
DECODE_CONTEXTS = (32, 256)
REPEAT_S = 0.5
"""Timed seconds a point gets at least (and ``MIN_REPEAT`` repetitions)."""
MIN_REPEAT = 5
WARMUP = 2
CHAIN = 8
"""Layer calls a repetition times back to back."""
SP_LAYER_S = 60.0
"""About what the pass takes on a loaded machine (two interpreters importing torch and loading a layer, then about
15 points of at least ``REPEAT_S``): a budgeted sweep runs it where twice that is left, before the engine
calibration, which sizes its runs to the time left."""


@dataclass(frozen=True, slots=True)
class SPLayerPoints:
    """The points one launch times."""

    tokens: tuple[int, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]


def points_for(max_tokens: int, max_batch: int, max_context: int) -> SPLayerPoints:
    """The default points cut to a profile's grid (at least the smallest of each axis)."""
    def cut(xs, hi):
        return tuple(x for x in xs if x <= hi) or xs[:1]
    return SPLayerPoints(cut(PREFILL_TOKENS, max_tokens), cut(DECODE_BATCHES, max_batch),
                         cut(DECODE_CONTEXTS, max_context - 1))


def measure_sp_layer(spec: str, world: int, points: SPLayerPoints, dtype: str = "fp32") -> tuple[ProfileTable, ...]:
    """``sp_encode`` and ``sp_decode`` tables of ``spec``'s base-mode layer at SP = ``world`` on CPU ranks."""
    if world < 2:
        raise ExeGPTError(f"sequence parallelism needs a group of at least 2 ranks, got {world}")
    if dtype not in TORCH_DTYPES:
        raise ExeGPTError(f"dtype {dtype!r} unknown; expected one of {', '.join(TORCH_DTYPES)}")
    with tempfile.TemporaryDirectory(prefix="exegpt-sp-") as tmp:
        out = Path(tmp) / "result.json"
        config = {"world": world, "store": str(Path(tmp) / "store"), "out": str(out), "spec": spec, "dtype": dtype,
                  "tokens": list(points.tokens), "batches": list(points.batches), "contexts": list(points.contexts)}
        _launch(config, Path(tmp), module="profiler.sp_layer")
        res = json.loads(out.read_text())
    enc = ProfileTable(kernel=Kernel.SP_ENCODE, tp=world, xs=tuple(float(t) for t in points.tokens), ys=(),
                       seconds=tuple(res["encode"]), extrapolate=True)
    dec = ProfileTable(kernel=Kernel.SP_DECODE, tp=world, xs=tuple(float(b) for b in points.batches),
                       ys=tuple(float(c) for c in points.contexts),
                       seconds=tuple(tuple(row) for row in res["decode"]), extrapolate=True)
    return enc, dec


def main(argv: list[str] | None = None) -> None:
    """Entry of one spawned rank: ``python -m profiler.sp_layer RANK CONFIG_JSON``."""
    argv = sys.argv[1:] if argv is None else argv
    _worker(int(argv[0]), json.loads(argv[1]))


def _worker(rank: int, c: dict) -> None:
    from runner.step import decode_step, prefill_step
    from runner.ulysses import ShiftModel, make_groups
    from runner.weights import load_model

    torch.set_num_threads(1)
    world = c["world"]
    dist.init_process_group("gloo", init_method=f"file://{c['store']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        torch.set_grad_enabled(False)
        model, args, _ = load_model(c["spec"], dtype=TORCH_DTYPES[c["dtype"]], layers=(0, 1), embed=False,
                                    head=False)
        sm = ShiftModel(model, make_groups(world, 1, 0, rank))
        rows, ctx_max = max(c["batches"]), max(c["contexts"])
        sm.setup_cache(rows, max(ctx_max + 1, max(c["tokens"])))
        rope, dev = sm.base.rope, torch.device("cpu")
        gen = torch.Generator().manual_seed(rank)

        def share(tokens: int) -> torch.Tensor:  # this rank's tokens of the step, as _ulysses_layers cuts them
            return torch.randn(-(-tokens // world), args.dim, generator=gen, dtype=TORCH_DTYPES[c["dtype"]])

        def prefill(T: int):
            x, step = share(T), prefill_step(torch.tensor([T]), torch.tensor([0]), rope, dev)
            return lambda: sm.base_layer(x, step, 1, T)

        def decode(b: int, ctx: int):
            pos = torch.full((b,), ctx, dtype=torch.long)
            x, step = share(b), decode_step(pos, torch.arange(b), rope, dev)
            return lambda: sm.base_layer(x, step, b, 1)

        result = {"encode": [_time(prefill(T)) for T in c["tokens"]],
                  "decode": [[_time(decode(b, ctx)) for ctx in c["contexts"]] for b in c["batches"]]}
        if rank == 0:
            Path(c["out"]).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _time(fn) -> float:
    """The slowest rank's mean seconds of ``fn``, ``CHAIN`` calls after each barrier; the ranks agree on the
    count."""
    for _ in range(WARMUP):
        dist.barrier()
        fn()
    times = []
    while True:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(CHAIN):
            fn()
        times.append((time.perf_counter() - t0) / CHAIN)
        done = torch.tensor([float(len(times) >= MIN_REPEAT and CHAIN * sum(times) >= REPEAT_S)])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            break
    v = torch.tensor([float(np.mean(times))], dtype=torch.float64)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return float(v.item())


if __name__ == "__main__":
    main()
