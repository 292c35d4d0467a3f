"""Two phases sharing one GPU (Splitwiser's prefill and decode processes under MPS) when no interference was
measured: a roofline account of what each step gets of the device.

Each step is split into its compute seconds and its memory seconds at the whole device (``exegpt.roofline``'s
operators and efficiencies). A process limited to a fraction ``p`` of the SMs computes at ``p`` of the peak and
streams memory at ``min(1, p / SATURATING_SHARE)`` of the bandwidth: a part of the SMs already saturates HBM.
Alone on its share a step takes ``max(compute / p, memory / bw(p))``. Beside the other phase:

  * shares summing past the whole device time-slice the SMs: each gets ``p / (p + q)`` of them;
  * both draw on one memory system: where the two steps' bandwidth demands (memory seconds over step seconds)
    add past one, the memory part of each stretches by their sum.

``scale`` (alone on the share over alone on the whole device) and ``kappa`` (beside over alone, minus one) are
the same two factors the profiler measures (``exegpt.interference``). ``SATURATING_SHARE`` is an assumption,
not a measurement; a profile with ``phase_interference`` measured on the device takes precedence.
"""

from __future__ import annotations

from dataclasses import dataclass

from .devices import DeviceSpec
from .models import ModelShape
from .roofline import Efficiency, Gemm, gemm_flops, layer_ops, lm_head_ops

SATURATING_SHARE = 0.5
"""Fraction of the SMs that reaches the device's streaming bandwidth (assumed)."""


@dataclass(frozen=True, slots=True)
class StepWork:
    """One step's compute and memory seconds at the whole device."""

    compute_s: float
    memory_s: float

    def alone_s(self, share: float) -> float:
        """The step on ``share`` (0-1] of the SMs with the device to itself."""
        return max(self.compute_s / share, self.memory_s / min(1.0, share / SATURATING_SHARE))

    def demand(self, share: float) -> float:
        """The fraction of the device's bandwidth the step draws while it runs on ``share``."""
        return self.memory_s / self.alone_s(share)


def step_work(model: ModelShape, device: DeviceSpec, phase: str, rows: float, prompt_len: float,
              context: float) -> StepWork:
    """A prefill of ``rows`` prompts of ``prompt_len`` tokens, or a decode step of ``rows`` requests at
    ``context`` tokens, on one device (tp 1)."""
    eff = Efficiency()
    flops = eff.compute * gemm_flops(device, model.dtype_bytes)
    bw = eff.memory * device.mem_bw_bytes_s
    db = model.dtype_bytes
    tokens = rows * prompt_len if phase == "prefill" else rows
    compute = memory = 0.0
    for ops, m, times in ((layer_ops(model, 1, "encode" if phase == "prefill" else "decode"), tokens,
                           model.n_layers), (lm_head_ops(model), rows, 1)):
        for op in ops:
            if isinstance(op, Gemm):
                compute += times * op.count * 2 * m * op.k * op.n / flops
                memory += times * op.count * db * (op.k * op.n + m * (op.k + op.n)) / bw
            else:
                memory += times * op.count * m * op.bytes_per_token / bw
    h, hd = model.n_heads, model.hd
    if phase == "prefill":  # causal attention over each prompt
        compute += model.n_layers * 4 * rows * h * hd * prompt_len ** 2 * 0.5 / (eff.attn_compute * device.peak_flops)
    else:  # every row reads its context's KV
        memory += model.n_layers * rows * context * model.kv_bytes_per_token(1) / (eff.attn_memory *
                                                                                   device.mem_bw_bytes_s)
        compute += model.n_layers * 4 * rows * h * hd * context / (eff.attn_compute * device.peak_flops)
    return StepWork(compute, memory)


def share_factors(me: StepWork, share: float, other: StepWork, other_share: float) -> tuple[float, float]:
    """(scale, kappa) of step ``me`` on ``share`` of the device beside step ``other`` on ``other_share``
    (fractions in (0, 1])."""
    whole = me.alone_s(1.0)
    alone = me.alone_s(share)
    over = max(1.0, share + other_share)
    p, q = share / over, other_share / over
    pressure = max(1.0, me.demand(p) + other.demand(q))
    beside = max(me.compute_s / p, pressure * me.memory_s / min(1.0, p / SATURATING_SHARE))
    return alone / whole, beside / alone - 1.0
