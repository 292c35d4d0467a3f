"""run_plan: execute an ``exegpt.Plan`` on the built-in backend and measure it.

One process per device of the schedule (``schedule.num_gpus``): in-process for one rank, spawned gloo ranks
otherwise, or the ranks torchrun started (``env://``, NCCL on CUDA). Every rank runs ``runner.engine.run_policy``,
which executes the plan's policy drivers (``exegpt.policies``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from exegpt.arrivals import Arrivals
from exegpt.checks import instance
from exegpt.errors import ExeGPTError
from exegpt.models import MODELS
from exegpt.plan import Plan
from exegpt.policies import REGISTRY, driver_groups, policy_module
from exegpt.replan import DriftOptions
from exegpt.replicas import replicas_of
from exegpt.rules import SteadyStop
from exegpt.ledger import Ledger
from exegpt.report import RequestRecord, RunReport, build_report
from exegpt.stages import Stage
from exegpt.workload import Workload

from . import cpu_kernels
from .dist import layout
from .launch import Fault, RankFailedError, RankSetup, can_publish, init_from_env, launch, publish, torchrun_env
from .engine import run_policy
from .pipeline import DTYPES, RunContext
from .requests import Request, make_requests

log = logging.getLogger(__name__)


def model_args(spec: str):
    """The ``runner.model.ModelArgs`` of a model spec, without loading its weights."""
    from .model import ModelArgs

    if spec in MODELS:
        return ModelArgs.from_name(spec)
    if spec == "smollm2":
        return ModelArgs.from_name("smollm2-135m")
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        from .weights import hf_args

        return hf_args(json.loads((path / "config.json").read_text()))
    raise ExeGPTError(f"unknown model {spec!r}: not a preset ({', '.join(MODELS)}), 'smollm2' or a checkpoint "
                      f"folder with config.json")


def check_stages(plan: Plan) -> None:
    """The plan's stages must match its schedule: roles, TP degrees, and each pipeline covering every layer."""
    want = policy_module(plan.schedule.policy).stage_roles(plan.schedule)
    got = tuple((s.role, s.tp) for s in plan.stages)
    if want != got:
        raise ExeGPTError(f"plan stages (role, tp) {list(got)} do not match the {plan.schedule.policy.value} "
                          f"schedule, which implies {list(want)}")
    for role in {r for r, _ in want}:
        stages = [s for s in plan.stages if s.role == role]
        at = 0
        for s in stages:
            if s.first_layer != at or s.n_layers < 1:
                raise ExeGPTError(f"{role} stages must cover consecutive layers from 0, each at least one: "
                                  f"got {[(s.first_layer, s.n_layers) for s in stages]}")
            at += s.n_layers


def remap_stages(stages: tuple[Stage, ...], n_layers: int) -> tuple[Stage, ...]:
    """Scales each pipeline's layer split to a model of ``n_layers`` layers, proportionally.

    Stage boundaries ``b`` of a pipeline with ``L`` layers move to ``round(b * n_layers / L)``, kept strictly
    increasing so that every stage keeps at least one layer.

    Raises:
        ExeGPTError: the model has fewer layers than some pipeline has stages.
    """
    out: list[Stage] = []
    for role in dict.fromkeys(s.role for s in stages):
        group = [s for s in stages if s.role == role]
        total = sum(s.n_layers for s in group)
        if total == n_layers:
            out += group
            continue
        if n_layers < len(group):
            raise ExeGPTError(f"the model has {n_layers} layers, fewer than the {len(group)} {role} stages of "
                              f"the plan")
        ends, acc = [], 0
        for i, s in enumerate(group):
            acc += s.n_layers
            e = round(acc * n_layers / total)
            e = max(e, (ends[-1] if ends else 0) + 1)  # every stage keeps a layer
            e = min(e, n_layers - (len(group) - 1 - i))  # and leaves one for each later stage
            ends.append(e)
        start = 0
        for s, e in zip(group, ends):
            out.append(dataclasses.replace(s, first_layer=start, n_layers=e - start))
            start = e
    return tuple(out)


def cache_len_of(plan: Plan, max_seq_len: int) -> int:
    """KV positions per row: the plan workload's longest prompt plus longest output, within the context."""
    return min(max_seq_len, plan.workload.max_total_len)


@dataclass(frozen=True)
class RunOptions:
    """How ``run_plan`` runs a plan (every field has a default; ``run_plan(..., seed=3)`` overrides one)."""

    num_requests: int = 64
    """Requests drawn from the trace (or the plan's workload) when none are given."""
    seed: int = 0
    """Seeds the request stream and the random weights of presets."""
    arrivals: Arrivals | None = None
    """When the drawn requests arrive (default: all at once)."""
    dtype: str = "fp32"
    """'fp32', 'bf16' or 'fp16'."""
    stop_at_eos: bool = False
    """End a request at its first EOS (default: forced to its target length)."""
    eos_id: int | None = None
    keep_tokens: bool = False
    """Keep every request's greedy tokens in the report."""
    timeout_s: float = 600.0
    """Wall-clock limit of a multi-process run."""
    progress: bool = False
    fault: Fault | None = None
    """A fault to inject (``runner.launch.Fault``: a rank raises, is killed or hangs after n commands)."""
    log_decisions: bool = False
    """Keep the reporting driver's actions in ``RunReport.decisions`` (conformance with ``exegpt.sim``)."""
    batch_invariant: bool = False
    """Every request's tokens independent of what it is batched with, in any precision, at a cost in speed
    (``runner.numerics``)."""
    weights: str | None = None
    """Processes sharing one device (Splitwiser): how they share the weights, 'file' (a mapped file in /dev/shm)
    or 'ipc' (the launcher's tensors: CUDA IPC, shared memory on a CPU); default 'file' on a CPU, 'ipc' on a GPU
    (``runner.colocate``)."""
    colocated_device: str | None = None
    """The device processes sharing one device compute on ('cpu', 'cuda:N'); default the first GPU where CUDA is
    available, else the CPU."""
    latency_lens: tuple[int, ...] | None = None
    """Per request, the output length whose token time its record keeps (``latency_len_token_s``; default: the
    plan's bound length), as ``run_simulated(latency_lens=...)``."""
    drift: DriftOptions | None = None
    """Watch the lengths served and re-plan live when they drift (``exegpt.replan``; RRA and WAA, one replica):
    the report's ``drift`` says what was detected and applied."""
    steady_stop: SteadyStop | None = None
    """End the run at the first phase boundary where its steady window holds what this asks (RRA; a measurement
    run such as the profiler's engine calibration: no drain after the window; the requests still running are
    reported failed)."""


def run_plan(plan: Plan, model: str = "tiny", requests: tuple[Request, ...] | None = None,
             trace: Workload | None = None, options: RunOptions | None = None, **overrides) -> RunReport | None:
    """Executes ``plan`` on ``model`` and returns what it measured.

    Args:
        requests: the requests to run; by default ``options.num_requests`` are drawn (seeded) from ``trace`` if
            given, else from ``plan.workload``, with random prompt ids, arriving by ``options.arrivals``.
        options: ``RunOptions``; keyword ``overrides`` replace its fields.
    Returns:
        the report (None on the ranks of a torchrun job that do not hold it).
    Raises:
        ExeGPTError: bad plan, model or arguments. RankFailedError: a rank failed, died or timed out.
    """
    return run_plans([plan], model, requests, trace, options, **overrides)[0]


def run_plans(plans: list[Plan], model: str = "tiny", requests: tuple[Request, ...] | None = None,
              trace: Workload | None = None, options: RunOptions | None = None, **overrides
              ) -> list[RunReport | None]:
    """``run_plan`` for several plans, one after the other; plans needing the same number of ranks share one
    set of processes (process start-up dominates short runs). Arguments as in ``run_plan``."""
    for p in plans:
        instance(p, Plan, "plan", "a Plan (find_schedule's result, or Plan.load(path))")
    try:
        opts = dataclasses.replace(options or RunOptions(), **overrides)
    except TypeError as e:
        raise ExeGPTError(f"run_plan: {e}; the options are {', '.join(RunOptions.__dataclass_fields__)}") from None
    if opts.batch_invariant and not torchrun_env():  # the ranks start here, on this machine's device
        cpu_kernels.check_batch_invariant(torch.device("cuda" if torch.cuda.is_available() else "cpu"), opts.dtype)
    ctxs = [_context(p, model, requests, trace, opts) for p in plans]
    worlds = [_num_ranks(p) for p in plans]
    shared = [i for i, p in enumerate(plans) if getattr(policy_module(p.schedule.policy), "SHARES_WEIGHTS", False)]
    if shared and not torchrun_env():  # processes sharing one device and one copy of the weights
        from .colocate import colocated

        with colocated({i: ctxs[i] for i in shared}, model_args(model), DTYPES[opts.dtype], opts) as (
                done, setups, notes):
            ctxs = [done.get(i, c) for i, c in enumerate(ctxs)]

            def noted(reports):
                return [dataclasses.replace(r, notes=r.notes + notes) if r is not None and i in shared else r
                        for i, r in enumerate(reports)]
            try:
                return noted(_run_contexts(plans, ctxs, worlds, opts, setups))
            except RankFailedError as e:  # a failed run's reports say how the device was shared too
                e.reports = noted(e.reports or [])
                raise
    return _run_contexts(plans, ctxs, worlds, opts)


def _num_ranks(plan: Plan) -> int:
    """Processes a plan runs on: one per device, or the policy's own count (Splitwiser: two on one device)."""
    module = policy_module(plan.schedule.policy)
    return module.num_ranks(plan.schedule) if hasattr(module, "num_ranks") else plan.schedule.num_gpus


def _run_contexts(plans: list[Plan], ctxs: list[RunContext], worlds: list[int], opts: RunOptions,
                  setups: dict[int, RankSetup] | None = None) -> list[RunReport | None]:
    """Runs the plans, those needing the same processes (ranks, and ``setups``: how a plan's ranks start) in one
    launch each."""
    out: list[RunReport | None] = [None] * len(plans)
    setups = setups or {}
    if torchrun_env():
        rank, size, device = init_from_env(opts.timeout_s)
        if any(w != size for w in worlds):
            raise ExeGPTError(f"torchrun started {size} ranks; the plans need {sorted(set(worlds))}")
        for i, report in _rank_main(rank, size, device, ctxs, list(range(len(ctxs)))):
            out[i] = report
        return out
    keys = [(w, tuple(tuple(sorted(e.items())) for e in setups[i].env) if i in setups else None)
            for i, w in enumerate(worlds)]
    for key in dict.fromkeys(keys):
        world = key[0]
        idx = [i for i, k in enumerate(keys) if k == key]
        log.info("running %d plan(s) on %d rank(s): %s", len(idx), world,
                 ", ".join(plans[i].schedule.policy.value for i in idx))
        if world == 1:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            results = [_rank_main(0, 1, device, [ctxs[i] for i in idx], idx)]
        else:
            partial = _Collected()  # spawned ranks publish their reports as each plan ends, and return none
            try:
                launch(_rank_main, world, ([ctxs[i] for i in idx], idx), opts.timeout_s, partial.add,
                       setups.get(idx[0], RankSetup()))
            except RankFailedError as e:
                e.reports = [partial.report(i, ctxs[i], str(e), world) if i in idx else out[i]
                             for i in range(len(plans))]
                raise
            results = [list(partial.reports.items())]
        for pairs in results:
            for i, report in pairs:
                out[i] = report
    return out


def _context(plan: Plan, model: str, requests, trace, opts: RunOptions) -> RunContext:
    """Validates a plan against the model and builds the RunContext every rank executes."""
    if opts.dtype not in DTYPES:
        raise ExeGPTError(f"dtype {opts.dtype!r} unknown; expected one of {', '.join(DTYPES)}")
    policy_module(plan.schedule.policy)
    args = model_args(model)
    if args.family == "t5":
        module = policy_module(plan.schedule.policy)
        if not getattr(module, "ENCODER_DECODER", False) or plan.schedule.num_gpus != 1:
            runs = [p for p, m in REGISTRY.items() if getattr(m, "ENCODER_DECODER", False)]
            raise ExeGPTError(f"T5 runs one-device plans of {' or '.join(runs)} on the runner (whole prompts, "
                              f"one rank); this plan is {plan.schedule.policy.value} on {plan.schedule.num_gpus} "
                              f"devices")
    plan = dataclasses.replace(plan, stages=remap_stages(plan.stages, args.n_layers))
    check_stages(plan)
    for s in plan.stages:
        if s.tp > args.n_kv_heads:
            raise ExeGPTError(f"stage TP degree {s.tp} must divide the model's n_heads={args.n_heads} and "
                              f"n_kv_heads={args.n_kv_heads} into whole GQA groups a rank: 1 to "
                              f"{args.n_kv_heads} ranks")
        if args.n_kv_heads % s.tp and any(x.role != "both" for x in plan.stages):
            raise ExeGPTError(f"stage TP degree {s.tp} splits {args.n_kv_heads} KV heads unevenly; a plan that hands "
                              f"KV between stages needs TP degrees that divide them")
    if opts.drift is not None:
        if not isinstance(opts.drift, DriftOptions):
            raise ExeGPTError(f"drift must be an exegpt.replan.DriftOptions, got {type(opts.drift).__name__}")
        if replicas_of(plan) > 1:
            raise ExeGPTError(f"drift re-planning runs one replica; the plan has {replicas_of(plan)}")
    module = policy_module(plan.schedule.policy)
    if hasattr(module, "RUNNER"):  # the policy's executor checks what it needs (PipeInfer: its drafter)
        import importlib

        importlib.import_module(module.RUNNER).check_context(plan, model, args)
    if opts.steady_stop is not None:
        instance(opts.steady_stop, SteadyStop, "steady_stop", "an exegpt.rules.SteadyStop")
        driver_groups(plan, stop=opts.steady_stop)  # the policy ends runs so (else one line saying which do)
    if requests is None:
        requests = make_requests(trace if trace is not None else plan.workload, opts.num_requests, args.vocab_size,
                                 opts.seed, arrivals=opts.arrivals)
    return RunContext(plan=plan, layout=layout(plan.stages), model=model, dtype=opts.dtype,
                      requests=tuple(requests), max_seq_len=args.max_seq_len,
                      cache_len=cache_len_of(plan, args.max_seq_len), stop_at_eos=opts.stop_at_eos,
                      eos_id=opts.eos_id, keep_tokens=opts.keep_tokens, seed=opts.seed, fault=opts.fault,
                      progress=opts.progress, log_decisions=opts.log_decisions,
                      batch_invariant=opts.batch_invariant, encoder_decoder=args.family == "t5", drift=opts.drift,
                      steady_stop=opts.steady_stop,
                      latency_lens=None if opts.latency_lens is None else tuple(int(x) for x in opts.latency_lens))


def _rank_main(rank: int, world_size: int, device: torch.device, ctxs: list[RunContext], idx: list[int]
               ) -> list[tuple[int, RunReport]]:
    """Runs each plan's executor on this rank in turn; returns the (index, report) pairs this rank holds, or, on a
    spawned rank, publishes each plan's finished requests as they finish and its report when it is done
    (``_Collected``)."""
    import torch.distributed as dist

    out = []
    for i, ctx in zip(idx, ctxs):
        sink = (lambda records, i=i: publish(("records", i, records))) if can_publish() else None
        report = run_policy(ctx, rank, world_size, device, sink)
        if report is not None and can_publish():
            publish(("report", i, report))  # the launcher has it now, whatever happens to the next plan
        elif report is not None:
            out.append((i, report))
        if dist.is_initialized():
            dist.barrier()  # the next plan starts with every message of this one delivered
    return out


class _Collected:
    """What the ranks of a launch published: per plan, the records of finished requests and, once done, its
    report; after a failure, each plan's report with every request not reported finished failed with the error."""

    def __init__(self):
        self.records: dict[int, dict[int, RequestRecord]] = {}
        self.reports: dict[int, RunReport] = {}

    def add(self, payload) -> None:
        kind, i, value = payload
        if kind == "report":
            self.reports[i] = value
        else:
            self.records.setdefault(i, {}).update((r.id, r) for r in value)

    def report(self, i: int, ctx: RunContext, error: str, num_ranks: int) -> RunReport:
        if i in self.reports:
            return self.reports[i]
        plan, reqs = ctx.plan, ctx.requests
        ledger = Ledger([(r.input_len, r.output_len) for r in reqs], [r.arrival_s for r in reqs],
                        ctx.kept_lens, ctx.max_seq_len, ctx.cache_len)
        done = self.records.get(i, {})
        why = f"the run failed before this request finished: {error}"
        records = [done.get(r) or ledger.record(r, why) for r in range(len(reqs))]
        return build_report(plan.schedule.policy.value, records, plan.estimate.latency_len, [], [], num_ranks,
                            plan.estimate)
