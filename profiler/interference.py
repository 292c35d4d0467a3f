"""The pairwise interference of a prefill process and a decode process on one device (``exegpt.interference``).

Two processes map one copy of the weights (``runner.colocate``): a prefill process that prefills ``b`` prompts of
``prompt_len`` tokens again and again, and a decode process that advances ``b`` rows at a ``context_len``
context again and again. For each thread split and batch size, each phase is timed alone (the other process
waits) and beside the other (both loop over the same window); and once each alone with ``base_threads``, the
kernel tables' condition. A point is the median step over its window.

    python -m profiler.interference --model tiny --profile tests/data/tiny-cpu.json -o with-pairs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from exegpt.errors import ExeGPTError
from exegpt.interference import PhaseInterference, PhasePair

PREFILL, DECODE = 0, 1


@dataclass(frozen=True, slots=True)
class InterferenceOptions:
    splits: tuple[tuple[int, int], ...] = ((1, 1), (2, 2))
    """(prefill threads, decode threads) pairs."""
    batches: tuple[int, ...] = (1, 4, 16)
    prompt_len: int = 24
    context_len: int = 40
    window_s: float = 0.3
    """Seconds each point loops (at least 3 steps)."""
    repeats: int = 5
    """Passes over every point, interleaved (a point is the median of its passes): the machine's drift hits every
    point alike."""
    base_threads: int = 1
    """Threads of the kernel tables' condition: one, as the runner's ranks compute."""


def _points(opts: InterferenceOptions, base: int) -> list[tuple[int, int, int, int]]:
    """(prefill threads or 0 = idle, decode threads or 0, batch, split index or -1 for the base) to time, once
    (``measure`` walks the list ``repeats`` times): both processes walk the same list."""
    out = []
    for b in opts.batches:
        out += [(base, 0, b, -1), (0, base, b, -1)]
        for i, (kp, kd) in enumerate(opts.splits):
            out += [(kp, 0, b, i), (0, kd, b, i), (kp, kd, b, i)]
    return out


def _worker(role: int, path: str, opts: InterferenceOptions, points, barrier, results) -> None:
    from runner.colocate import load_shared

    model, _ = load_shared(path)
    n, P, C = max(opts.batches), opts.prompt_len, opts.context_len
    model.setup_cache(n, max(P, C) + 2)
    g = torch.Generator().manual_seed(role)
    vocab = model.args.vocab_size
    ids = torch.randint(0, vocab, (n * max(P, C),), generator=g)
    with torch.inference_mode():
        if role == DECODE:  # every row at its context once; each step then reset to it
            model.prefill(ids[:n * C], torch.full((n,), C, dtype=torch.long), torch.arange(n))
    out = []
    for point in points:
        threads = point[role]
        b = point[2]
        barrier.wait()
        if not threads:
            out.append(float("nan"))
            barrier.wait()
            continue
        torch.set_num_threads(threads)
        rows = torch.arange(b)
        tok = ids[:b].clone()

        def step():
            if role == PREFILL:
                model.prefill(ids[:b * P], torch.full((b,), P, dtype=torch.long), rows)
            else:
                model.decode(tok, rows)
                model.cache.lengths[rows] = C

        times = []
        with torch.inference_mode():
            step()  # warm-up
            end = time.perf_counter() + opts.window_s
            while time.perf_counter() < end or len(times) < 3:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        out.append(float(np.median(times)))
        barrier.wait()
    results.put((role, out))


def measure(model: str, opts: InterferenceOptions = InterferenceOptions(), dtype: str = "fp32", seed: int = 0
            ) -> PhaseInterference:
    """Times every point of ``opts`` with two processes sharing ``model``'s weights on this machine."""
    from runner.colocate import device_cores, share_weights
    from runner.pipeline import DTYPES

    cores = device_cores()
    for kp, kd in opts.splits:
        if not (1 <= kp <= cores and 1 <= kd <= cores):
            raise ExeGPTError(f"thread split {kp}+{kd} exceeds the device's {cores} cores")
    base = opts.base_threads
    points = _points(opts, base)
    walk = points * opts.repeats
    path = share_weights(model, DTYPES[dtype], seed)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, path, opts, walk, barrier, results)) for r in (PREFILL, DECODE)]
    try:
        for p in procs:
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
        Path(path).unlink(missing_ok=True)
    # Each pass's ratios (a split alone over the base, beside over alone) from points timed moments apart, then
    # their medians over the passes: the machine's drift between passes cancels. Stored as times whose ratios are
    # those medians.
    n = len(points)
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
                  for i, (kp, kd) in enumerate(opts.splits))
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
    a = ap.parse_args(argv)
    inter = measure(a.model, InterferenceOptions(prompt_len=a.prompt_len, context_len=a.context_len))
    prof = dataclasses.replace(Profile.load(a.profile), phase_interference=inter)
    prof.save(a.output)
    print(table(inter))


if __name__ == "__main__":
    main()
