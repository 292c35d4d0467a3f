"""PipeInfer (asynchronous pipelined speculative decoding with early cancellation) and its two baselines on the
same stages: one request at a time through S target pipeline stages, a drafter on its own rank.

Modes (``mode``): ``pipeinfer`` keeps the pipeline full: a 1-token non-speculative run whenever nothing valid is in
flight, and a speculative run from every draft while fewer than ``depth`` are in flight; a rejected token cancels
every run after it at whatever stage it has reached (``exegpt.speculation``). ``sync``: standard speculative
decoding (draft, then verify the draft in one run, then draft again). ``plain``: pipelined decoding, one token per
round trip, no drafter (S ranks instead of S + 1).

Knobs: ``n_draft`` (most tokens a draft proposes), ``cutoff`` (the drafter stops at a token whose confidence is
under it: the top-1 probability of a model drafter, the share of the n-gram's continuations of a prompt-lookup
drafter), ``depth`` (speculative runs in flight at most), ``draft`` (``ngram:N`` prompt lookup on the last N
tokens; ``layers:N`` the target's first N layers with its head (self-speculation); ``model:NAME`` another model of
the same vocabulary), ``width`` (tree width: branches a speculative run carries, 1 to ``MAX_WIDTH``; the drafter's
alternatives for its first token, each continued greedily, each computed in a KV cache row of its own),
``stages`` (target stages) and ``split`` (layers per stage; by default the placement's, balanced on layer time).
Not knobs but what the simulation needs: the acceptance model ``alpha``, ``stop_p`` and ``rescue`` (per drafted
token: the probability the target agrees, and that the drafter's confidence falls under the cutoff; per sibling:
the probability it holds the target's token where the trunk's first token is wrong), measured by the runner for
the drafter and cutoff (``RunReport.speculation``), and ``link_delay_s``, the delay added to every hop (the runner
emulates a slow link with it).

The estimate: the simulated timeline (``exegpt.spec_sim``) of a request of the workload's mean lengths, priced by
the profile; throughput is one request at a time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import ExeGPTError
from ..problem import Problem
from ..schedule import Policy
from ..spec_sim import Acceptance, SpecCosts, SpecOptions, simulate_request
from ..speculation import MAX_WIDTH, MODES, cache_rows as spec_rows
from ..stages import Layout, Stage, Terms, encode_times, place_stages, stage_memory
from .base import MAIN, DriverStats, WaitArrival

NAMES = (Policy.PIPEINFER,)
RUNNER = "runner.pipeinfer"
"""The runner's executor of this policy (its own asynchronous runs and cancellations; a name, not an import)."""
DRAFT_KINDS = ("ngram", "layers", "model")


@dataclass(frozen=True, slots=True)
class Speculate:
    """Serve request ``rid`` alone: its prefill, then decoding by the schedule's mode until its last token.
    Result: None."""

    rid: int


@dataclass(frozen=True, slots=True)
class PipeInferSchedule:
    """One request at a time over ``stages`` target stages (module docstring)."""

    mode: str
    stages: int
    num_gpus: int
    n_draft: int = 4
    cutoff: float = 0.0
    depth: int = 2
    draft: str = "ngram:2"
    alpha: float = 0.5
    stop_p: float = 0.0
    link_delay_s: float = 0.0
    split: tuple[int, ...] = ()
    """Layers per target stage (PipeInfer's ``--mpi-layer-split``); empty: the placement's, balanced on layer
    time."""
    width: int = 1
    """Tree width: branches a speculative run carries at most (plain decoding ignores it)."""
    rescue: float = 0.0
    """The acceptance model's per-sibling rescue probability (``exegpt.spec_sim.Acceptance``)."""
    policy: Policy = Policy.PIPEINFER

    def __post_init__(self):
        object.__setattr__(self, "split", tuple(self.split))  # JSON gives a list
        if self.split and (len(self.split) != self.stages or
                           any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.split)):
            raise ExeGPTError(f"pipeinfer: split={self.split!r} must give each of the {self.stages} stages a whole "
                              f"number of layers >= 1")
        if self.mode not in MODES:
            raise ExeGPTError(f"pipeinfer: mode={self.mode!r} must be one of {', '.join(MODES)}")
        for name in ("stages", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExeGPTError(f"pipeinfer: {name}={v!r} must be a whole number >= 1")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or not 1 <= self.width <= MAX_WIDTH:
            raise ExeGPTError(f"pipeinfer: tree width={self.width!r} must be a whole number of branches in "
                              f"[1, {MAX_WIDTH}] (1: every draft a chain)")
        if isinstance(self.n_draft, bool) or not isinstance(self.n_draft, int) or self.n_draft < 1:
            raise ExeGPTError(f"pipeinfer: draft length n_draft={self.n_draft!r} must be a whole number of tokens "
                              f">= 1 (the most tokens one draft proposes)")
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, (int, float)) or not 0 <= self.cutoff <= 1:
            raise ExeGPTError(f"pipeinfer: confidence cutoff={self.cutoff!r} must be a probability in [0, 1]")
        Acceptance(self.alpha, self.stop_p, self.rescue)
        if not isinstance(self.link_delay_s, (int, float)) or not self.link_delay_s >= 0:
            raise ExeGPTError(f"pipeinfer: link_delay_s={self.link_delay_s!r} must be >= 0 seconds")
        draft_spec(self.draft)
        want = self.stages + (self.mode != "plain")
        if self.num_gpus != want:
            raise ExeGPTError(f"pipeinfer: {self.mode} over {self.stages} target stages runs on {want} ranks "
                              f"({'the stages' if self.mode == 'plain' else 'the stages and the drafter'}), "
                              f"not num_gpus={self.num_gpus}")

    @property
    def tp(self) -> int:
        return 1

    @property
    def acceptance(self) -> Acceptance:
        return Acceptance(self.alpha, self.stop_p, self.rescue)

    @property
    def options(self) -> SpecOptions:
        return SpecOptions(self.mode, self.n_draft, self.depth, self.width)

    @property
    def rows(self) -> int:
        """KV cache rows on each stage: the main row and the siblings' of every tree run that may be in flight."""
        return spec_rows(self.mode, self.width, self.depth)


def draft_spec(spec) -> tuple[str, str]:
    """(kind, argument) of a drafter spec ``ngram:N``, ``layers:N`` or ``model:NAME``."""
    kind, _, arg = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind not in DRAFT_KINDS or not arg or (kind != "model" and not (arg.isdigit() and int(arg) >= 1)):
        raise ExeGPTError(f"pipeinfer: draft={spec!r} must be 'ngram:N' (prompt lookup on the last N tokens), "
                          f"'layers:N' (the target's first N layers and head) or 'model:NAME', with N >= 1")
    return kind, arg


def layout(prob: Problem, s: PipeInferSchedule) -> Layout | None:
    """The target's layers over ``s.stages`` single-device stages (None: they do not fit)."""
    if prob.model.is_encoder_decoder:
        raise ExeGPTError(f"pipeinfer: speculative decoding here runs decoder-only models, not {prob.model.name}")
    if s.stages > prob.model.n_layers:
        return None
    if s.split:
        if sum(s.split) != prob.model.n_layers:
            raise ExeGPTError(f"pipeinfer: split={s.split} covers {sum(s.split)} layers; {prob.model.name} has "
                              f"{prob.model.n_layers}")
        starts = np.cumsum((0,) + s.split[:-1])
        stages = tuple(Stage("both", 1, int(a), n) for a, n in zip(starts, s.split))
    else:
        stages = place_stages(prob, (1,) * s.stages, "both")
    return None if stages is None else Layout(Policy.PIPEINFER, 1, 0, 0, 0, stages)


def stage_roles(s: PipeInferSchedule) -> tuple[tuple[str, int], ...]:
    return (("both", 1),) * s.stages


def memory(prob: Problem, lay: Layout, s: PipeInferSchedule) -> list:
    """Peak bytes per stage device: its weights, ``s.rows`` KV cache rows of the workload's longest context and
    the activations of the largest run (the prompt, or a tree of ``width`` branches of ``n_draft + 1``)."""
    tokens = max(prob.stats.in_max, s.width * (s.n_draft + 1))
    return [float(np.ravel(m)[0]) for m in stage_memory(prob, lay.stages, float(s.rows), float(tokens))]


def check(prob: Problem, s: PipeInferSchedule) -> None:
    """One line for a tree that does not fit: the KV cache rows its width and depth need beside the weights."""
    lay = layout(prob, s)
    if lay is None or s.rows == 1:
        return  # layout_for names a model that does not fit at all
    mem = memory(prob, lay, s)
    worst = int(np.argmax([m / prob.capacity_bytes for m in mem]))
    if mem[worst] > prob.capacity_bytes:
        raise ExeGPTError(f"pipeinfer: tree width {s.width} at depth {s.depth} needs {s.rows} KV cache rows of "
                          f"{prob.workload.max_total_len} positions per stage; stage {worst} then needs "
                          f"{mem[worst] / 2**30:.3g} GiB of the {prob.capacity_bytes / 2**30:.3g} GiB a device "
                          f"holds: narrow the tree or lower the depth")


def costs_from_profile(prob: Problem, lay: Layout, s: PipeInferSchedule) -> SpecCosts:
    """The timeline's prices from the profile: each stage's time for runs of 1 and ``n_draft + 1`` tokens (a
    straight line between), every hop ``link_delay_s`` plus the profile's token return, a drafter of ``layers:N``
    at N layers' share of a 1-token pass, a prompt-lookup drafter free, another model at the target's cost scaled
    by its layers."""
    b = (1, s.width * (s.n_draft + 1))
    per = [encode_times(prob, lay.stages, 1, _prompts_cost(prob, n))[0] for n in b]
    t1 = [float(np.ravel(x)[0]) for x in per[0]]
    t2 = [float(np.ravel(x)[0]) for x in per[1]]
    slope = [max(0.0, (y - x) / (b[1] - b[0])) for x, y in zip(t1, t2)]
    hop = s.link_delay_s + float(np.ravel(prob.cost.token_return(1.0)[0])[0])
    kind, arg = draft_spec(s.draft)
    one_pass = sum(t1)
    if kind == "ngram":
        tok = 0.0
    elif kind == "layers":
        tok = one_pass * min(int(arg), prob.model.n_layers) / prob.model.n_layers
    else:
        from ..models import MODELS

        other = MODELS.get(arg)
        tok = one_pass * (other.n_layers / prob.model.n_layers if other is not None else 1.0)
    return SpecCosts(tuple(x - sl for x, sl in zip(t1, slope)), tuple(slope),
                     tuple(st.n_layers for st in lay.stages), hop, 0.0, 0.0, tok)


def _prompts_cost(prob: Problem, tokens: int):
    return dataclasses.replace(prob.cost, stats=prob.stats.for_prompts(np.array([tokens]), prob.cost.padded))


SIM_DRAWS = 4
"""Requests the estimate's timeline averages over (the acceptance draws are random)."""


def estimate_detail(prob: Problem, lay: Layout, s: PipeInferSchedule) -> tuple[Terms, int]:
    """The timeline of requests of the workload's mean prompt and its bound-length output (module docstring)."""
    costs = costs_from_profile(prob, lay, s)
    k_q = int(prob.k_q)
    prompt = max(1, int(round(prob.stats.in_mean)))
    mean_out = max(1, int(round(prob.workload.output_len.mean())))
    rng = np.random.default_rng(0)
    lat = np.mean([simulate_request(costs, s.acceptance, s.options, prompt, k_q, rng).token_s[-1]
                   for _ in range(SIM_DRAWS)])
    runs = [simulate_request(costs, s.acceptance, s.options, prompt, mean_out, rng) for _ in range(SIM_DRAWS)]
    per_req = float(np.mean([r.token_s[-1] for r in runs]))
    ttft = float(np.mean([r.ttft_s for r in runs]))
    itl = (per_req - ttft) / max(1, mean_out - 1)
    mem = [np.asarray(m) for m in memory(prob, lay, s)]
    ok = np.asarray(all(m < prob.capacity_bytes for m in mem))
    one = np.asarray(1.0)
    return Terms(one / per_req, np.asarray(lat), ok, np.asarray(ttft), np.asarray(itl), one, mem), k_q


def spaces(prob: Problem, policy, tp_degrees, space) -> list:
    return []  # no box function: a grid of schedules (``candidates``), searched on the simulated timeline


SEARCH_WIDTHS = 3
"""Tree widths the search tries (1 to this)."""


def candidates(prob: Problem, tps: list[int], grid: int, base: PipeInferSchedule | None = None,
               widths: int = SEARCH_WIDTHS) -> list[PipeInferSchedule]:
    """The knobs over the devices there are: plain decoding over all of them or all but one; PipeInfer and sync
    over all but the drafter's, draft lengths 1 to 8, depths 1 and the stages, tree widths 1 to ``widths``.
    ``base`` gives the drafter, its cutoff, the acceptance model measured at that cutoff (and width), and the link
    (default: prompt lookup, alpha 0.5)."""
    n = prob.cluster.count
    if n - 1 > prob.model.n_layers:
        return []
    base = base or PipeInferSchedule("pipeinfer", max(1, n - 1), max(2, n))
    out = [dataclasses.replace(base, mode="plain", stages=m, num_gpus=m, width=1) for m in (n, n - 1) if m >= 1]
    if n < 2:
        return out
    for k in (1, 2, 4, 8):
        for w in range(1, widths + 1):
            out.append(dataclasses.replace(base, mode="sync", stages=n - 1, num_gpus=n, n_draft=k, depth=1, width=w))
            for d in sorted({1, n - 1}):
                out.append(dataclasses.replace(base, mode="pipeinfer", stages=n - 1, num_gpus=n, n_draft=k, depth=d,
                                               width=w))
    return out


def best_schedule(prob: Problem, base: PipeInferSchedule, widths: int = SEARCH_WIDTHS
                  ) -> tuple[PipeInferSchedule, list]:
    """The candidates' schedule whose requests finish soonest on the simulated timeline (one request at a time:
    the highest throughput), with every (seconds a request, schedule) tried: whether speculation pays for this
    drafter, acceptance model and link, and with which knobs (tree width among them: whether what siblings
    rescue, ``base.rescue``, pays for the rows they add to every stage's micro-batch and the drafter's work)."""
    tried = []
    for s in candidates(prob, [1], 0, base, widths):
        lay = layout(prob, s)
        if lay is not None:
            terms, _ = estimate_detail(prob, lay, s)
            if bool(np.ravel(terms.ok)[0]):
                tried.append((1.0 / float(np.ravel(terms.thr)[0]), s))
    tried.sort(key=lambda x: (x[0], describe(x[1])))
    if not tried:
        raise ExeGPTError(f"pipeinfer: no schedule of {prob.model.name} fits {prob.cluster.label}")
    return tried[0][1], tried


def parse(policy, fields: dict, num_gpus: int) -> PipeInferSchedule:
    """A schedule from CLI fields; by default PipeInfer over every device but one (the drafter's)."""
    fields.setdefault("mode", "pipeinfer")
    fields.setdefault("stages", num_gpus - (fields["mode"] != "plain"))
    return PipeInferSchedule(num_gpus=num_gpus, **fields)


def describe(s: PipeInferSchedule) -> str:
    """``pipeinfer k=4 c=0.3 d=2 ngram:2 S3``, ``sync k=4 c=0.3 w=2 ngram:2 S3`` (a tree width past 1),
    ``plain S3``."""
    if s.mode == "plain":
        return f"plain S{s.stages}"
    depth = f" d={s.depth}" if s.mode == "pipeinfer" else ""
    width = f" w={s.width}" if s.width > 1 else ""
    return f"{s.mode} k={s.n_draft} c={s.cutoff:g}{depth}{width} {s.draft} S{s.stages}"


def from_fields(fields: dict) -> PipeInferSchedule:
    return PipeInferSchedule(**fields)


def cache_rows(plan, group: str) -> int:
    return plan.schedule.rows


def drivers(plan) -> dict:
    """One driver: each request alone, in arrival order."""
    return {MAIN: _driver}


def _driver(view):
    served = 0
    while served < view.num_runnable():
        waiting = view.waiting()
        if not waiting:
            yield WaitArrival()
            continue
        yield Speculate(waiting[0])
        served += 1
    return DriverStats((), ())


def simulate(engine, d, action: Speculate) -> None:
    """The simulated engine's execution of ``Speculate``: the request's timeline from the driver's clock."""
    s, led, rid = engine.plan.schedule, engine.ledger, action.rid
    engine._take([rid])
    costs = costs_from_profile(engine.prob, engine.lay, s)
    tl = simulate_request(costs, s.acceptance, s.options, int(led.inp[rid]), int(led.out[rid]),
                          np.random.default_rng(rid))
    led.started([rid], d.t)
    for t in tl.token_s:
        led.tokens_at([rid], d.t + t)
    d.t += tl.token_s[-1]
    return None
