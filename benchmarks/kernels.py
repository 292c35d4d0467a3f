"""The CPU decode kernels (``runner.cpu_kernels``) against torch's own path, per dtype and row count.

For a model's Linear weights (default SmolLM2-135M: one layer's qkv, wo, gated w1/w3 and w2, times 30, plus the
LM head): the time of one pass through all of them with the kernels and with torch (``F.linear``, or oneDNN on a
packed weight where ``runner.linear`` uses it), at 1..64 rows. The crossover sets ``cpu_kernels.MAX_ROWS``.

    python -m benchmarks.kernels [--model smollm2-135m] [--threads 2]    (from the repository root)
"""

from __future__ import annotations

import argparse
import time

import torch

from runner import cpu_kernels
from runner.linear import Linear
from runner.model import FeedForward, ModelArgs

ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
REPEAT = 5


def layer(args: ModelArgs, dtype: torch.dtype) -> tuple[Linear, Linear, FeedForward]:
    qkv = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False).to(dtype)
    wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False).to(dtype)
    return qkv, wo, FeedForward(args).to(dtype)


def one_pass(layers, head: Linear, x: torch.Tensor, kernels: bool) -> float:
    """Seconds of one pass through every layer's Linear weights and the head, best of ``REPEAT``."""
    rows = x.shape[0]
    saved = dict(cpu_kernels.MAX_ROWS)
    cpu_kernels.MAX_ROWS.update({d: (rows if kernels else 0) for d in saved})
    try:
        best = float("inf")
        for _ in range(REPEAT):
            t0 = time.perf_counter()
            for qkv, wo, ffn in layers:
                qkv(x)
                wo(x)
                ffn(x)
            head(x)
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        cpu_kernels.MAX_ROWS.update(saved)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m", help="a preset name (default: %(default)s)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if cpu_kernels.load() is None:
        raise SystemExit("CPU kernels unavailable (see the warning above)")
    args = ModelArgs.from_name(a.model)
    print(f"torch {torch.__version__}, {a.threads} threads; {a.model} Linear weights ({args.n_layers} layers + "
          f"head); ms per pass, best of {REPEAT}")
    print("| dtype | rows | kernels ms | torch ms | torch / kernels |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        layers = [layer(args, dtype) for _ in range(args.n_layers)]
        head = Linear(args.dim, args.vocab_size, bias=False).to(dtype)
        for rows in ROWS:
            x = torch.randn(rows, args.dim, dtype=dtype)
            k, t = one_pass(layers, head, x, True), one_pass(layers, head, x, False)
            print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {k * 1e3:.1f} | {t * 1e3:.1f} | {t / k:.2f}x |")


if __name__ == "__main__":
    main()
