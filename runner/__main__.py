"""CLI: execute a plan and report what it measured.

    python -m runner --plan plan.json --model tiny --requests 200 --report report.json
    exegpt-run --plan plan.json --model smollm2 --requests 50 --trace arxiv --dtype bf16 --stop-at-eos

Requests are drawn (seeded) from the plan's workload, or from a trace's (input, output) pairs with --trace
(a CSV file or a built-in trace name). If the plan was made for a model with a different layer count, each
pipeline's layer split is scaled proportionally to --model (see ``runner.run.remap_stages``). Under torchrun
every rank runs this command; the rank holding the report prints and writes it. Across machines, one torchrun
agent per machine, each with one process per device:

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m runner --plan plan.json --model tiny --report report.json

Exit codes: 0 done, 1 a rank failed, died or timed out (one line on stderr; with --report the report is still
written: every request finished before the failure, or failed with it as the reason), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from exegpt.errors import ExeGPTError
from exegpt.policies import describe

PROGRESS_MIN_REQUESTS = 100
"""Runs of at least this many requests show a progress bar (unless --no-progress)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _BadArgs(message)


class _BadArgs(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="exegpt-run", description="Execute an ExeGPT plan on the built-in PyTorch backend.")
    p.add_argument("--plan", required=True, help="plan JSON written by exegpt")
    p.add_argument("--model", default="tiny", help="preset name, HF checkpoint folder, or smollm2 (default tiny)")
    p.add_argument("--requests", type=int, default=64, help="number of requests (default 64)")
    p.add_argument("--trace", help="CSV trace or built-in trace name (arxiv, azure_conv, azure_code)")
    p.add_argument("--arrivals", default="all",
                   help="when requests arrive: all (default), poisson:RATE (requests/s) or trace[:SPEEDUP]")
    p.add_argument("--report", help="write the report JSON here")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0, help="seed of requests and random weights (default 0)")
    p.add_argument("--stop-at-eos", action="store_true", help="end a request at EOS (default: forced length)")
    p.add_argument("--keep-tokens", action="store_true", help="keep every request's generated tokens in the report")
    p.add_argument("--batch-invariant", action="store_true",
                   help="every request's tokens independent of its batch, in any precision, slower (CPU ranks)")
    p.add_argument("--timeout", type=float, default=3600.0, help="wall-clock limit in seconds (default 3600)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"progress bar (default: on for >= {PROGRESS_MIN_REQUESTS} requests)")
    return p


def _trace(spec: str):
    from exegpt.workload import TRACES, Workload

    if Path(spec).is_file():
        return Workload.from_trace(spec)
    if spec in TRACES:
        return Workload.trace(spec)
    raise ExeGPTError(f"trace {spec!r} is neither a file nor a built-in trace ({', '.join(TRACES)})")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.requests < 1:
            raise ExeGPTError(f"--requests {args.requests} must be >= 1")
        if args.timeout <= 0:
            raise ExeGPTError(f"--timeout {args.timeout} must be > 0")
        if args.report and not Path(args.report).resolve().parent.is_dir():
            raise ExeGPTError(f"--report: folder {str(Path(args.report).parent)!r} does not exist")
        from exegpt.plan import Plan

        from exegpt.arrivals import Arrivals

        arrivals = Arrivals.parse(args.arrivals)
        plan = Plan.load(args.plan)
        trace = _trace(args.trace) if args.trace else None
        from .launch import RankFailedError
        from .run import run_plan

        progress = args.progress if args.progress is not None else args.requests >= PROGRESS_MIN_REQUESTS
        try:
            report = run_plan(plan, args.model, num_requests=args.requests, trace=trace, seed=args.seed,
                              dtype=args.dtype, stop_at_eos=args.stop_at_eos, timeout_s=args.timeout,
                              progress=progress, arrivals=arrivals,
                              batch_invariant=args.batch_invariant, keep_tokens=args.keep_tokens)
        except RankFailedError as e:
            partial = e.reports[0] if e.reports else None
            where = ""
            if partial is not None:
                where = f"; {partial.num_finished} requests finished, {partial.num_failed} failed"
                if args.report:
                    partial.save(args.report)
                    where += f"; report written to {args.report}"
            print(f"exegpt-run: run failed: {e}{where}", file=sys.stderr)
            return 1
    except (_BadArgs, ExeGPTError) as e:
        print(f"exegpt-run: error: {e}", file=sys.stderr)
        return 2
    if report is None:  # a torchrun rank that does not hold the report
        return 0
    print(f"plan {args.plan}: {describe(plan.schedule)} on {args.model} "
          f"({plan.profile_id} estimate)")
    print(report.table())
    if args.report:
        report.save(args.report)
        print(f"report written to {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
