"""The executor's own work around the kernels, measured by running it: the ``engine_*`` tables.

The kernel tables time the layers, the LM head and the model's per-call setup (``step_overhead_s``). The
runner's executor also packs prompts, builds commands, moves tokens to the host, books every row's token
in Python and compacts the cache; those costs are real and grow with the rows of a step. Here the RRA
executor is run, in this process, on requests of mixed prompt lengths and one output length at a few batch
sizes R (each phase encodes R prompts, then decodes them together to the end), and

    engine_encode(R) = measured encode phase  - kernel prediction of a prefill of R prompts
    engine_decode(R) = measured decode iteration - kernel prediction of a decode step of R rows

(clipped at 0) become two tables of the Profile, with the raw points in its provenance.
"""

from __future__ import annotations

import dataclasses
import logging

from exegpt import Kernel, Profile, ProfileTable, RRASchedule, Workload, evaluate_schedule

log = logging.getLogger(__name__)

ROWS = (1, 2, 4, 8, 16, 32, 64)
"""Batch sizes of the calibration runs."""
PROMPT, OUTPUT, PHASES = (32, 12, 64), 40, 4
"""Prompt length (mean, std, max): mixed, so steps take the runner's masked path as real batches do; a fixed
output length, so a phase's rows finish together; phases run per batch size."""


def calibrate_engine(profile: Profile, spec: str, dtype: str = "fp32", seed: int = 0, rows=ROWS) -> Profile:
    """``profile`` with ``engine_encode`` and ``engine_decode`` tables measured through the runner's executor."""
    from runner.run import run_plan

    w = Workload.truncated_normal(input=PROMPT, output=(OUTPUT, 0, OUTPUT), name="calibration")
    kernels = dataclasses.replace(profile, tables=tuple(t for t in profile.tables if t.kernel not in
                                                        (Kernel.ENGINE_ENCODE, Kernel.ENGINE_DECODE)))
    devices = f"1x{profile.device}"
    limit = kernels.max_coord(Kernel.ATTN_DECODE, 1, 0)
    rows = [r for r in rows if r <= limit]
    points = []
    for r in rows:
        # N_D = OUTPUT - 1: each phase encodes r prompts and decodes them to the end together.
        plan = evaluate_schedule(RRASchedule(r, OUTPUT - 1, 1, 0, 1), w, profile=kernels, devices=devices)
        rep = run_plan(plan, spec, num_requests=r * PHASES, seed=seed, dtype=dtype)
        points.append({"rows": r, "mean_rows": rep.decode_batch, "decode_meas_s": rep.decode_step_s,
                       "decode_kernels_s": plan.estimate.decode_step_s, "encode_meas_s": rep.encode_stage_s,
                       "encode_kernels_s": plan.estimate.encode_stage_s})
    enc = tuple(max(0.0, p["encode_meas_s"] - p["encode_kernels_s"]) for p in points)
    dec = tuple(max(0.0, p["decode_meas_s"] - p["decode_kernels_s"]) for p in points)
    xs = tuple(float(r) for r in rows)
    tables = kernels.tables + (ProfileTable(Kernel.ENGINE_ENCODE, 1, xs, (), enc, extrapolate=True),
                               ProfileTable(Kernel.ENGINE_DECODE, 1, xs, (), dec, extrapolate=True))
    facts = {"method": "runner RRA executor in one process; mixed prompts, one output length; residual = "
                       "measured phase time - kernel prediction, clipped at 0",
             "prompt": list(PROMPT), "output": OUTPUT, "phases": PHASES, "points": points}
    log.info("engine overhead: encode %s s, decode %s s at rows %s", enc, dec, rows)
    return dataclasses.replace(profile, tables=tables, provenance=profile.provenance | {"engine": facts})
