"""The engine's own overhead: what the runner's executor adds around the kernels, measured by running it.

The kernel tables time the layers, the LM head and the model's per-call setup. A decode iteration of the
executor also builds commands, gathers tokens to the host and books every row's token in Python; those costs
are real and grow with the rows of a step. Here the runner's RRA executor is run, in this process, on
requests of mixed prompt lengths and one output length at a few decode-batch sizes R (one encode of R prompts, then R rows decoding
together until they all finish); the measured decode iteration minus the kernels' prediction for the same
batch is the engine overhead, fitted with non-negative least squares (scipy) as

    overhead(R) = step_overhead_s + row_overhead_s * R.

Both numbers go into the Profile, with the measured points in its provenance.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from scipy.optimize import nnls

from exegpt import Profile, RRASchedule, Workload, evaluate_schedule

log = logging.getLogger(__name__)

ROWS = (1, 4, 16, 48)
"""Decode-batch sizes of the calibration runs."""
PROMPT, OUTPUT, PHASES = (32, 12, 64), 40, 3
"""Prompt length (mean, std, max): mixed, so steps take the runner's masked path as real batches do; a fixed
output length, so a phase's rows finish together."""


def calibrate_engine(profile: Profile, spec: str, dtype: str = "fp32", seed: int = 0,
                     rows=ROWS) -> Profile:
    """``profile`` with ``step_overhead_s`` and ``row_overhead_s`` measured through the runner's executor."""
    from runner.run import run_plan

    w = Workload.truncated_normal(input=PROMPT, output=(OUTPUT, 0, OUTPUT), name="calibration")
    kernels = dataclasses.replace(profile, step_overhead_s=0.0, row_overhead_s=0.0)
    devices = f"1x{profile.device}"
    rows = [r for r in rows if r <= profile.max_coord(profile.tables[0].kernel, 1, 0)]
    points = []
    for r in rows:
        # N_D = OUTPUT - 1: each phase encodes r prompts and decodes them to the end together.
        plan = evaluate_schedule(RRASchedule(r, OUTPUT - 1, 1, 0, 1), w, profile=kernels, devices=devices)
        rep = run_plan(plan, spec, num_requests=r * PHASES, seed=seed, dtype=dtype)
        points.append((r, rep.decode_batch, rep.decode_step_s, plan.estimate.decode_step_s,
                       rep.encode_stage_s, plan.estimate.encode_stage_s))
    batch = np.array([p[1] for p in points])
    residual = np.array([p[2] - p[3] for p in points])
    (step_s, row_s), _ = nnls(np.stack([np.ones_like(batch), batch], axis=1), residual)
    facts = {"method": "runner RRA executor, fixed lengths, one phase per batch; residual = measured decode "
                       "iteration - kernel prediction; nnls fit a + b * rows",
             "prompt": PROMPT, "output": OUTPUT,
             "points": [{"rows": r, "mean_rows": round(b, 2), "decode_meas_s": d, "decode_kernels_s": dk,
                         "encode_meas_s": e, "encode_kernels_s": ek} for r, b, d, dk, e, ek in points],
             "step_overhead_s": float(step_s), "row_overhead_s": float(row_s)}
    log.info("engine overhead: %.3g s per step + %.3g s per row", step_s, row_s)
    return dataclasses.replace(profile, step_overhead_s=float(step_s), row_overhead_s=float(row_s),
                               provenance=profile.provenance | {"engine": facts,
                                                                 "kernel_step_overhead_s": profile.step_overhead_s})
