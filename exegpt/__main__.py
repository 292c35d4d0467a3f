"""Command line: ``exegpt plan | simulate | sweep`` (also ``python -m exegpt``).

  exegpt plan --task S --bound 3.1 [--model opt-13b --devices 4xA40] [-o plan.json]
  exegpt plan --trace requests.csv --bound 10 --model llama-2-7b --devices 2xA100
  exegpt plan --input 256,252,512 --output 32,13,80 --bound 5.9 --profile profile.json
  exegpt plan --task S --ttft 2 --tpot 0.15 --devices 2xA100          (goodput under p90 TTFT / TPOT)
  exegpt plan --task S --completion 10:0.9 --devices 2xA100           (90 % of requests within 10 s)
  exegpt simulate --schedule rra:encode_batch=16,decode_iters=8 --task C1
  exegpt simulate --plan plan.json --requests 2000 --arrivals poisson:20
  exegpt sweep --task T --bounds 5 10 20 inf

Every bad argument is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from .bound import LatencyBound
from .errors import ExeGPTError, InfeasibleBoundError
from .models import MODELS, get_model
from .problem import DEFAULT_MODEL, offered_cluster
from .search.optimize import (SearchSpace, evaluate_schedule, exhaustive_schedule, find_schedule, frontier,
                              smallest_feasible_bound, static_schedule)
from .plan import Plan
from .profile import Profile
from .arrivals import Arrivals
from .policies import describe, policy_module
from .search.goodput import SimulatedSearch
from .schedule import policy_of
from .sim import run_simulated
from .slo import CompletionSLO, RequestSLO
from .workload import TASKS, TRACES, Workload


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too; keep it short)
        self.exit(2, f"exegpt: error: {message}\n")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _triple(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    try:
        mean, std, mx = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not MEAN,STD,MAX (e.g. 256,252,512)") from None
    return mean, std, mx


def _add_workload(p: argparse.ArgumentParser):
    g = p.add_argument_group("workload (one of)")
    g.add_argument("--task", help=f"the paper's task: {', '.join(TASKS)}")
    g.add_argument("--builtin-trace", choices=list(TRACES), help="a shipped real trace")
    g.add_argument("--trace", help="a trace file: Vidur, Azure or BurstGPT CSV, Mooncake JSONL, ShareGPT JSON")
    g.add_argument("--input", type=_triple, help="input length MEAN,STD,MAX (truncated normal)")
    g.add_argument("--output", type=_triple, help="output length MEAN,STD,MAX (truncated normal)")
    g.add_argument("--max-context", choices=("drop", "clip"),
                   help="fit a trace to the model's context: drop or clip the requests over it (said in the output)")


def _add_target(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help=f"model name (default opt-13b): {', '.join(MODELS)}")
    p.add_argument("--devices", default=None, help="COUNTxDEVICE, e.g. 4xA40 (default), 8xH100")
    p.add_argument("--profile", default=None, help="a profile JSON (default: the built-in GPU profile)")
    p.add_argument("--quantile", type=_number, default=0.99, help="output-length quantile the bound applies to")


def _workload(a) -> Workload:
    given = [x for x in ("task", "builtin_trace", "trace") if getattr(a, x)]
    given += ["input/output"] if a.input or a.output else []
    if len(given) != 1:
        raise ExeGPTError("give exactly one workload: --task, --builtin-trace, --trace or --input with --output"
                          + (f" (got {', '.join(given)})" if given else ""))
    if a.task:
        w = Workload.task(a.task)
    elif a.builtin_trace:
        w = Workload.trace(a.builtin_trace)
    elif a.trace:
        w = Workload.from_trace(a.trace)
    else:
        w = None
    if w is not None:
        if getattr(a, "max_context", None):
            model = a.model or (Profile.load(a.profile).model if getattr(a, "profile", None) else DEFAULT_MODEL)
            context = get_model(model).max_seq_len
            fitted, changed, (p_cap, o_cap) = w.within_context(context, a.max_context)
            if changed:
                print(f"{w.name}: {changed} of {len(w.pairs)} requests {a.max_context}ped to fit {context} tokens "
                      f"(prompts <= {p_cap}, outputs <= {o_cap})")
            w = fitted
        return w
    if not (a.input and a.output):
        raise ExeGPTError("--input and --output go together (each MEAN,STD,MAX)")
    return Workload.truncated_normal(a.input, a.output)


def _target(a) -> dict:
    profile = Profile.load(a.profile) if a.profile else None
    return dict(model=a.model, devices=a.devices, profile=profile)


def _bound(value: float, quantile: float) -> LatencyBound:
    return LatencyBound(value, quantile)


def _note_extrapolation(plan: Plan, profile: Profile | None) -> None:
    """Says when the plan's estimate read a measured profile's fitted cells or beyond its grid."""
    if profile is not None and profile.source == "measured":
        from .extrapolation import extrapolation_note

        note = extrapolation_note(plan, profile)
        if note:
            print(f"  note: {note}")


def _print_plan(plan: Plan, title: str = "plan"):
    e = plan.estimate
    print(f"{title}: {describe(plan.schedule)}   [{plan.model} on {plan.devices}, profile {plan.profile_id}]")
    rows = [
        ("throughput", f"{e.throughput_seq_s:.3f} seq/s   {e.throughput_tok_s:.1f} tok/s"),
        (f"latency (p{plan.bound.length_quantile * 100:g} length = {e.latency_len} tok)",
         f"{e.latency_s:.3f} s" + (f"   (bound {plan.bound.bound_s:g} s)" if plan.slo is None else "")),
        ("encode stage / decode step", f"{e.encode_stage_s * 1e3:.2f} ms / {e.decode_step_s * 1e3:.2f} ms"),
        ("decode batch B_D", f"{e.decode_batch:.1f}"),
        ("peak memory per device", f"{max(e.memory_bytes) / 2**30:.2f} GiB of {e.memory_capacity_bytes / 2**30:.1f}"),
        ("stages", "  ".join(f"[{s.role} tp{s.tp}{f' sp{s.sp}' if s.sp > 1 else ''} "
                             f"L{s.first_layer}-{s.first_layer + s.n_layers - 1}]" for s in plan.stages)),
        ("search", f"{plan.search.method}: {plan.search.candidates_evaluated} candidates of "
                   f"{plan.search.space_size} in {plan.search.wall_s:.3f} s"),
    ]
    c = plan.slo_check
    if c is not None and c.form != "quantile_length":
        achieved = " / ".join(f"{x:.4g} s" for x in c.achieved)
        rows.append(("SLO (simulated)", f"{c.description}: {'holds' if c.holds else 'MISSED'}, achieved {achieved}, "
                                        f"margin {c.margin:.1%} on {c.num_requests} requests"))
        if c.form == "request":
            rows.append(("goodput", f"{c.goodput_rps:.3f} requests/s (Poisson arrivals)"))
    if plan.search.per_policy:
        form = "quantile_length" if c is None else c.form
        unit = {"request": "req/s goodput", "completion": "seq/s simulated"}.get(form, "seq/s estimated")
        rows.append(("best of each policy", ", ".join(f"{p} {v:.3f}" for p, v in plan.search.per_policy)
                     + f" ({unit}; 0: none kept the SLO"
                     + (" or its estimate could not beat the pick)" if form != "quantile_length" else ")")))
    if plan.search.replay_requests:
        rows.append(("replayed worst latency", f"{plan.search.replay_latency_s:.3f} s on "
                                                 f"{plan.search.replay_requests} requests"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _space(a) -> SearchSpace:
    return SearchSpace(a.max_encode_batch, a.max_micro_batch)


def _slo(a):
    """The one SLO form the arguments give: --bound (a), --completion (b) or --ttft with --tpot (c)."""
    forms = [f for f, on in (("--bound", a.bound is not None), ("--completion", a.completion is not None),
                             ("--ttft/--tpot", a.ttft is not None or a.tpot is not None)) if on]
    if len(forms) != 1:
        raise ExeGPTError("give exactly one SLO: --bound SECONDS, --completion SECONDS:SHARE or --ttft SECONDS "
                          "with --tpot SECONDS" + (f" (got {', '.join(forms)})" if forms else ""))
    if a.bound is not None:
        return _bound(a.bound, a.quantile)
    if a.completion is not None:
        bound, sep, share = a.completion.partition(":")
        try:
            return CompletionSLO(float(bound), float(share) if sep else 0.99)
        except ValueError:
            raise ExeGPTError(f"--completion {a.completion!r} is not SECONDS[:SHARE] (e.g. 10:0.9)") from None
    if a.ttft is None or a.tpot is None:
        raise ExeGPTError("--ttft and --tpot go together (seconds each)")
    return RequestSLO(a.ttft, a.tpot, a.percentile)


def cmd_plan(a) -> int:
    w, target = _workload(a), _target(a)
    bound = _slo(a)
    if not isinstance(bound, LatencyBound):
        if a.exhaustive or a.verify:
            raise ExeGPTError("--exhaustive and --verify apply to --bound; --completion and --ttft/--tpot are "
                              "searched on the simulated engine")
        plan = find_schedule(w, bound, **target, policies=a.policies, tp_degrees=a.tp, space=_space(a),
                             device_counts=a.device_counts,
                             simulated=SimulatedSearch(num_requests=a.sim_requests, max_simulated=a.max_simulated))
        _print_plan(plan)
        _note_extrapolation(plan, target["profile"])
        if a.out:
            plan.save(a.out)
            print(f"wrote {a.out}")
        return 0
    fn = exhaustive_schedule if a.exhaustive else find_schedule
    kw = dict(target, policies=a.policies, tp_degrees=a.tp, space=_space(a), device_counts=a.device_counts)
    if not a.exhaustive:
        kw.update(eps_throughput=a.eps_throughput, eps_latency=a.eps_latency, verify_requests=a.verify,
                  per_policy=a.per_policy)
    elif a.verify:
        raise ExeGPTError("--verify replays the pick of the branch-and-bound search; drop --exhaustive or --verify")
    plan = fn(w, bound, **kw)
    _print_plan(plan)
    _note_extrapolation(plan, target["profile"])
    given = offered_cluster(a.devices, target["profile"])
    if plan.schedule.num_gpus < given.count:
        print(f"  uses {plan.schedule.num_gpus} of the {given.count} devices: more would be slower under this bound "
              f"(--device-counts {given.count} forces all)")
    try:
        base = static_schedule(w, bound, **target)
        gain = plan.estimate.throughput_seq_s / base.estimate.throughput_seq_s
        print(f"  vs static batching     {describe(base.schedule)}: {base.estimate.throughput_seq_s:.3f} seq/s "
              f"-> {gain:.2f}x")
    except InfeasibleBoundError as err:
        print(f"  vs static batching     infeasible at this bound ({err.smallest_feasible_s:.3g} s needed)")
    if a.out:
        plan.save(a.out)
        print(f"wrote {a.out}")
    return 0


def _parse_schedule(text: str, num_gpus: int):
    name, _, rest = text.partition(":")
    policy = policy_of(name.strip().lower())
    kv = {}
    for item in filter(None, rest.split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            raise ExeGPTError(f"schedule field {item!r} is not NAME=VALUE")
        try:
            kv[k.strip()] = int(v)
        except ValueError:
            raise ExeGPTError(f"schedule field {k.strip()}={v!r} is not an integer") from None
    try:
        return policy_module(policy).parse(policy, kv, num_gpus)
    except TypeError as e:
        raise ExeGPTError(f"schedule {text!r}: {e}") from None


def cmd_simulate(a) -> int:
    arrivals = Arrivals.parse(a.arrivals)
    if a.plan:
        plan = Plan.load(a.plan)
        w = plan.workload if not any((a.task, a.builtin_trace, a.trace, a.input)) else _workload(a)
        target = _target(a)
        target["model"] = target["model"] or plan.model
        target["devices"] = target["devices"] or plan.devices
        schedule = plan.schedule
    else:
        if not a.schedule:
            raise ExeGPTError("give --schedule POLICY:FIELD=VALUE,... or --plan plan.json")
        w, target = _workload(a), _target(a)
        from .devices import parse_cluster
        n = parse_cluster(target["devices"] or ("4xA40" if target["profile"] is None
                                                else f"1x{target['profile'].device}")).count
        schedule = _parse_schedule(a.schedule, n)
    plan = evaluate_schedule(schedule, w, _bound(a.bound, a.quantile), **target)
    _print_plan(plan, "simulated")
    if not plan.estimate.memory_ok:
        print("  WARNING: this schedule does not fit in device memory")
    if a.requests:
        rep = run_simulated(plan, target["profile"], a.requests, a.seed, arrivals=arrivals)
        print(f"simulated engine: {a.requests} requests, arrivals {arrivals.describe()}, seed {a.seed}")
        print(rep.table())
    return 0


def cmd_sweep(a) -> int:
    w, target = _workload(a), _target(a)
    bounds = [_bound(b, a.quantile) for b in a.bounds]
    plans = frontier(w, bounds, **target, policies=a.policies, space=_space(a))
    print(f"{'bound s':>9} {'policy / schedule':<58} {'seq/s':>9} {'latency s':>10} {'static seq/s':>13} {'gain':>6}")
    for b, plan in zip(bounds, plans):
        try:
            base = static_schedule(w, b, **target).estimate.throughput_seq_s
        except InfeasibleBoundError:
            base = float("nan")
        if plan is None:
            print(f"{b.bound_s:>9g} {'infeasible':<58} {'-':>9} {'-':>10} {base:>13.3f} {'-':>6}")
            continue
        e = plan.estimate
        print(f"{b.bound_s:>9g} {describe(plan.schedule):<58} {e.throughput_seq_s:>9.3f} {e.latency_s:>10.3f} "
              f"{base:>13.3f} {e.throughput_seq_s / base:>6.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="exegpt", description="Find the highest-throughput LLM execution schedule under a latency bound.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    plan = sub.add_parser("plan", help="search the best schedule and write plan.json")
    _add_workload(plan)
    _add_target(plan)
    slo = plan.add_argument_group("SLO (one of)")
    slo.add_argument("--bound", type=_number, default=None,
                     help="(a) latency bound in seconds on the --quantile-length output (inf for none)")
    slo.add_argument("--completion", metavar="SECONDS[:SHARE]",
                     help="(b) SHARE (default 0.99) of requests finish within SECONDS of their prefill")
    slo.add_argument("--ttft", type=_number, help="(c) time to first token bound (s), with --tpot: max goodput")
    slo.add_argument("--tpot", type=_number, help="(c) time per output token bound (s)")
    slo.add_argument("--percentile", type=_number, default=90.0, help="(c) percentile of TTFT and TPOT (default 90)")
    slo.add_argument("--sim-requests", type=int, default=400,
                     help="(b), (c): requests of each simulated run, at least (default 400)")
    slo.add_argument("--max-simulated", type=int, default=24,
                     help="(b), (c): schedules simulated at most, best estimate first (default 24)")
    plan.add_argument("--policies", nargs="+", default=None,
                      help="policies to search (default: every registered policy but static batching)")
    plan.add_argument("--per-policy", action="store_true",
                      help="under --bound, also search each policy for its own best and print them (slower)")
    plan.add_argument("--tp", type=int, nargs="+", default=None, help="TP degrees to try (default: all)")
    plan.add_argument("--device-counts", type=int, nargs="+", default=None,
                      help="how many of the devices a schedule may use (default: any count; e.g. 4 uses all of 4xA40)")
    plan.add_argument("--eps-throughput", type=_number, default=0.0)
    plan.add_argument("--eps-latency", type=_number, default=0.0)
    plan.add_argument("--max-encode-batch", type=int, default=256)
    plan.add_argument("--max-micro-batch", type=int, default=256)
    plan.add_argument("--exhaustive", action="store_true", help="evaluate every point instead of branch and bound")
    plan.add_argument("--verify", type=int, default=0, metavar="N",
                      help="replay the pick on N requests of the workload and keep it only if their worst "
                           "bound-length latency meets the bound (default 0: no replay)")
    plan.add_argument("-o", "--out", default="plan.json", help="plan file to write ('' for none)")
    plan.set_defaults(fn=cmd_plan)

    sim = sub.add_parser("simulate", help="estimate one schedule")
    _add_workload(sim)
    _add_target(sim)
    sim.add_argument("--schedule", help="e.g. rra:encode_batch=16,decode_iters=8,tp=2,tp_gpus=4 or "
                                        "waa_c:encode_batch=4,micro_batch=32,encode_gpus=1")
    sim.add_argument("--plan", help="simulate the schedule of a plan file")
    sim.add_argument("--bound", type=_number, default=math.inf)
    sim.add_argument("--requests", type=int, default=0,
                     help="also run it on the simulated engine on N requests and print the report")
    sim.add_argument("--arrivals", default="all", help="all (default), poisson:RATE (requests/s) or trace[:SPEEDUP]")
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(fn=cmd_simulate)

    sw = sub.add_parser("sweep", help="best throughput at each bound (the frontier), against static batching")
    _add_workload(sw)
    _add_target(sw)
    sw.add_argument("--bounds", type=_number, nargs="+", required=True)
    sw.add_argument("--policies", nargs="+", default=["rra", "waa_c", "waa_m"])
    sw.add_argument("--max-encode-batch", type=int, default=256)
    sw.add_argument("--max-micro-batch", type=int, default=256)
    sw.set_defaults(fn=cmd_sweep)

    pl = sub.add_parser("plot", help="draw a figure to a PNG: frontier, lengths, timeline or profile")
    pl.add_argument("figure", choices=("frontier", "lengths", "timeline", "profile"),
                    help="frontier: every policy's throughput against the bound; lengths: the workload's "
                         "distributions; timeline: a plan's requests over time on the simulated engine; profile: "
                         "the kernel curves of --profile P.json (default: the built-in one of --model on --devices)")
    _add_workload(pl)
    _add_target(pl)
    pl.add_argument("--bounds", type=_number, nargs="+", help="frontier: the bounds (default: 12 from the smallest "
                                                               "feasible to 4x it)")
    pl.add_argument("--plan", help="timeline: a plan.json to simulate")
    pl.add_argument("--requests", type=int, default=60, help="timeline: requests to simulate and draw")
    pl.add_argument("--arrivals", default="all", help="timeline: all, poisson:RATE or trace[:SPEEDUP]")
    pl.add_argument("-o", "--out", required=True, help="the PNG to write")
    pl.set_defaults(fn=cmd_plot)
    return p


def cmd_plot(a) -> int:
    from . import plot

    if a.figure == "timeline":
        if not a.plan:
            raise ExeGPTError("plot timeline needs --plan plan.json")
        if a.requests < 1:
            raise ExeGPTError(f"--requests {a.requests} must be >= 1")
        plan = Plan.load(a.plan)
        report = run_simulated(plan, Profile.load(a.profile) if a.profile else None, num_requests=a.requests,
                               arrivals=Arrivals.parse(a.arrivals))
        fig = plot.timeline_figure(report, max_requests=a.requests)
    elif a.figure == "lengths":
        fig = plot.lengths_figure(_workload(a), a.quantile)
    elif a.figure == "profile":
        from .gpu_data import builtin_profile
        from .problem import DEFAULT_MODEL, offered_cluster

        prof = Profile.load(a.profile) if a.profile else builtin_profile(a.model or DEFAULT_MODEL,
                                                                          offered_cluster(a.devices).device)
        fig = plot.profile_figure(prof)
    else:
        w, target = _workload(a), _target(a)
        bounds = a.bounds
        if bounds is None:
            low = smallest_feasible_bound(w, **target)
            bounds = list(np.geomspace(low, 4 * low, 12))
        fig = plot.frontier_figure(w, bounds, **target)
    fig.savefig(a.out, dpi=110, bbox_inches="tight")
    print(f"wrote {a.out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except InfeasibleBoundError as e:
        print(f"exegpt: infeasible: {e}", file=sys.stderr)
        return 2
    except ExeGPTError as e:
        print(f"exegpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
