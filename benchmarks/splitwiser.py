"""Splitwiser (a prefill and a decode process sharing one device) against one process alternating the phases on
the same device and against WAA on two devices: executed on the runner and simulated, on the same requests.

    python -m benchmarks.splitwiser [--model tiny] [--requests 48] [--rounds 3] [--profile PATH] [--device-cores N]
    python -m benchmarks.splitwiser --weights-ab [--rounds 5]   (weights="ipc" against "file" only)

Configurations (one device = the CPU's cores, or the first N of them with ``--device-cores N``; WAA's two devices
are then 2N cores, and with N = 1 both Splitwiser processes share one core):
  * alternate: continuous batching in one process, one thread (the phases take turns);
  * splitwiser 1+1: the prefill process and the decode process, one thread each (weights mapped from a file, KV
    handed off by gloo messages: the CPU's default);
  * splitwiser 1+1 ipc: the same with ``weights="ipc"``, a GPU's protocol run on the CPU (the launcher's tensors
    in shared memory, the KV through shared hand-off slots);
  * splitwiser 2+2: both processes on both cores (shares 100 % + 100 %);
  * WAA-C 1+1: ExeGPT's encode rank and decode rank, each counted as a device of its own.
Requests: all at once (saturated) and by Poisson at 60 % of the alternating plan's simulated throughput. Each
configuration runs ``--rounds`` times, interleaved; a cell is the median measured value / the simulated one;
``spread`` is the measured throughput's (max - min) / median over the rounds, the noise floor. Throughput is
every generated token over the run's makespan. The ratios against the alternating process, measured beside
simulated, are paired within each round's machine speed; the absolute simulated values carry the speed the
profile was measured at. The interference
factors the simulator used are measured first, in the same run (``profiler.interference``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re

import numpy as np
import torch

from exegpt import Arrivals, Policy, Profile, WAASchedule, Workload, evaluate_schedule, run_simulated
from exegpt.policies.cb import CBSchedule
from exegpt.policies.splitwiser import SplitwiserSchedule

WORKLOADS = {"tiny": Workload.truncated_normal(input=(48, 16, 96), output=(32, 12, 64)),
             "smollm2": Workload.truncated_normal(input=(32, 12, 64), output=(16, 6, 32))}
MB = 2 ** 20


def schedules(w: Workload) -> dict[str, tuple[object, str, dict]]:
    """Per configuration: its schedule, its devices and its run options."""
    longest = w.input_len.max
    cpu = {"colocated_device": "cpu"}
    return {"alternate (1 proc)": (CBSchedule(16, 2 * (longest + w.output_len.max), 1, 0, 1, block_size=16), "1xcpu",
                                   {}),
            "splitwiser 1+1": (SplitwiserSchedule(16, 2 * longest, 50, 50), "1xcpu", cpu),
            "splitwiser 1+1 ipc": (SplitwiserSchedule(16, 2 * longest, 50, 50), "1xcpu", {**cpu, "weights": "ipc"}),
            "splitwiser 2+2": (SplitwiserSchedule(16, 2 * longest, 100, 100), "1xcpu", cpu),
            "WAA-C 1+1 (2 dev)": (WAASchedule(Policy.WAA_C, 2, 16, 1, 0, 1, 1), "2xcpu", {})}


def _metrics(rep) -> dict[str, float]:
    """Throughput as every generated token over the run's makespan (a short run has no steady window)."""
    tokens = sum(r.num_generated for r in rep.requests)
    return {"tok/s": tokens / rep.makespan_s, "TTFT": rep.ttft.p50, "TPOT": rep.tpot.p50, "e2e": rep.e2e.p50}


@contextlib.contextmanager
def on_cores(n: int | None):
    """This process (and the ranks it spawns, which inherit it) on the first ``n`` of its cores (None: all)."""
    mine = sorted(os.sched_getaffinity(0))
    if n is not None and n > len(mine):
        raise SystemExit(f"splitwiser benchmark: {n} cores asked for, this process may use {len(mine)}")
    os.sched_setaffinity(0, mine[:n] if n else mine)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def measure(model: str, prof: Profile, requests: int, rounds: int, seed: int = 0, skip=(),
            device_cores: int | None = None) -> tuple[str, dict]:
    """``device_cores``: cores of one device (None: every core is the one device, and WAA's two devices are two
    ranks on those same cores); a two-device configuration gets twice as many."""
    from runner.run import run_plan

    w = WORKLOADS[model]
    configs = {name: c for name, c in schedules(w).items() if name not in skip}
    plans = {name: evaluate_schedule(s, w, profile=prof, devices=dev) for name, (s, dev, _) in configs.items()}
    base = run_simulated(plans["alternate (1 proc)"], prof, num_requests=requests, seed=seed)
    regimes = {"saturated": None, "poisson": Arrivals.poisson(0.6 * base.throughput_seq_s)}
    rows, out = [], {}
    for regime, arr in regimes.items():
        got: dict[str, list] = {n: [] for n in plans}
        for _ in range(rounds):
            for name, plan in plans.items():  # interleaved: the machine's drift hits every configuration alike
                torch.set_num_threads(1)
                n_dev = int(plan.devices.split("x")[0])
                with on_cores(device_cores and n_dev * device_cores):
                    got[name].append(_metrics(run_plan(plan, model, num_requests=requests, seed=seed, arrivals=arr,
                                                       timeout_s=900, **configs[name][2])))
        for name, plan in plans.items():
            sim = _metrics(run_simulated(plan, prof, num_requests=requests, seed=seed, arrivals=arr))
            meas = {k: float(np.median([g[k] for g in got[name]])) for k in sim}
            thr = [g["tok/s"] for g in got[name]]
            spread = (max(thr) - min(thr)) / meas["tok/s"]
            out[(regime, name)] = (meas, sim, spread)
            cells = [f"{meas['tok/s']:.0f} / {sim['tok/s']:.0f}"] + \
                [f"{meas[k] * 1e3:.1f} / {sim[k] * 1e3:.1f}" for k in ("TTFT", "TPOT", "e2e")]
            rows.append(f"| {regime} | {name} | " + " | ".join(cells) + f" | {spread:.0%} |")
    head = ("| requests | configuration | tok/s | TTFT p50 ms | TPOT p50 ms | e2e p50 ms | spread |\n"
            "|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows), out


def ratios(out: dict) -> str:
    """Splitwiser against the alternating process, measured and simulated."""
    lines = []
    for regime in ("saturated", "poisson"):
        alt = out[(regime, "alternate (1 proc)")]
        for name in ("splitwiser 1+1", "splitwiser 1+1 ipc", "splitwiser 2+2", "WAA-C 1+1 (2 dev)"):
            if (regime, name) not in out:
                continue
            m, s, _ = out[(regime, name)]
            lines.append(f"- {regime}, {name}: throughput {m['tok/s'] / alt[0]['tok/s']:.2f}x the alternating "
                         f"process measured ({s['tok/s'] / alt[1]['tok/s']:.2f}x simulated), e2e p50 "
                         f"{m['e2e'] / alt[0]['e2e']:.2f}x ({s['e2e'] / alt[1]['e2e']:.2f}x)")
    return "\n".join(lines)


def _map_worker(path: str, prefill: bool, barrier, results) -> None:
    from runner.colocate import load_shared, weight_residency

    torch.set_num_threads(1)
    model, _ = load_shared(path)
    model.setup_cache(16, 64)
    with torch.inference_mode():
        if prefill:  # 16 rows: the prefill process's oneDNN-packed copy, if the model's weights are large enough
            model.prefill(torch.arange(16 * 32) % model.args.vocab_size, torch.full((16,), 32), torch.arange(16))
        else:  # decode steps only, as the decode process runs (its KV comes by hand-off)
            for _ in range(4):
                model.decode(torch.arange(4), torch.arange(4))
        sum(float(p.sum()) for p in model.parameters())  # every weight page read
    barrier.wait()  # both map the file now
    results.put((prefill, weight_residency(path)))
    barrier.wait()


def weight_memory(model: str) -> str:
    """What the two processes hold of the shared weights, from their ``/proc/self/smaps``."""
    import multiprocessing as mp
    from pathlib import Path

    from runner.colocate import share_weights

    path = share_weights(model, torch.float32, 0)
    try:
        size = Path(path).stat().st_size
        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(2), ctx.SimpleQueue()
        procs = [ctx.Process(target=_map_worker, args=(path, pre, barrier, results)) for pre in (True, False)]
        for p in procs:
            p.start()
        got = dict(results.get() for _ in procs)
        for p in procs:
            p.join(60)
    finally:
        Path(path).unlink(missing_ok=True)
    pss = sum(g["pss_bytes"] for g in got.values())
    return (f"Weights of {model} ({size / MB:.1f} MiB file, fp32) in the two processes, MiB:\n\n" +
            _residency_table({"prefill" if pre else "decode": g for pre, g in got.items()}) +
            f"\n\nThe proportional shares add up to {pss / MB:.1f} MiB: {pss / size:.2f} copies of the weights.")


def _residency_table(got: dict[str, dict]) -> str:
    """Per process, what it holds of the shared weights (``runner.colocate.weight_residency``), MiB."""
    rows = [f"| {name} | {g['rss_bytes'] / MB:.1f} | {g['pss_bytes'] / MB:.1f} | {g['private_bytes'] / MB:.1f} | "
            f"{g['process_rss_bytes'] / MB:.0f} |" for name, g in got.items()]
    return ("| process | weights resident | weights, proportional share | weights, private | process RSS |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))


def interference_options(model: str, splits=((1, 1), (2, 2))):
    """The pairs the profiler times for ``model``'s workload: its mean prompt, its mean decode context."""
    from profiler.interference import InterferenceOptions

    w = WORKLOADS[model]
    ctx = int(w.input_len.mean() + w.output_len.mean() / 2)
    return InterferenceOptions(tuple(splits), (1, 4, 16), int(w.input_len.mean()), ctx, window_s=0.5)


def executed_with_interference(model: str, requests: int, rounds: int, skip=(), profile: Profile | None = None,
                               device_cores: int | None = None) -> str:
    """The interference measured now, then every configuration executed and simulated with it: one table, each
    configuration's throughput against the alternating process (measured, simulated) and the kappa factors the
    simulation priced its steps with (prefill / decode at the decode cap's batch)."""
    from profiler.interference import measure as measure_pairs
    from profiler.loop import cached_profile

    prof = profile or cached_profile(model, tp_degrees=(1,), progress=False)
    splits = [(1, 1)] + ([(2, 2)] if "splitwiser 2+2" not in skip else [])
    with on_cores(device_cores):
        inter = measure_pairs(model, interference_options(model, splits))
    prof = dataclasses.replace(prof, phase_interference=inter)
    _, out = measure(model, prof, requests, rounds, skip=tuple(skip), device_cores=device_cores)
    lines = ["| requests | configuration | tok/s | x alternate | TTFT p50 ms | TPOT p50 ms | e2e p50 ms | "
             "kappa prefill / decode | spread |", "|---|---|---|---|---|---|---|---|---|"]
    for (regime, name), (m, s, spread) in out.items():
        alt_m, alt_s, _ = out[(regime, "alternate (1 proc)")]
        kap = "-"
        split = re.search(r"(\d+)\+(\d+)", name) if name.startswith("splitwiser") else None
        if split:
            kp, kd = int(split.group(1)), int(split.group(2))
            kap = f"{inter.factors(kp, kd, 'prefill', 16)[1]:.2f} / {inter.factors(kp, kd, 'decode', 16)[1]:.2f}"
        cells = [f"{m['tok/s']:.0f} / {s['tok/s']:.0f}",
                 f"{m['tok/s'] / alt_m['tok/s']:.2f} / {s['tok/s'] / alt_s['tok/s']:.2f}"] + \
            [f"{m[k] * 1e3:.1f} / {s[k] * 1e3:.1f}" for k in ("TTFT", "TPOT", "e2e")]
        lines.append(f"| {regime} | {name} | " + " | ".join(cells) + f" | {kap} | {spread:.0%} |")
    return "\n".join(lines)


def weights_ab(model: str, prof: Profile, requests: int, rounds: int, seed: int = 0) -> str:
    """Splitwiser 1+1 with ``weights="ipc"`` against ``"file"`` on the CPU, paired within each round (the order
    alternating), with every request at once and under Poisson arrivals at 60 % of the plan's simulated rate: per
    metric the median of the per-round ratios and their range, and each side's spread over the rounds."""
    from runner.run import run_plan

    w = WORKLOADS[model]
    plan = evaluate_schedule(SplitwiserSchedule(16, 2 * w.input_len.max, 50, 50), w, profile=prof, devices="1xcpu")
    rate = 0.6 * run_simulated(plan, prof, num_requests=requests, seed=seed).throughput_seq_s
    rows = []
    for regime, arr in (("saturated", None), ("poisson", Arrivals.poisson(rate))):
        got: dict[str, list] = {"file": [], "ipc": []}
        for r in range(rounds):
            for mode in (("file", "ipc") if r % 2 == 0 else ("ipc", "file")):
                torch.set_num_threads(1)
                got[mode].append(_metrics(run_plan(plan, model, num_requests=requests, seed=seed, arrivals=arr,
                                                   timeout_s=900, weights=mode, colocated_device="cpu")))
        for k in ("tok/s", "TPOT", "e2e"):
            ratio = [i[k] / f[k] for i, f in zip(got["ipc"], got["file"])]
            spread = [(max(v) - min(v)) / float(np.median(v)) for v in
                      ([g[k] for g in got[m]] for m in ("file", "ipc"))]
            rows.append(f"| {regime} | {k} p50 | {np.median(ratio):.2f}x | {min(ratio):.2f}-{max(ratio):.2f}x | "
                        f"{spread[0]:.0%} / {spread[1]:.0%} |".replace("tok/s p50", "tok/s"))
    return ("| requests | metric | ipc / file, median | per round | spread file / ipc |\n|---|---|---|---|---|\n" +
            "\n".join(rows))


def _ipc_worker(rank: int, world_size: int, device) -> dict:
    import torch.distributed as dist

    from runner.colocate import weight_residency
    from runner.colocate_ipc import model_from_shared
    from runner.launch import take_shared

    torch.set_num_threads(1)
    model, _ = model_from_shared(take_shared())
    model.setup_cache(16, 64)
    with torch.inference_mode():
        if rank == 0:  # the prefill process, as in _map_worker
            model.prefill(torch.arange(16 * 32) % model.args.vocab_size, torch.full((16,), 32), torch.arange(16))
        else:
            for _ in range(4):
                model.decode(torch.arange(4), torch.arange(4))
        sum(float(p.sum()) for p in model.parameters())
    dist.barrier()  # both hold the weights now
    got = weight_residency(list(model.parameters()))
    dist.barrier()
    return got


def ipc_weight_memory(model: str) -> str:
    """What two ranks that took the weights from the launcher (``weights="ipc"`` on a CPU: shared memory) hold of
    them, and what the launcher holds once they exited."""
    from runner.colocate import weight_residency
    from runner.colocate_ipc import build_shared
    from runner.launch import RankSetup, launch

    shared = build_shared(model, torch.float32, torch.device("cpu"), 0, {})
    size = sum(t.numel() * t.element_size() for t in shared.state.values())
    got = launch(_ipc_worker, 2, (), 600, setup=RankSetup(shared=shared, backend="gloo"))
    mine = weight_residency(list(shared.state.values()))
    pss = sum(g["pss_bytes"] for g in got)
    return (f"Weights of {model} ({size / MB:.1f} MiB, fp32) shared by IPC, MiB (the launcher maps them too while "
            f"the ranks run):\n\n" + _residency_table(dict(zip(("prefill", "decode"), got))) +
            f"\n\nThe ranks' proportional shares add up to {pss / MB:.1f} MiB ({pss / size:.2f} of a copy); the "
            f"launcher, alone after they exited, holds {mine['rss_bytes'] / MB:.1f} MiB resident "
            f"({mine['pss_bytes'] / size:.2f} copies).")


def main(argv=None) -> None:
    from profiler.interference import measure as measure_pairs, table as pair_table
    from profiler.loop import cached_profile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(WORKLOADS))
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", default=None, help="a profile JSON (default: the cached CPU profile of --model)")
    ap.add_argument("--refresh-profile", action="store_true", help="re-measure the cached profile first")
    ap.add_argument("--save-profile", default=None, help="write the profile with the interference measured")
    ap.add_argument("--splits", nargs="*", default=["1+1", "2+2"], help="thread splits the interference covers")
    ap.add_argument("--skip", nargs="*", default=(), help="configurations to leave out, e.g. 'splitwiser 2+2'")
    ap.add_argument("--device-cores", type=int, default=None,
                    help="cores of one device (default: all of them; WAA's two devices then share them)")
    ap.add_argument("--weights-ab", action="store_true", help="only weights='ipc' against 'file', paired rounds")
    a = ap.parse_args(argv)
    if a.weights_ab:
        prof = Profile.load(a.profile) if a.profile else cached_profile(a.model, tp_degrees=(1,), progress=False)
        print(f"Splitwiser 1+1, weights='ipc' against 'file', {a.model}, {a.requests} requests, {a.rounds} rounds:\n")
        print(weights_ab(a.model, prof, a.requests, a.rounds))
        return
    print(weight_memory(a.model) + "\n")
    print(ipc_weight_memory(a.model) + "\n")
    prof = Profile.load(a.profile) if a.profile else cached_profile(a.model, tp_degrees=(1,), progress=False,
                                                                    refresh=a.refresh_profile)
    splits = tuple(tuple(int(x) for x in sp.split("+")) for sp in a.splits)
    opts = interference_options(a.model, splits)
    with on_cores(a.device_cores):
        inter = measure_pairs(a.model, opts)
    prof = dataclasses.replace(prof, phase_interference=inter)
    if a.save_profile:
        prof.save(a.save_profile)
    print(f"Interference measured ({a.model}, prompts of {inter.prompt_len} tokens, decode context "
          f"{opts.context_len}; scale: "
          f"alone on the split over one thread alone; kappa: beside the other phase over alone, minus 1):\n")
    print(pair_table(inter) + "\n")
    table, out = measure(a.model, prof, a.requests, a.rounds, skip=tuple(a.skip), device_cores=a.device_cores)
    print(f"Executed / simulated, {a.model}, {a.requests} requests, {a.rounds} rounds (median):\n")
    print(table + "\n")
    print(ratios(out))


if __name__ == "__main__":
    main()
