"""CLI: ``python -m profiler --model tiny [--budget 5m] [--workload S | --trace F.csv] [--tp 1 2] -o profile.json``.

The sweep plans against its budget (default ``profiler.budget.DEFAULT_BUDGET_S`` for the device; ``--budget none``:
the whole grid, unbudgeted) and says up front what it measures and what it fits; Ctrl-C saves a partial profile,
marked partial, to the output path.

Bad input (unknown model, a TP degree that splits heads, an output path that cannot be written, ...) prints one
line to stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from exegpt.errors import ExeGPTError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m profiler", description="Measure an ExeGPT profile of a model on this machine.")
    p.add_argument("--model", required=True, help="preset name (tiny, small, ...), HF checkpoint folder or smollm2")
    p.add_argument("--tp", type=int, nargs="+", default=[1], metavar="N",
                   help="TP degrees to profile (each on this one device, as rank 0's shard); default 1")
    p.add_argument("--budget", default=None, metavar="TIME",
                   help="time the whole sweep may take, e.g. 90s, 5m, 1h (default 5m on a CPU, 10m on a GPU; "
                        "'none': every point of the grid)")
    p.add_argument("--workload", default=None, metavar="NAME|FILE",
                   help="the lengths to cover: a paper task (S, T, G, C1, C2), a built-in trace (arxiv, azure_conv, "
                        "azure_code) or a workload JSON; the attention axes stop at its longest prompt and context")
    p.add_argument("--trace", default=None, metavar="FILE", help="the lengths to cover, from a trace file")
    p.add_argument("--quick", action="store_true",
                   help="quick grid (powers of two) and fewer repetitions (always, under a budget)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default: fp32 on CPU, the model's serving precision on GPU")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default cuda when available")
    p.add_argument("--max-seq", type=int, default=None,
                   help="cap the attention axes below the model's max_seq_len (faster on CPUs)")
    p.add_argument("--max-batch", type=int, default=None, help="cap the batch axis (default 128 quick, 256 full)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap the token axis of the dense tables (default 4096 quick, 16384 full)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while timing (default: torch's); 1 is steadier on a shared CPU")
    p.add_argument("--no-collectives", action="store_true",
                   help="skip allreduce, alltoall, allgather / send_recv / kv_handoff (no processes are spawned)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, help="where to write the profile JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is being measured")
    return p


def check_output(path: str) -> Path:
    """Fail before the sweep, not after it, when ``path`` cannot be written."""
    out = Path(path)
    if out.is_dir():
        raise ExeGPTError(f"output {path!r} is a directory; expected a file path such as profile.json")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ExeGPTError(f"cannot write profile to {path!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ExeGPTError(f"cannot write profile to {path!r}: permission denied")
    return out


def resolve_workload(name: str | None, trace: str | None):
    """The ``exegpt.Workload`` of ``--workload`` / ``--trace`` (None when neither is given)."""
    from exegpt.workload import TASKS, TRACES, Workload

    if name and trace:
        raise ExeGPTError("give --workload or --trace, not both")
    if trace:
        return Workload.from_trace(trace)
    if not name:
        return None
    if name in TASKS:
        return Workload.task(name)
    if name in TRACES:
        return Workload.trace(name)
    path = Path(name)
    if not path.is_file():
        raise ExeGPTError(f"workload {name!r} is neither a task ({', '.join(TASKS)}), a built-in trace "
                          f"({', '.join(TRACES)}) nor a workload JSON file")
    try:
        return Workload.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ExeGPTError(f"workload file {name!r} is not a workload JSON: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    profile = None
    try:
        out = check_output(args.output)
        from .budget import DEFAULT_BUDGET_S, parse_duration

        unbudgeted = (args.budget or "").lower() == "none"
        budget = parse_duration(args.budget) if args.budget is not None and not unbudgeted else None
        workload = resolve_workload(args.workload, args.trace)
        from .device import resolve_device  # torch import after the cheap checks
        from .sweep import ProfileInterrupted, profile_model

        if args.budget is None:  # the device's default
            budget = DEFAULT_BUDGET_S.get(resolve_device(args.device).type, DEFAULT_BUDGET_S["cpu"])
        try:
            profile = profile_model(args.model, tp_degrees=tuple(args.tp), quick=args.quick, dtype=args.dtype,
                                    device=args.device, max_seq=args.max_seq, max_batch=args.max_batch,
                                    max_tokens=args.max_tokens, collectives=not args.no_collectives,
                                    progress=not args.no_progress, threads=args.threads, budget_s=budget,
                                    workload=workload, report=lambda line: print(line, file=sys.stderr))
        except ProfileInterrupted as e:
            if e.profile is None:
                print("error: interrupted before every table a profile needs had a point; nothing saved",
                      file=sys.stderr)
                return 130
            e.profile.save(out)
            print(f"interrupted: wrote a partial profile to {out} ({len(e.profile.tables)} tables, the rest of each "
                  f"started table fitted; provenance partial: true)", file=sys.stderr)
            return 130
        profile.save(out)
    except ExeGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    spent = profile.provenance.get("budget", {}).get("spent_s")
    print(f"wrote {out} ({profile.id}, {profile.dtype}, tp {', '.join(map(str, profile.tp_degrees()))}, "
          f"{len(profile.tables)} tables, step overhead {profile.step_overhead_s * 1e3:.3f} ms"
          + (f", {spent:.0f} s" if spent is not None else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
