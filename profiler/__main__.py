"""CLI: ``python -m profiler --model tiny [--quick] [--tp 1 2] [--dtype fp32] -o profile.json``.

Bad input (unknown model, a TP degree that splits heads, an output path that cannot be written, ...) prints one
line to stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--quick", action="store_true", help="quick grid (powers of two) and fewer repetitions")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        out = check_output(args.output)
        from .sweep import profile_model  # torch import after the cheap checks

        profile = profile_model(args.model, tp_degrees=tuple(args.tp), quick=args.quick, dtype=args.dtype,
                                device=args.device, max_seq=args.max_seq, max_batch=args.max_batch,
                                max_tokens=args.max_tokens, collectives=not args.no_collectives,
                                progress=not args.no_progress, threads=args.threads)
        profile.save(out)
    except ExeGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {out} ({profile.id}, {profile.dtype}, tp {', '.join(map(str, profile.tp_degrees()))}, "
          f"{len(profile.tables)} tables, step overhead {profile.step_overhead_s * 1e3:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
