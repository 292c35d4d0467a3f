"""Shift Parallelism against its pure configurations (TP, DP, SP) under arrivals: simulated on an 8-GPU profile,
executed on two CPU ranks with the simulated prediction beside each measured number.

    python -m benchmarks.shift [--requests 1500] [--speedup 4] [--gpu 13b 70b-fp8] [--cpu-model smollm2]
                               [--cpu-requests 60] [--cpu-rate 4] [--cpu-budget 600] [--skip-cpu]
                               [--skip-goodput] [--refresh-profile] [--plot docs/shift.png]

Simulated (``exegpt.sim``, the shipped H100 data): Llama-2-13B (fp16; with TP = 1 a replica holds the whole model)
on 8xH100, the first ``--requests`` requests of the shipped Azure LLM code trace (prompts clipped to the
model's context), arriving (1) at the trace's own timestamps sped up ``--speedup`` times (bursty), (2) by Poisson
at the same mean rate (steady), (3) all at once (peak throughput), and (4) one at a time (the latency of a lone
request); then goodput under two p90 TTFT / TPOT SLOs for each, and the optimizer's pick over the Shift policy's
grid (thresholds, degrees, replicas, S). Configurations, each one replica scheduler of the same knobs (chunked
prefill, S = 256 requests, a budget of 8192 + S tokens a step): TP8; DP8 (eight one-device replicas, round robin);
SP8 (Ulysses for every step); Shift (SP8 base, TP8 for steps under ``--threshold`` tokens). A second simulated
setting (``--gpu 70b-fp8``) is the paper's own as far as a roofline prices it: Llama-2-70B's shape in FP8 on
8xH200 (``fp8_70b`` says what it assumes); goodput and the plot are the first setting's.

Executed (``runner``, gloo): the same four on two CPU ranks (TP2, DP2, SP2, Shift) with ``--cpu-model``
(default the pretrained SmolLM2-135M, whose 9 query and 3 KV heads go 6 + 3 and 2 + 1 over the two ranks) and
its cached CPU profile (``profiler.loop.cached_profile``), on the trace scaled to CPU-sized lengths, bursty and
steady; each cell is the measured value / the simulated prediction on the same requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from exegpt import Arrivals, RequestSLO, Workload, evaluate_schedule, find_schedule, run_simulated
from exegpt.policies.shift import ShiftSchedule

GPU_MODEL, GPU_DEVICES = "llama-2-13b", "8xH100"
CONFIGS = ("TP", "DP", "SP", "Shift")


@dataclass(frozen=True)
class GpuSetting:
    """A simulated setting: the model (name or shape), the devices and the profile (None: the shipped data)."""

    label: str
    model: object
    devices: str
    roofline: bool = False
    speedup: float | None = None
    """The trace's speed-up for this setting (None: ``--speedup``)."""

    def profile(self):
        from exegpt.roofline import roofline_profile

        return roofline_profile(self.model, self.devices.split("x", 1)[1]) if self.roofline else None


def fp8_70b() -> GpuSetting:
    """The paper's setting as far as a roofline prices it: Llama-2-70B's shape (64 query and 8 KV heads, as
    Llama-3.3-70B's; its 32000-token vocabulary, not 128256) with FP8 weights and GEMM inputs at Hopper's FP8 peak,
    attention, KV cache, hidden states and collectives in bf16 (``exegpt.roofline``, datasheet H200 numbers)."""
    from exegpt.models import get_model

    shape = dataclasses.replace(get_model("llama-2-70b").with_dtype("fp8"), kv_dtype="bf16")
    # The trace at its own pace (2.5 requests/s): at 4x it is beyond every configuration's peak throughput.
    return GpuSetting("llama-2-70b fp8 (roofline)", shape, "8xH200", roofline=True, speedup=1.0)


SETTINGS = {"13b": lambda: GpuSetting(f"{GPU_MODEL} fp16 (shipped data)", GPU_MODEL, GPU_DEVICES), "70b-fp8": fp8_70b}


def schedules(n: int, seqs: int, budget: int, threshold: int) -> dict[str, ShiftSchedule]:
    """The four configurations on ``n`` devices."""
    return {"TP": ShiftSchedule(budget, seqs, 1, n, threshold, 1, n),
            "DP": ShiftSchedule(budget, seqs, 1, 1, threshold, n, n),
            "SP": ShiftSchedule(budget, seqs, n, 1, 1, 1, n),
            "Shift": ShiftSchedule(budget, seqs, n, 1, threshold, 1, n)}


def _ms(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def simulated_table(requests: int, speedup: float, threshold: int, setting: GpuSetting | None = None
                    ) -> tuple[str, dict]:
    g = setting or SETTINGS["13b"]()
    prof = g.profile()
    speedup = g.speedup or speedup
    w = Workload.trace("azure_code").within_context(4096, how="clip")[0]
    t = np.asarray(w.arrivals_s[:requests])
    rate = (len(t) - 1) / (t[-1] - t[0]) * speedup
    regimes = {"bursty": Arrivals.trace(speedup), "steady": Arrivals.poisson(rate), "peak": None,
               "alone": Arrivals.poisson(rate / 1000)}
    rows, out = [], {}
    for name, s in schedules(8, 256, 8192 + 256, threshold).items():
        plan = evaluate_schedule(s, w, model=g.model, devices=g.devices, profile=prof)
        res = {}
        for regime, arr in regimes.items():
            n = 64 if regime == "alone" else requests
            res[regime] = run_simulated(plan, num_requests=n, arrivals=arr)
        out[name] = res
        b, st, pk, lo = res["bursty"], res["steady"], res["peak"], res["alone"]
        rows.append(f"| {name} | {_ms(b.ttft.p50)} / {_ms(b.ttft.p99)} | {_ms(b.tpot.p50)} / {_ms(b.tpot.p99)} | "
                    f"{_ms(st.ttft.p50)} / {_ms(st.ttft.p99)} | {_ms(st.tpot.p50)} / {_ms(st.tpot.p99)} | "
                    f"{pk.throughput_tok_s:,.0f} | {_ms(lo.ttft.p50)} | {_ms(lo.tpot.p50)} |")
    head = (f"Simulated: {g.label} on {g.devices}, Azure code trace ({requests} requests; bursty: its timestamps "
            f"x{speedup:g}, steady: Poisson {rate:.1f}/s), Shift threshold {threshold} tokens. TTFT and "
            f"TPOT p50 / p99 in ms; peak: every request at once, output tok/s; alone: one request at a time.\n\n"
            "| config | bursty TTFT | bursty TPOT | steady TTFT | steady TPOT | peak tok/s | alone TTFT | alone TPOT "
            "|\n|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + rows), out


def verdict(res: dict) -> str:
    """Whether the paper's qualitative result holds: Shift's TTFT near SP's, its TPOT near TP's, its peak
    throughput between TP's and DP's."""
    tt = {k: v["bursty"].ttft.p50 for k, v in res.items()}
    tp = {k: v["bursty"].tpot.p50 for k, v in res.items()}
    pk = {k: v["peak"].throughput_tok_s for k, v in res.items()}
    lines = [f"- Shift's bursty TTFT p50 {tt['Shift'] / tt['SP']:.2f}x SP's ({tt['Shift'] / tt['TP']:.2f}x TP's, "
             f"{tt['Shift'] / tt['DP']:.2f}x DP's)",
             f"- Shift's bursty TPOT p50 {tp['Shift'] / tp['TP']:.2f}x TP's ({tp['Shift'] / tp['SP']:.2f}x SP's)",
             f"- peak throughput: Shift {pk['Shift'] / pk['TP']:.2f}x TP's and {pk['Shift'] / pk['DP']:.2f}x DP's "
             f"(SP {pk['SP'] / pk['TP']:.2f}x TP's)"]
    return "\n".join(lines)


GOODPUT_SLOS = (RequestSLO(ttft_s=0.08, tpot_s=0.012, percentile=90), RequestSLO(ttft_s=0.5, tpot_s=0.025,
                                                                                 percentile=90))


def goodput_table(requests: int, threshold: int) -> str:
    """Goodput (the highest rate at the trace's own timestamps that keeps p90 TTFT and TPOT) of the four, and the
    optimizer's pick over the Shift policy's grid, under an interactive SLO and a looser one."""
    from exegpt.policies import describe
    from exegpt.search.goodput import SimulatedSearch, goodput

    w = Workload.trace("azure_code").within_context(4096, how="clip")[0]
    opts = SimulatedSearch(num_requests=requests, arrivals="trace")
    rows = []
    for slo in GOODPUT_SLOS:
        cells = []
        for name, s in schedules(8, 256, 8192 + 256, threshold).items():
            plan = evaluate_schedule(s, w, model=GPU_MODEL, devices=GPU_DEVICES)
            cells.append(f"{goodput(plan, slo, options=opts)[0]:.2f}")
        pick = find_schedule(w, slo, model=GPU_MODEL, devices=GPU_DEVICES, policies=["shift"],
                             simulated=SimulatedSearch(num_requests=requests, arrivals="trace", max_simulated=8))
        rows.append(f"| {slo.describe()} | " + " | ".join(cells) +
                    f" | {describe(pick.schedule)}: {pick.slo_check.goodput_rps:.2f} |")
    return (f"Goodput (requests/s at the trace's own timestamps, sped up or slowed down; {GPU_MODEL} on "
            f"{GPU_DEVICES}; simulated):\n\n| SLO | " + " | ".join(CONFIGS) + " | optimizer's pick, shift grid |\n|" +
            "---|" * (len(CONFIGS) + 2) + "\n" + "\n".join(rows))


def cpu_table(model: str, requests: int, threshold: int, rounds: int, refresh: bool = False, rate: float = 4.0,
              budget_s: float = -1.0) -> str:
    """The four configurations executed on two CPU ranks, measured / simulated (``budget_s``: the CPU profile's,
    -1 the profiler's default)."""
    from profiler.loop import CPU_TRACE, cached_profile
    from runner.run import run_plans

    prof = cached_profile(model, tp_degrees=(1, 2), refresh=refresh, budget_s=budget_s)
    w = CPU_TRACE
    longest = w.max_total_len
    scheds = schedules(2, 16, 16 + longest, threshold)
    plans = {k: evaluate_schedule(s, w, profile=prof, devices="2xcpu") for k, s in scheds.items()}
    t = np.asarray(Workload.trace("azure_conv").arrivals_s[:requests])
    base_rate = (len(t) - 1) / (t[-1] - t[0])
    rows = []
    for regime in ("bursty", "steady"):
        arr = Arrivals.trace(rate / base_rate) if regime == "bursty" else Arrivals.poisson(rate)
        meas = {k: [] for k in plans}
        for _ in range(rounds):  # interleaved: the machine's speed drifts between minutes
            reps = run_plans(list(plans.values()), model, trace=w, num_requests=requests, arrivals=arr, seed=0)
            for k, r in zip(plans, reps):
                meas[k].append(r)
        for k, plan in plans.items():
            sim = run_simulated(plan, prof, num_requests=requests, arrivals=arr, seed=0)
            cells = []
            for metric in ("ttft", "tpot"):
                for q in ("p50", "p99"):
                    got = float(np.median([getattr(getattr(r, metric), q) for r in meas[k]]))
                    cells.append(f"{_ms(got)} / {_ms(getattr(getattr(sim, metric), q))}")
            tok = float(np.median([r.throughput_tok_s for r in meas[k]]))
            rows.append(f"| {regime} | {k} | " + " | ".join(cells) + f" | {tok:.0f} / {sim.throughput_tok_s:.0f} |")
    head = (f"Executed on 2 CPU ranks ({model}, azure_conv scaled, {requests} requests at {rate:g}/s; Shift threshold "
            f"{threshold}; median of {rounds} interleaved rounds): measured / simulated.\n\n"
            "| arrivals | config | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | tok/s |\n"
            "|---|---|---|---|---|---|---|")
    return "\n".join([head] + rows) + "\n\n" + sp_layer_table(prof)


def sp_layer_table(prof) -> str:
    """The profile's measured base-mode layer (``profiler.sp_layer``) beside the kernel-table composition the
    cost model used before it (``exegpt.ulysses_cost.composed_vs_measured``)."""
    import math

    from exegpt import ulysses_cost
    from exegpt.problem import problem
    from profiler.loop import CPU_TRACE

    prob = problem(CPU_TRACE, math.inf, profile=prof, devices="2xcpu")
    if not ulysses_cost.has_measured(prob.cost, 2, 2):
        return "(the profile has no measured base-mode layer)"
    rows = [f"| {what} | {c * 1e3:.2f} | {m * 1e3:.2f} | {c / m:.2f} |"
            for what, c, m in ulysses_cost.composed_vs_measured(prob.cost, 2)]
    return ("One base-mode (SP 2) layer, composed from the kernel and collective tables vs measured whole "
            "(profiler.sp_layer), ms:\n\n| step | composed | measured | ratio |\n|---|---|---|---|\n" + "\n".join(rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--speedup", type=float, default=4.0)
    ap.add_argument("--threshold", type=int, default=512)
    ap.add_argument("--gpu", nargs="*", default=list(SETTINGS), choices=list(SETTINGS),
                    help="simulated settings: 13b (shipped H100 data), 70b-fp8 (roofline H200)")
    ap.add_argument("--cpu-model", default="smollm2")
    ap.add_argument("--cpu-requests", type=int, default=60)
    ap.add_argument("--cpu-threshold", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpu-rate", type=float, default=4.0, help="requests a second on the two CPU ranks")
    ap.add_argument("--cpu-budget", type=float, default=600.0,
                    help="the CPU profile's budget in seconds (-1: the profiler's default, 300 s on a CPU)")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-goodput", action="store_true")
    ap.add_argument("--refresh-profile", action="store_true", help="profile the CPU model again (not the cached one)")
    ap.add_argument("--plot", default=None, help="write the simulated TTFT/TPOT/throughput figure here (PNG)")
    a = ap.parse_args(argv)
    for key in a.gpu:
        table, res = simulated_table(a.requests, a.speedup, a.threshold, SETTINGS[key]())
        print(table + "\n\n" + verdict(res) + "\n")
        if key == "13b":
            first = res
    if not a.skip_goodput:
        print(goodput_table(400, a.threshold) + "\n")
    if a.plot and "13b" in a.gpu:
        plot(first, a.plot)
    if not a.skip_cpu:
        print(cpu_table(a.cpu_model, a.cpu_requests, a.cpu_threshold, a.rounds, a.refresh_profile, a.cpu_rate,
                        a.cpu_budget))


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    x = np.arange(len(res))
    panels = (("TTFT p50, one request at a time (ms)", lambda r: r["alone"].ttft.p50 * 1e3),
              ("TPOT p50, one request at a time (ms)", lambda r: r["alone"].tpot.p50 * 1e3),
              ("TTFT p50, steady arrivals (ms)", lambda r: r["steady"].ttft.p50 * 1e3),
              ("peak throughput (k output tok/s)", lambda r: r["peak"].throughput_tok_s / 1e3))
    for ax, (title, f) in zip(axes, panels):
        ax.bar(x, [f(r) for r in res.values()], color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"])
        ax.set_xticks(x, list(res))
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{GPU_MODEL} on {GPU_DEVICES}, Azure code trace (simulated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
