"""The executor's own work around the kernels, measured by running it: the ``engine_*`` tables.

The kernel tables time one layer's attention and the rest of the layer in isolation, the LM head and the
model's per-call setup (``step_overhead_s``). A real step differs: the runner's executor packs prompts, builds
commands, moves tokens to the host, books every row's token in Python, compacts the cache and moves rows into
the holes finished ones leave, and on a CPU the layers of a full model evict each other's KV cache and weights
from the CPU caches that an isolated kernel keeps warm (measured on the ``tiny`` preset: a decode attention call
takes 1.0 ms inside the model at 124 rows and context 165, 0.73 ms timed alone). Both grow with the rows of a
step and with their context.

Here the RRA executor is run, in this process, in the **steady state the simulator predicts**: for a few
(B_E, N_D) schedules (``SCHEDULES``, steady decode batches of about 1 to 630 rows) on requests of mixed prompt
lengths around a few means and mixed output lengths, each run long enough for its decode batch to reach the
refill target and turn over (about three refill batches of requests; within a budget, stopped as soon as its steady
window holds a few phases and ``BUDGET_STOP.finishes`` finishes), its steady window measured, and

    engine_encode(B_E, prompt) = measured encode phase     - kernel prediction of the plan's encode phase
    engine_decode(n, context)  = measured decode iteration - kernel prediction of the plan's decode step

where n is the plan's mean decode batch and the lengths are those the cost model looks the kernels up at (the
batch's expected longest prompt or context when the runner pads, as it does). Each residual is fitted over all
points to a + b n + c n L (``_fit``) and tabulated; the raw points stay in the profile's provenance.

(Earlier versions encoded R prompts per phase and decoded them to the end. Such a batch is not the steady mix
the kernel prediction assumes, and its residuals were 1.5-3x the steady ones at 130 rows: plans with 130-250
rows ran at 0.68-0.82x their predicted decode step.)
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from exegpt import Kernel, Policy, Profile, ProfileTable, RRASchedule, WAASchedule, Workload, evaluate_schedule
from exegpt.cost import WorkloadStats
from exegpt.models import DTYPE_BYTES, MODELS
from exegpt.rules import MIN_STEADY_FINISHES, SteadyStop

log = logging.getLogger(__name__)

SCHEDULES = ((1, 0), (2, 16), (4, 8), (4, 2), (8, 2), (16, 2), (32, 2))
"""(B_E, N_D) of the calibration runs (N_D 0: the longest output's iterations, one query decoded to its end per
phase); with ``OUTPUT`` their steady decode batches are about 1, 5, 20, 80, 160, 320 and 630 rows."""
GRID_ROWS = (1, 4, 16, 64, 256, 1024)
GRID_LENGTHS = (1, 16, 64, 256, 1024, 4096)
"""Rows and lengths at which the fitted residuals are tabulated (bilinear, so exact between and beyond them)."""
PROMPTS = (16, 64, 160)
"""Mean prompt lengths of the calibration runs (each mixed: std mean / 3, up to twice the mean); lengths that
do not fit the model's context with the output are skipped."""
OUTPUT = (40, 20, 80)
"""Output lengths (mean, std, max): rows finish at different iterations, as in real batches."""
BUDGET_STOP = SteadyStop(finishes=MIN_STEADY_FINISHES + 4, phases=2)
"""A budgeted calibration run ends as soon as its steady window holds this (``exegpt.rules.SteadyStop``): it runs
the start-up ramp and a few steady phases at its row count, not its requests to completion. It is given more
requests than it serves (three refill batches, one B_E and twice the window's finishes), so that its queue never
runs dry before the window is in: those it never admits cost nothing."""
BUDGET_OUTPUT = (12, 6, 24)
"""Output lengths of a budgeted calibration's runs: rows turn over in a few steps, so that a run reaches and
measures its steady decode batch in a few dozen steps, not hundreds (a 30-layer model's step takes tens of
milliseconds on a CPU)."""
TURNOVERS = 3
"""Requests per point, in refill batches: one to fill the decode batch, then steady turnover (at least 8 B_E and
24 requests, so that the steady window holds the report's minimum of finished requests)."""


def _fit(samples: list[tuple[float, float, float, float]]) -> tuple[float, float, float]:
    """Non-negative least squares of residual seconds ~ a + b n + c n L over (n, L, residual, measured) samples,
    each weighted by 1 / measured seconds (relative error: the largest batches do not drown the others).

    A per-step cost, a per-row cost and a per-row-per-token cost (the KV a row streams through the CPU caches):
    fitted over every point, so one noisy run does not make a bump and batches beyond the calibration
    extrapolate along the fitted line.
    """
    n, L, y, t = (np.array(c, dtype=float) for c in zip(*samples))
    w = 1 / np.maximum(t, 1e-9)
    # As many terms as the samples can tell apart: one run (a budget that held no more) gives a per-step cost
    # only, two a per-row cost too; three unknowns fitted to one point put it all on whichever term the solver
    # picks, and a 16-row step of SmolLM2 came out at over a second.
    terms = min(3, len({(a, b) for a, b in zip(n, L)}))
    cols = np.stack([np.ones_like(n), n, n * L], axis=1)[:, :terms]
    coef, _ = nnls(cols * w[:, None], y * w)
    return tuple(float(c) for c in coef) + (0.0,) * (3 - terms)


def _tabulate(fit: tuple[float, float, float], xs, ys) -> tuple[tuple[float, ...], ...]:
    a, b, c = fit
    return tuple(tuple(a + b * x + c * x * y for y in ys) for x in xs)


ENGINE_MEMORY_BYTES = 2 ** 29
"""Most KV-cache bytes one calibration run may allocate (budgeted): larger runs are left out, their rows
extrapolated along the fitted line."""
RUN_START_S = 1.0
"""Seconds a run takes beyond its requests' predicted time (building the model, the warm-up)."""
RUN_SLACK = 1.5
"""Measured over predicted seconds a calibration run is priced at (the executor's own work the run measures)."""
RUN_MAX_S = 8.0
"""Longest priced run a budgeted calibration makes, or ``RUN_MAX_FACTOR`` times the cheapest run where that is
longer (a larger model's runs all take longer); longer ones are left out: the fitted line extends to their rows."""
RUN_MAX_FACTOR = 4.0


@dataclass(frozen=True, slots=True)
class CalibrationRun:
    """One planned run of ``calibrate_engine``: a plan, its requests, its priced seconds and KV-cache bytes."""

    prompt_mean: int
    plan: object
    num_requests: int
    cost_s: float
    kv_bytes: float


def plan_runs(profile: Profile, spec: str, schedules=SCHEDULES, prompts=PROMPTS, max_seq_len: int | None = None,
              budget_s: float | None = None, memory_bytes: float = ENGINE_MEMORY_BYTES, start_s: float = RUN_START_S
              ) -> tuple[list[CalibrationRun], list[CalibrationRun]]:
    """The calibration runs to make and those left out: every (prompt level, schedule) whose estimate is finite;
    with ``budget_s``, per prompt level the runs of the fewest, the middle and the most decode rows whose KV cache fits
    ``memory_bytes`` and whose priced seconds are within ``RUN_MAX_S`` (the ends and middle of the fitted line),
    the costliest dropped while their priced seconds exceed the budget (none where even one does not fit: the
    profile then has no engine tables). ``start_s``: seconds a run takes beyond its requests (at least
    ``RUN_START_S``)."""
    kernels = _kernels_only(profile)
    devices = f"1x{profile.device}"
    if max_seq_len is None:
        max_seq_len = MODELS[spec].max_seq_len if spec in MODELS else 1 << 30
    levels = [m for m in prompts if 2 * m + (OUTPUT if budget_s is None else BUDGET_OUTPUT)[2] <= max_seq_len
              and 2 * m <= kernels.max_coord(Kernel.ATTN_ENCODE, 1, 1)] or [min(prompts)]
    runs = []
    output = OUTPUT if budget_s is None else BUDGET_OUTPUT
    for m in levels:
        w = Workload.truncated_normal(input=(m, m / 3, 2 * m), output=output, name="calibration")
        for be, nd in schedules:
            if budget_s is not None and not 0 < nd < output[2]:
                continue  # one query to its end, or more iterations than the longest output: too long a run
            plan = evaluate_schedule(RRASchedule(be, nd or w.output_len.max - 1, 1, 0, 1), w, profile=kernels,
                                     devices=devices)
            e = plan.estimate
            if not (math.isfinite(e.decode_step_s) and math.isfinite(e.encode_stage_s)):
                continue
            if budget_s is None:
                n_req = max(math.ceil(TURNOVERS * e.refill_batch), 8 * be, 24)
                served = n_req
            else:  # stopped at its steady window: the ramp (its refill batch, and as many again that finish
                # while it fills) and the window's finishes are what it serves; the rest are never admitted
                served = 2 * math.ceil(e.refill_batch) + BUDGET_STOP.finishes
                n_req = served + math.ceil(e.refill_batch) + be + BUDGET_STOP.finishes
            kv = (e.decode_batch + be) * min(w.max_total_len, max_seq_len) * _kv_bytes_per_token(profile, spec)
            cost = max(start_s, RUN_START_S) + RUN_SLACK * served / e.throughput_seq_s
            runs.append(CalibrationRun(m, plan, n_req, cost, kv))
    if budget_s is None:
        return runs, []
    chosen = []
    small = [r for r in runs if r.kv_bytes <= memory_bytes] or runs[:1]
    cap = max(RUN_MAX_S, RUN_MAX_FACTOR * min((r.cost_s for r in small), default=0.0))
    for m in levels:  # per prompt level its fewest, middle and most decode rows that fit: the fit's ends and middle
        fits = sorted((r for r in small if r.prompt_mean == m and r.cost_s <= cap),
                      key=lambda r: r.plan.estimate.decode_batch)
        chosen += list({id(r): r for r in fits[:1] + fits[len(fits) // 2:len(fits) // 2 + 1] + fits[-1:]}.values())
    while chosen and sum(r.cost_s for r in chosen) > budget_s:
        chosen.remove(max(chosen, key=lambda r: r.cost_s))
    return chosen, [r for r in runs if all(r is not c for c in chosen)]


def _kernels_only(profile: Profile) -> Profile:
    return dataclasses.replace(profile, tables=tuple(t for t in profile.tables if t.kernel not in
                                                     (Kernel.ENGINE_ENCODE, Kernel.ENGINE_DECODE)))


def _kv_bytes_per_token(profile: Profile, spec: str) -> float:
    """KV-cache bytes of one token over every layer of the runner's cache for ``spec``."""
    from runner.run import model_args

    a = model_args(spec)
    return a.n_layers * 2 * a.n_kv_heads * a.head_dim * DTYPE_BYTES[profile.kv_dtype or profile.dtype]


def release_memory() -> None:
    """Hands freed memory back to the system after a run (glibc keeps freed arenas otherwise, and the resident
    size grows run after run)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def calibrate_engine(profile: Profile, spec: str, dtype: str = "fp32", seed: int = 0, schedules=SCHEDULES,
                     prompts=PROMPTS, max_seq_len: int | None = None, budget_s: float | None = None,
                     on_run=None, start_s: float = RUN_START_S) -> Profile:
    """``profile`` with ``engine_encode`` and ``engine_decode`` tables measured through the runner's executor.

    ``max_seq_len``: the model's context (default: the preset's, else unbounded), to skip prompt levels that do
    not fit. ``budget_s``: seconds the runs may take (``plan_runs``); None: every run. ``on_run(done, total)``:
    told after every run. ``start_s``: a run's seconds beyond its requests, for ``plan_runs``.
    """
    from runner.run import run_plan

    kernels = _kernels_only(profile)
    chosen, left_out = plan_runs(profile, spec, schedules, prompts, max_seq_len, budget_s, start_s=start_s)
    points, overrun = [], 1.0
    deadline = None if budget_s is None else time.monotonic() + budget_s
    for k, r in enumerate(chosen):
        plan, e, be = r.plan, r.plan.estimate, r.plan.schedule.encode_batch
        # Each run priced again by how far the runs so far overran their prices; one that no longer fits the time
        # left is left out.
        if deadline is not None and r.cost_s * overrun > deadline - time.monotonic():
            left_out.append(r)
            continue
        stats = WorkloadStats.of(plan.workload)
        t0 = time.perf_counter()
        rep = run_plan(plan, spec, num_requests=r.num_requests, seed=seed, dtype=dtype,
                       steady_stop=None if budget_s is None else BUDGET_STOP)
        release_memory()
        wall_s = time.perf_counter() - t0
        overrun = max(overrun, wall_s / r.cost_s)
        log.info("engine run %d/%d %s, %d requests: %.1f s (priced %.1f s)", k + 1, len(chosen), plan.schedule,
                 r.num_requests, wall_s, r.cost_s)
        n = e.decode_batch
        # The lengths the cost model asks the tables at (the batch's longest where the runner pads).
        prompt = float(stats.prompt_len(be, kernels.padded_batches))
        ctx = float(stats.context_len(n, kernels.padded_decode))
        points.append({"encode_batch": be, "decode_iters": plan.schedule.decode_iters, "requests": r.num_requests,
                       "prompt": prompt, "decode_rows": n, "context": ctx, "measured_rows": rep.decode_batch,
                       "decode_meas_s": rep.decode_step_s, "decode_kernels_s": e.decode_step_s,
                       "encode_meas_s": rep.encode_stage_s, "encode_kernels_s": e.encode_stage_s,
                       "priced_s": r.cost_s, "wall_s": wall_s, "steady": not math.isnan(rep.steady_start_s)})
        if on_run is not None:
            on_run(k + 1, len(chosen))
    levels = sorted({r.prompt_mean for r in chosen})
    if not points:
        cheapest = min((r.cost_s for r in chosen + left_out), default=0.0)
        note = f"not measured: the cheapest run was priced {cheapest:.0f} s, the budget left {budget_s or 0:.0f} s"
        return dataclasses.replace(profile, provenance=profile.provenance | {"engine": note})
    enc_fit = _fit([(p["encode_batch"], p["prompt"], p["encode_meas_s"] - p["encode_kernels_s"], p["encode_meas_s"])
                    for p in points])
    dec_fit = _fit([(p["decode_rows"], p["context"], p["decode_meas_s"] - p["decode_kernels_s"],
                     p["decode_meas_s"]) for p in points])
    xs, ys = tuple(float(x) for x in GRID_ROWS), tuple(float(y) for y in GRID_LENGTHS)
    tables = kernels.tables + (
        ProfileTable(Kernel.ENGINE_ENCODE, 1, xs, ys, _tabulate(enc_fit, xs, ys), extrapolate=True),
        ProfileTable(Kernel.ENGINE_DECODE, 1, xs, ys, _tabulate(dec_fit, xs, ys), extrapolate=True))
    facts = {"method": "runner RRA executor in one process, steady window of runs of several (B_E, N_D); mixed "
                       "prompts around each mean, mixed outputs; residual = measured phase time - kernel "
                       "prediction of the plan, fitted by non-negative least squares of relative error to "
                       "a + b n + c n L (n rows, L the padded prompt or context)",
             "prompt_means": list(levels), "output": list(OUTPUT if budget_s is None else BUDGET_OUTPUT),
             "runs": f"{TURNOVERS} refill batches of requests to completion" if budget_s is None else
                     f"stopped at a steady window of {BUDGET_STOP.phases}+ phases and {BUDGET_STOP.finishes}+ finishes",
             "budget_s": budget_s, "overrun": overrun,
             "left_out": [f"prompt {r.prompt_mean}: {r.plan.schedule}" for r in left_out],
             "encode_fit_s": list(enc_fit), "decode_fit_s": list(dec_fit), "points": points}
    log.info("engine overhead fits (a, b, c): encode %s, decode %s", enc_fit, dec_fit)
    return dataclasses.replace(profile, tables=tables, provenance=profile.provenance | {"engine": facts})


WAA_SCHEDULES = (WAASchedule(Policy.WAA_C, 2, 32, 1, 0, 1, 1), WAASchedule(Policy.WAA_C, 2, 16, 1, 0, 1, 1),
                 WAASchedule(Policy.WAA_M, 4, 64, 1, 0, 1, 1))
"""The WAA plans ``calibrate_waa`` runs, one after the other: one encode and one decode rank, B_E = 2 with
micro-batches of 32 and 16 rows, B_E = 4 with 64."""
WAA_PROMPT = 64
"""Mean prompt of its workload (mixed, as ``PROMPTS``), with ``OUTPUT`` outputs."""


def period_over_longer(encode_batch: int, run) -> float:
    """A WAA plan's period (``encode_batch`` / throughput) over the longer of its encode batch and decode iteration,
    for an ``Estimate`` or a ``RunReport`` (the same field names)."""
    return encode_batch / run.throughput_seq_s / max(run.encode_stage_s, run.decode_step_s)


def waa_concurrency(estimate, run) -> float:
    """The concurrency of a WAA plan's two one-rank groups that makes its estimate's group times those ``run``
    measured: ``estimate`` computed without any (``rank_concurrency`` 1), where the encode batch t_e and the decode
    iteration t_d each take ``(c - 1) min(t_e, t_d)`` longer with it (``exegpt.simulate.concurrent_times``); the mean
    of the two groups' values."""
    t_e, t_d = estimate.encode_stage_s, estimate.decode_step_s
    extra = (run.encode_stage_s - t_e) + (run.decode_step_s - t_d)
    return 1.0 + extra / (2 * min(t_e, t_d))


def calibrate_waa(profile: Profile, spec: str, dtype: str = "fp32", seed: int = 0, runs: int = 3,
                  turnovers: int = TURNOVERS, output: tuple = OUTPUT) -> Profile:
    """``profile`` with the two-rank ``rank_concurrency`` and the ``waa_period_factor`` measured by running WAA plans
    (``WAA_SCHEDULES`` in turn) through the runner on two ranks, ``runs`` runs of ~10 s each on 2 CPU cores.

    - Concurrency: each run's encode batches and decode iterations against the estimate's without concurrency
      (``waa_concurrency``); the median over runs replaces the back-to-back probe's value of ``profiler.collectives``
      (kept in the provenance). NOTE (2 CPU cores): the probe, the same small kernels on both ranks back to back,
      said 0.97-1.10 in every run, while fidelity runs of WAA plans measured their decode iterations at
      1.19-1.64x and encode batches at 1.13-1.91x the estimate: the groups run different kernels, each waking from
      waits for the other's messages, and share the cores, caches and memory as the probe's loops do not.
    - Lockstep: the measured period (B_E / throughput) over the longer of the measured encode batch and decode
      iteration, against the same ratio of the estimate (which already holds the hand-off where
      ``handoff_on_compute``), median over runs. It is what the simulator's ``max`` leaves out: the decode driver
      merges one encoded batch per iteration and waits for it, the encoder waits for credits, and each hand-off and
      credit is a message between the groups (measured: 1.24-1.49x against a predicted 1.21x, a factor of 1.05).
    """
    from runner.run import run_plan

    plain = dataclasses.replace(profile, waa_period_factor=1.0,
                                rank_concurrency=tuple((r, f) for r, f in profile.rank_concurrency if r != 2))
    m = WAA_PROMPT
    w = Workload.truncated_normal(input=(m, m / 3, 2 * m), output=output, name="calibration")
    devices = f"2x{profile.device}"
    points = []
    for r in range(runs):
        schedule = WAA_SCHEDULES[r % len(WAA_SCHEDULES)]
        plan = evaluate_schedule(schedule, w, profile=plain, devices=devices)
        n_req = max(math.ceil(turnovers * plan.estimate.decode_batch), 48)
        points.append((schedule, plan.estimate, run_plan(plan, spec, num_requests=n_req, seed=seed + r, dtype=dtype),
                       n_req))
        release_memory()
    concurrency = max(1.0, statistics.median(waa_concurrency(e, rep) for _, e, rep, _ in points))
    measured = dataclasses.replace(plain, rank_concurrency=tuple(sorted(plain.rank_concurrency + ((2, concurrency),))))
    ratios = []
    for schedule, _, rep, _ in points:
        e = evaluate_schedule(schedule, w, profile=measured, devices=devices).estimate
        ratios.append(period_over_longer(schedule.encode_batch, rep) / period_over_longer(schedule.encode_batch, e))
    raw = statistics.median(ratios)
    facts = {"schedules": [str(s) for s, *_ in points], "prompt_mean": m, "output": list(output),
             "requests": [n for *_, n in points],
             "encode_meas_s": [rep.encode_stage_s for _, _, rep, _ in points],
             "encode_plain_s": [e.encode_stage_s for _, e, _, _ in points],
             "decode_meas_s": [rep.decode_step_s for _, _, rep, _ in points],
             "decode_plain_s": [e.decode_step_s for _, e, _, _ in points],
             "concurrency": concurrency, "probe_concurrency": profile.concurrency(2),
             "period_ratio": ratios, "raw": raw}
    log.info("WAA concurrency %.3f (probe %.3f), period factor %.3f", concurrency, profile.concurrency(2), raw)
    return dataclasses.replace(measured, waa_period_factor=max(1.0, raw),
                               provenance=profile.provenance | {"waa_period": facts})


WAA_START_S = 8.0
"""Seconds a WAA calibration run takes beyond its requests' predicted time (two fresh ranks, their models)."""


def waa_run_cost_s(profile: Profile, index: int = 0, turnovers: int = TURNOVERS, load_s: float = 0.0,
                   output: tuple = OUTPUT) -> float:
    """Priced seconds of ``calibrate_waa``'s run ``index`` (its plan's predicted time, as ``plan_runs`` prices;
    ``load_s``: the seconds the ranks take to load the model, beyond ``WAA_START_S``)."""
    m = WAA_PROMPT
    w = Workload.truncated_normal(input=(m, m / 3, 2 * m), output=output, name="calibration")
    e = evaluate_schedule(WAA_SCHEDULES[index % len(WAA_SCHEDULES)], w, profile=profile,
                          devices=f"2x{profile.device}").estimate
    n_req = max(math.ceil(turnovers * e.decode_batch), 48)
    return WAA_START_S + load_s + RUN_SLACK * n_req / e.throughput_seq_s
