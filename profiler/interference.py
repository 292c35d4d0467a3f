"""The pairwise interference of a prefill process and a decode process on one device (``exegpt.interference``).

Two processes share one copy of the weights (``runner.colocate``): a prefill process that prefills ``b`` prompts of
``prompt_len`` tokens again and again, and a decode process that advances ``b`` rows at a ``context_len``
context again and again. For each split of the device and batch size, each phase is timed alone (the other process
waits) and beside the other (both loop over the same window, the faster going on until the other's window is
over); and once each alone on the kernel tables' condition. A point is the mean step over its window.

On a CPU a split is thread counts, the weights a mapped file, the kernel tables' condition ``base_threads``, and
one pair of processes walks every point. On a GPU a split is MPS percentages (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``,
which a process takes when its CUDA initializes, so each split gets a pair of processes of its own, and the tables'
condition, the whole GPU alone, another), the weights are the launching process's tensors by CUDA IPC, and each
step is timed to the end of its kernels (``torch.cuda.synchronize``). Without an MPS daemon the percentages do not
act and the two processes time-slice the GPU (``runner.colocate.mps_status``, printed by ``main``).

    python -m profiler.interference --model tiny --profile tests/data/tiny-cpu.json -o with-pairs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from exegpt.errors import ExeGPTError
from exegpt.interference import PhaseInterference, PhasePair

PREFILL, DECODE = 0, 1
GPU_SPLITS = ((50, 50), (100, 100))
"""A GPU's default splits: MPS percentages of the prefill and the decode process."""


@dataclass(frozen=True, slots=True)
class InterferenceOptions:
    splits: tuple[tuple[int, int], ...] | None = None
    """(prefill threads, decode threads) pairs on a CPU (default 1+1 and 2+2), (prefill %, decode %) MPS
    percentages on a GPU (default ``GPU_SPLITS``)."""
    batches: tuple[int, ...] = (1, 4, 16)
    prompt_len: int = 24
    context_len: int = 40
    window_s: float = 0.3
    """Seconds each point loops (at least 3 steps)."""
    repeats: int = 5
    """Passes over every point, interleaved (a point is the median of its passes): the machine's drift hits every
    point alike."""
    base_threads: int = 1
    """Threads of the kernel tables' condition on a CPU: one, as the runner's ranks compute (on a GPU: the whole
    device, 100 %)."""
    device: str | None = None
    """Where the phases run: 'cpu' or 'cuda:N'; default as the runner's colocated runs (the first GPU where CUDA
    is available, else the CPU)."""
    pair_per_split: bool | None = None
    """A pair of processes for each split and one for the base, each pair walking its points ``repeats`` times:
    a GPU's way (a process's MPS share is fixed when its CUDA starts), and its default only; on a CPU it runs the
    GPU's walk with the CPU's weight file."""


def _points(splits, batches, base: int) -> list[tuple[int, int, int, int]]:
    """(prefill threads or 0 = idle, decode threads or 0, batch, split index or -1 for the base) to time, once
    (``measure`` walks the list ``repeats`` times): both processes walk the same list."""
    out = []
    for b in batches:
        out += [(base, 0, b, -1), (0, base, b, -1)]
        for i, (kp, kd) in enumerate(splits):
            out += [(kp, 0, b, i), (0, kd, b, i), (kp, kd, b, i)]
    return out


def _worker(role: int, source, opts: InterferenceOptions, points, barrier, results, timed) -> None:
    """One phase's process: walks ``points``; ``source`` is the shared weight file (CPU) or the launching
    process's tensors (``runner.colocate_ipc.SharedModel``, CUDA IPC)."""
    from runner.colocate import load_shared
    from runner.colocate_ipc import model_from_shared

    model, _ = load_shared(source) if isinstance(source, str) else model_from_shared(source)
    device = next(model.parameters()).device
    gpu = device.type == "cuda"
    n, P, C = max(opts.batches), opts.prompt_len, opts.context_len
    model.setup_cache(n, max(P, C) + 2)
    g = torch.Generator().manual_seed(role)
    vocab = model.args.vocab_size
    ids = torch.randint(0, vocab, (n * max(P, C),), generator=g).to(device)
    with torch.inference_mode():
        if role == DECODE:  # every row at its context once; each step then reset to it
            model.prefill(ids[:n * C], torch.full((n,), C, dtype=torch.long), torch.arange(n))
    out = []
    for k, point in enumerate(points):
        threads = point[role]
        b = point[2]
        barrier.wait()
        if not threads:
            out.append(float("nan"))
            with timed.get_lock():
                timed.value += 1
            barrier.wait()
            continue
        torch.set_num_threads(1 if gpu else threads)  # a GPU process's share is its MPS percentage
        rows = torch.arange(b)
        tok = ids[:b].clone()

        def step():
            if role == PREFILL:
                model.prefill(ids[:b * P], torch.full((b,), P, dtype=torch.long), rows)
            else:
                model.decode(tok, rows)
                model.cache.lengths[rows] = C
            if gpu:  # the step's kernels done, not only queued
                torch.cuda.synchronize(device)

        times = []
        with torch.inference_mode():
            step()  # warm-up
            end = time.perf_counter() + opts.window_s
            while time.perf_counter() < end or len(times) < 3:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            with timed.get_lock():
                timed.value += 1
            # Beside the other phase: go on stepping (untimed) until its timed steps are over too, so that none
            # of them ran alone.
            while timed.value < 2 * (k + 1):
                step()
        # The mean step, not the median: a process time-sliced with the other runs most of its short steps
        # untouched and pays the wait in a few; only the mean sees it.
        out.append(float(np.mean(times)))
        barrier.wait()
    results.put((role, out))


@contextmanager
def _environ(values: dict[str, str]):
    """``values`` in this process's environment for the block: what a process spawned inside it inherits."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_pair(source, opts: InterferenceOptions, walk, shares: tuple[int, int] | None) -> dict[int, list]:
    """Both processes walk ``walk``; each starts with its MPS percentage of ``shares`` (GPU) in its environment,
    so that its CUDA initializes with it. Returns each role's step times."""
    from runner.colocate import MPS_VAR

    ctx = mp.get_context("spawn")
    barrier, results, timed = ctx.Barrier(2), ctx.SimpleQueue(), ctx.Value("i", 0)
    procs = [ctx.Process(target=_worker, args=(r, source, opts, walk, barrier, results, timed))
             for r in (PREFILL, DECODE)]
    try:
        for role, p in zip((PREFILL, DECODE), procs):
            with _environ({MPS_VAR: str(shares[role])} if shares else {}):
                p.start()
        got = {}
        deadline = time.monotonic() + 600 + 20 * len(walk) * opts.window_s  # a loaded host: steps slow 10x
        while len(got) < 2:
            if not results.empty():
                role, out = results.get()
                got[role] = out
                continue
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead or time.monotonic() > deadline:
                raise ExeGPTError(f"interference profiling failed: process exit codes "
                                  f"{[p.exitcode for p in procs]}" + (" (timed out)" if not dead else ""))
            time.sleep(0.05)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return got


def measure(model: str, opts: InterferenceOptions = InterferenceOptions(), dtype: str = "fp32", seed: int = 0
            ) -> PhaseInterference:
    """Times every point of ``opts`` with two processes sharing ``model``'s weights on the device."""
    from runner.colocate import colocated_device, device_cores, share_weights
    from runner.colocate_ipc import build_shared
    from runner.pipeline import DTYPES

    device = colocated_device(opts.device)
    gpu = device.type == "cuda"
    cores = 100 if gpu else device_cores()
    splits = opts.splits if opts.splits is not None else (GPU_SPLITS if gpu else ((1, 1), (2, 2)))
    for kp, kd in splits:
        if not (1 <= kp <= cores and 1 <= kd <= cores):
            raise ExeGPTError(f"split {kp}+{kd} exceeds the device: " +
                              (f"MPS percentages of {device} are 1..100" if gpu else f"{cores} cores"))
    base = 100 if gpu else opts.base_threads
    points = _points(splits, opts.batches, base)
    n = len(points)
    weights = DTYPES[dtype]
    source = build_shared(model, weights, device, seed, {}) if gpu else share_weights(model, weights, seed)
    try:
        if not (gpu if opts.pair_per_split is None else opts.pair_per_split):
            got = _run_pair(source, opts, points * opts.repeats, None)  # one pair, every point, passes interleaved
        else:
            got = {PREFILL: [float("nan")] * (n * opts.repeats), DECODE: [float("nan")] * (n * opts.repeats)}
            for i, shares in [(-1, (base, base))] + list(enumerate(splits)):
                mine = [j for j, pt in enumerate(points) if pt[3] == i]
                part = _run_pair(source, opts, [points[j] for j in mine] * opts.repeats, shares)
                for role in (PREFILL, DECODE):
                    for r in range(opts.repeats):
                        for k, j in enumerate(mine):
                            got[role][r * n + j] = part[role][r * len(mine) + k]
    finally:
        if isinstance(source, str):
            Path(source).unlink(missing_ok=True)
    # Each pass's ratios (a split alone over the base, beside over alone) from points timed moments apart, then
    # their medians over the passes: the machine's drift between passes cancels. Stored as times whose ratios are
    # those medians.
    pre, dec = [], []
    for role, out in ((PREFILL, pre), (DECODE, dec)):
        passes = np.asarray(got[role], dtype=float).reshape(opts.repeats, n)
        med = np.median(passes, axis=0)
        for j, (kp, kd, b, i) in enumerate(points):
            threads = (kp, kd)[role]
            if not threads or i == -1:
                out.append(float(med[j]))
                continue
            base_j = points.index((base, 0, b, -1) if role == PREFILL else (0, base, b, -1))
            alone_j = points.index((kp, 0, b, i) if role == PREFILL else (0, kd, b, i))
            if j == alone_j:
                out.append(float(med[base_j] * np.median(passes[:, j] / passes[:, base_j])))
            else:  # beside
                alone = med[base_j] * np.median(passes[:, alone_j] / passes[:, base_j])
                out.append(float(alone * np.median(passes[:, j] / passes[:, alone_j])))
    nb = len(opts.batches)

    def pick(which, split, mode):  # mode: 0 prefill alone, 1 decode alone, 2 both
        vals = []
        for j, (kp, kd, b, i) in enumerate(points):
            if i == split and ((mode == 0 and kp and not kd) or (mode == 1 and kd and not kp) or
                               (mode == 2 and kp and kd)):
                vals.append(which[j])
        return tuple(vals)

    pairs = tuple(PhasePair(kp, kd, pick(pre, i, 0), pick(dec, i, 1), pick(pre, i, 2), pick(dec, i, 2))
                  for i, (kp, kd) in enumerate(splits))
    base_p = tuple(pre[j] for j, (kp, kd, b, i) in enumerate(points) if i == -1 and kp)
    base_d = tuple(dec[j] for j, (kp, kd, b, i) in enumerate(points) if i == -1 and kd)
    assert len(base_p) == len(base_d) == nb
    return PhaseInterference(cores, base, opts.prompt_len, opts.context_len, tuple(opts.batches), base_p, base_d,
                             pairs)


def table(inter: PhaseInterference) -> str:
    """A markdown table of the scale and interference factors measured."""
    rows = ["| split (prefill+decode threads) | batch | prefill scale | prefill kappa | decode scale | decode kappa |",
            "|---|---|---|---|---|---|"]
    for p in inter.pairs:
        for b in inter.batches:
            sp, kp = inter.factors(p.prefill_threads, p.decode_threads, "prefill", b)
            sd, kd = inter.factors(p.prefill_threads, p.decode_threads, "decode", b)
            rows.append(f"| {p.prefill_threads}+{p.decode_threads} | {b} | {sp:.2f} | {kp:.2f} | {sd:.2f} | "
                        f"{kd:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    from exegpt.profile import Profile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--profile", required=True, help="the profile to add the measured table to")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--context-len", type=int, default=40)
    ap.add_argument("--device", default=None, help="'cpu' or 'cuda:N' (default: the first GPU if any, else the CPU)")
    a = ap.parse_args(argv)
    from runner.colocate import colocated_device, mps_status

    status = mps_status(colocated_device(a.device))
    if status:  # a GPU: the splits are MPS percentages, which act only under an MPS daemon
        print(f"{status} (splits below: MPS percentages)")
    inter = measure(a.model, InterferenceOptions(prompt_len=a.prompt_len, context_len=a.context_len,
                                                 device=a.device))
    prof = dataclasses.replace(Profile.load(a.profile), phase_interference=inter)
    prof.save(a.output)
    print(table(inter))


if __name__ == "__main__":
    main()
