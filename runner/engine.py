"""The runner's engine: a plan's policy drivers (``exegpt.policies``) executed on the ranks of their groups, on
the wall clock.

Every rank runs ``run_policy``: it builds its stage of its group (``main``, ``encode`` or ``decode``); the leader
of a group's first stage runs the group's driver, the others serve commands. Each action the driver yields becomes
commands through the group's pipeline (``runner.pipeline``) and, for a split policy, the KV hand-off between the
groups (``runner.handoff``); the engine keeps which request each cache row holds, so drivers speak of requests
only. A request is never admitted before its arrival time on the run's clock.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from exegpt.errors import ExeGPTError
from exegpt.ledger import Ledger
from exegpt.policies import driver_groups, policy_module, prefix_cache
from exegpt.policies.base import DECODE, ENCODE, MAIN, AwaitCredit, Chunk, Compact, Decode, EndHandOffs, Evict, Merge, \
    Merged, Peek, Prefill, WaitArrival, decision
from exegpt.replicas import route
from exegpt.report import RunReport, build_report
from exegpt.rules import split_even

from . import cpu_kernels, numerics
from .dist import TAG_CREDIT, TAG_META
from .handoff import DEPTH, DecodeStage, EncodeStage
from .launch import take_shared
from .progress import progress_bar
from .replicas import gather_report, replica_of
from .view import WallClockView
from .kv_cache import fill_holes
from .pipeline import CHUNK, COMPACT, DECODE as OP_DECODE, END, IMPORT, MOVE, PREFILL, PREFIX_LOAD, PREFIX_SAVE, \
    Command, Pipeline, RunContext, \
    StageRuntime, _i64, eos_of, make_runtime, start_clock


def run_policy(ctx: RunContext, rank: int, world_size: int, device: torch.device, sink=None) -> RunReport | None:
    """This rank's part of a run of ``ctx.plan``; the rank that drives the group holding the requests' last
    tokens returns the report. ``sink``: called with the records of requests as they finish (batched), so that
    they outlive a failure of the run (``runner.launch.publish``)."""
    if ctx.batch_invariant:
        cpu_kernels.check_batch_invariant(device, ctx.dtype)
    with numerics.batch_invariant(ctx.batch_invariant):
        return _run_policy(ctx, rank, world_size, device, sink)


def _run_policy(ctx: RunContext, rank: int, world_size: int, device: torch.device, sink) -> RunReport | None:
    plan = ctx.plan
    module = policy_module(plan.schedule.policy)
    if hasattr(module, "RUNNER"):  # a policy with an executor of its own (PipeInfer's asynchronous runs)
        import importlib

        return importlib.import_module(module.RUNNER).run_policy(ctx, rank, world_size, device, sink)
    drivers = driver_groups(plan, stop=ctx.steady_stop)
    ctx, replica, groups = replica_of(ctx, rank, world_size)
    group = ctx.stage_of(rank).pipeline
    if group not in drivers:
        raise ExeGPTError(f"rank {rank} is in a {group!r} stage; the {plan.schedule.policy.value} policy drives "
                          f"{sorted(drivers)}")
    stages = ctx.stages_of(group)
    rows = module.cache_rows(plan, group)
    if hasattr(module, "phase_pricing"):  # processes sharing one device: this one's share of it
        from .colocate import enter_process

        enter_process(plan.schedule, group)
    if group == MAIN:
        rt = make_runtime(ctx, rank, device, groups, rows, ctx.cache_len, driver=stages[0].leader)
    else:
        enc, dec = ctx.stages_of(ENCODE), ctx.stages_of(DECODE)
        batch = module.cache_rows(plan, ENCODE)
        prompt_len = max((r.input_len for r in ctx.requests), default=1)
        classes, kw = (EncodeStage, DecodeStage), {}
        if ctx.shared_ipc is not None:  # the KV through slots both processes map (runner.handoff_ring)
            from .handoff_ring import RingDecodeStage, RingEncodeStage

            classes, kw = (RingEncodeStage, RingDecodeStage), {"ring": take_shared().rings[ctx.shared_ipc]}
        if group == ENCODE:
            rt = make_runtime(ctx, rank, device, groups, batch, ctx.cache_len, driver=dec[0].leader,
                              cls=classes[0], decode_stages=dec, encode_batch=batch, prompt_len=prompt_len, **kw)
        else:
            rt = make_runtime(ctx, rank, device, groups, rows, ctx.cache_len, driver=dec[0].leader,
                              cls=classes[1], encode_stages=enc, encode_batch=batch, prompt_len=prompt_len, **kw)
    t0 = start_clock(device)
    if isinstance(rt, EncodeStage):
        rt.t0_ns = t0
    if rank != stages[0].leader:
        rt.serve()
        return gather_report(ctx, None, world_size) if replica[1] > 1 else None
    engine = RunnerEngine(ctx, group, rt, Pipeline(rt, stages[-1].leader, returns_tokens=group != ENCODE), t0,
                          replica, sink if group != ENCODE else None)
    control = None
    if ctx.drift is not None and group != ENCODE:  # the driver that sees requests finish; re-plans on a thread
        control = ctx.drift.control(plan, engine.runnable, background=True)
        drivers = driver_groups(plan, control)
    stats = engine.drive(drivers[group])
    events = control.finish() if control is not None else ()
    if replica[1] > 1:
        mine = set(engine.runnable) | (set(engine.ledger.rejected) if replica[0] == 0 else set())
        return gather_report(ctx, ([r for r in engine.ledger.records() if r.id in mine], stats, engine.log or []),
                             world_size)
    if stats is None:
        return None
    return build_report(plan.schedule.policy.value, engine.ledger.records(), plan.estimate.latency_len,
                        list(stats.encode_s), list(stats.decode), world_size, plan.estimate, stats.steady,
                        decisions=tuple(engine.log or ()), drift=events,
                        cached_tokens=engine.prefix.hit_tokens if engine.prefix is not None else 0)


class RunnerEngine(WallClockView):
    """Executes one group's driver: the actions of ``exegpt.policies.base`` on the group's pipeline."""

    def __init__(self, ctx: RunContext, group: str, rt: StageRuntime, pipe: Pipeline, t0_ns: int,
                 replica: tuple[int, int] = (0, 1), sink=None):
        """``replica``: (this replica, replicas): the driver serves its share of the requests (``exegpt.replicas``).
        ``sink``: as ``run_policy``'s."""
        self.ctx, self.group, self.rt, self.pipe, self.t0_ns = ctx, group, rt, pipe, t0_ns
        reqs = ctx.requests
        if [r.id for r in reqs] != list(range(len(reqs))):
            raise ExeGPTError("request ids must be 0, 1, ... in order (runner.requests.make_requests)")
        self.prompts = [r.prompt for r in reqs]
        self.ledger = Ledger([(r.input_len, r.output_len) for r in reqs], [r.arrival_s for r in reqs],
                             ctx.kept_lens, ctx.max_seq_len, ctx.cache_len,
                             ctx.stop_at_eos and group != ENCODE, eos_of(ctx, rt.tokenizer), ctx.keep_tokens,
                             track_tokens=True)
        self.replica = replica
        self.runnable = route(self.ledger.runnable, replica[1])[replica[0]]
        self.arrive = self.ledger.arrival[self.runnable]
        self.taken = 0  # the first runnable request (in arrival order) no prefill took
        self.took: set[int] = set()  # requests taken out of arrival order, beyond ``taken``
        self.prefix = prefix_cache(ctx.plan, lambda rid: self.prompts[rid])
        self.row_req: list[int] = []  # the request each cache row holds
        self.num_stages = len(ctx.stages_of(group))
        self.max_len = ctx.cache_len
        self.batches = 0  # encode group: batches handed off
        self.metas: deque = deque()  # decode group: posted metadata receives, oldest first
        self.bar = None
        self.log: list[str] | None = [] if ctx.log_decisions else None
        self.stream_to(sink)
        if group == DECODE:
            for _ in range(DEPTH):
                self._post_meta()

    # --- the View of exegpt.policies.base (the rest: ``WallClockView``) -------------------------------

    def prompt(self, rid: int) -> tuple[int, ...]:
        return tuple(self.prompts[rid])

    def cached_prefix(self, rid: int) -> int:
        return 0 if self.prefix is None else self.prefix.cached(rid)

    # --- running a driver -------------------------------------------------------------------------------

    def drive(self, driver):
        """Runs ``driver`` to its end; returns its ``DriverStats`` (None from a driver that returns none)."""
        if self.ctx.progress and self.group != ENCODE and self.replica[0] == 0:  # replica 0's share, with the rejected
            self.bar = progress_bar(len(self.runnable) + len(self.ledger.rejected), "requests", "req",
                                    initial=len(self.ledger.rejected))
            self.ledger.on_finish = self.bar.update
        gen, result = driver(self), None
        while True:
            try:
                action = gen.send(result)
            except StopIteration as stop:
                stats = stop.value
                break
            result = self.execute(action)
            if self.log is not None:
                self.log.append(decision(self.group, action, result))
            self.stream()
        self.stream(force=True)
        while self.metas:  # the encode ranks' END fillers
            self.metas.popleft().wait()
        self.pipe.stop()
        if self.bar is not None:
            self.bar.close()
        return stats

    def execute(self, action):
        if isinstance(action, Prefill):
            return self._prefill(list(action.rids), action.parts, action.resume, action.sp)
        if isinstance(action, Chunk):
            return self._chunks(action.items, action.parts, action.sp)
        if isinstance(action, Decode):
            return self._decode(action)
        if isinstance(action, Compact):
            return self._compact(lambda rid: not self.ledger.done(rid))
        if isinstance(action, Evict):
            gone = set(action.rids)
            return self._compact(lambda rid: rid not in gone)
        if isinstance(action, WaitArrival):
            nxt = self.arrived()
            if nxt < len(self.runnable):
                time.sleep(max(0.0, float(self.arrive[nxt]) - self.now()))
            return None
        if isinstance(action, AwaitCredit):
            self.rt.comm.recv((1,), torch.long, self.rt.driver, TAG_CREDIT)
            return None
        if isinstance(action, EndHandOffs):
            self.pipe.submit(Command(END, _i64([])))
            return None
        if isinstance(action, Peek):
            return self._peek(action.wait)
        if isinstance(action, Merge):
            return self._merge()
        raise ExeGPTError(f"the runner cannot execute {action!r}")

    def _take(self, rids: list[int]) -> None:
        """Marks ``rids`` taken; they must be waiting (arrived, runnable, not taken)."""
        waiting = set(self.waiting())
        if len(set(rids)) < len(rids) or not waiting.issuperset(rids):
            raise ExeGPTError(f"a prefill must take waiting requests, got {rids[:8]}")
        self.took.update(rids)
        while self.taken < len(self.runnable) and self.runnable[self.taken] in self.took:
            self.took.discard(self.runnable[self.taken])
            self.taken += 1

    def _compact(self, keeps) -> None:
        """Frees the rows whose request ``keeps`` rejects; the others keep their order."""
        keep = fill_holes([i for i, rid in enumerate(self.row_req) if keeps(rid)])
        if self.prefix is not None:
            for rid in self.row_req:
                if not keeps(rid):
                    self.prefix.release(rid)
        if len(keep) < len(self.row_req):
            self.pipe.submit(Command(COMPACT, _i64(keep)))
            self.row_req = [self.row_req[i] for i in keep]
        return None

    def _prefill(self, rids: list[int], parts: int, resume: bool = False, sp: bool = False) -> None:
        if resume:  # recompute: the prompt and every generated token but the last, which the next decode feeds
            if self.group == ENCODE or any(r in self.row_req for r in rids):
                raise ExeGPTError(f"resume prefill of requests {rids[:8]} that hold rows or on an encode group")
            prompts = {r: self.prompts[r] + tuple(self.ledger.tokens[r][:-1]) for r in rids}
        else:
            self._take(rids)
            prompts = {r: self.prompts[r] for r in rids}
        if self.group == ENCODE:
            self.pipe.submit(Command(PREFILL, _i64(range(len(rids))),
                                     seq_lens=_i64([len(self.prompts[r]) for r in rids]),
                                     ids=_i64([t for r in rids for t in self.prompts[r]]), req=_i64(rids),
                                     batch=self.batches, time_ns=time.perf_counter_ns() - self.t0_ns))
            self.batches += 1
            return None
        first_row = len(self.row_req)
        mbs = split_even(list(range(len(rids))), parts)
        for mb in mbs:
            ids = [rids[i] for i in mb]
            self.ledger.started(ids, self.now())
            self.pipe.submit(Command(PREFILL, _i64([first_row + i for i in mb]),
                                     seq_lens=_i64([len(prompts[r]) for r in ids]),
                                     ids=_i64([t for r in ids for t in prompts[r]]), req=_i64(ids), sp=sp))
        for mb in mbs:
            toks = self.pipe.collect()
            if not resume:
                self.ledger.tokens_at([rids[i] for i in mb], self.now(), toks)
        self.row_req += rids
        return None

    def _chunks(self, items: tuple[tuple[int, int, int], ...], parts: int, sp: bool = False) -> None:
        """Prompt chunks (request, start, length) into their rows (a new row at start 0), pipelined; a chunk that
        ends its prompt gives the request's first token."""
        held = set(self.row_req)
        new = [r for r, _, _ in items if r not in held]
        self._take(new)
        self.row_req += new
        row_of = {rid: i for i, rid in enumerate(self.row_req)}
        if self.prefix is not None:  # new rows first get what the prefix cache holds of their prompts
            got = [(r, s, self.prefix.admit(r, s)) for r, s, _ in items if r in new]
            got = [g for g in got if g[1]]
            if got:
                self.pipe.submit(Command(PREFIX_LOAD, _i64([row_of[r] for r, _, _ in got]),
                                         seq_lens=_i64([s for _, s, _ in got]),
                                         ids=_i64([x for _, _, slots in got for x in slots]),
                                         batch=self.prefix.tree.capacity))
        new = set(new)
        mbs = split_even(list(items), parts)
        for mb in mbs:
            self.ledger.started([r for r, _, _ in mb if r in new], self.now())
            self.pipe.submit(Command(CHUNK, _i64([row_of[r] for r, _, _ in mb]), seq_lens=_i64([m for _, _, m in mb]),
                                     ids=_i64([t for r, s, m in mb for t in self.prompts[r][s:s + m]]),
                                     req=_i64([s for _, s, _ in mb]), sp=sp))
        for mb in mbs:
            toks = self.pipe.collect().tolist()
            t = self.now()
            for (r, s, m), tok in zip(mb, toks):
                if s + m == len(self.prompts[r]):
                    self.ledger.token(r, tok, t)
        if self.prefix is not None:  # the prompts prefilled to their ends go into the cache
            saves = [(row_of[r], seg) for r, s, m in items if s + m == len(self.prompts[r])
                     for seg in self.prefix.publish(r)]
            if saves:
                self.pipe.submit(Command(PREFIX_SAVE, _i64([row for row, _ in saves]),
                                         seq_lens=_i64([len(sl) for _, (_, sl) in saves]),
                                         ids=_i64([x for _, (_, sl) in saves for x in sl]),
                                         req=_i64([st for _, (st, _) in saves]), batch=self.prefix.tree.capacity))
        return None

    def _peek(self, wait: bool) -> tuple[int, ...] | None:
        """The requests of the next handed-off batch, once (``wait``) or if its metadata is in; None at END."""
        head = self.metas[0]
        if not wait and not head.ready():
            return ()
        meta = head.wait().cpu()
        if int(meta[0]) < 0:
            return None
        return tuple(meta[4:4 + int(meta[0])].tolist())

    def _merge(self) -> Merged | None:
        """The next handed-off batch into the rows after those in use (None at the encoder's END)."""
        meta = self.metas.popleft().wait().cpu()
        if int(meta[0]) < 0:
            return None
        n, batch, start_ns, first_ns = (int(x) for x in meta[:4])
        req, seq, tok = meta[4:4 + n], meta[4 + n:4 + 2 * n], meta[4 + 2 * n:4 + 3 * n]
        rows = range(len(self.row_req), len(self.row_req) + n)
        self.pipe.submit(Command(IMPORT, _i64(rows), seq_lens=seq.clone(), req=req.clone(), batch=batch))
        rids = req.tolist()
        self.ledger.started(rids, start_ns / 1e9)
        self.ledger.tokens_at(rids, first_ns / 1e9, tok)
        self.row_req += rids
        self.rt.comm.send([_i64([batch])], self.ctx.stages_of(ENCODE)[0].leader, TAG_CREDIT)
        self._post_meta()
        return Merged(tuple(rids), (first_ns - start_ns) / 1e9)

    def _post_meta(self) -> None:
        """The next batch's metadata receive, then its KV's (``DecodeStage.gets_meta``)."""
        size = 4 + 3 * self.rt.encode_batch
        self.metas.append(self.rt.comm.irecv((size,), torch.long, self.ctx.stages_of(ENCODE)[-1].leader, TAG_META))
        self.rt.post_next()

    def _decode(self, action: Decode) -> tuple[int, ...]:
        row_of = {rid: i for i, rid in enumerate(self.row_req)}
        mbs = [[row_of[r] for r in mb] for mb in action.micro_batches if mb]
        pos = None
        if not action.drop_finished:  # rows computed on past their last token: track their cache positions
            led = self.ledger
            pos = [int(led.inp[r] + led.gen[r] - 1) for r in self.row_req]
        return tuple(run_decode(self.pipe, self.ledger, mbs, self.row_req, self.now, action.max_iters,
                                action.drop_finished, pos, self.max_len, action.sp))


def run_decode(pipe: Pipeline, ledger: Ledger, mbs: list[list[int]], row_req: list[int], clock, max_iters: int,
               drop_finished: bool = True, row_pos: list[int] | None = None, max_len: int = 0, sp: bool = False
               ) -> list[int]:
    """Decode micro-batches of cache rows, pipelined: a micro-batch's next iteration is submitted as soon as its
    tokens are back, for up to ``max_iters`` iterations each.

    With ``drop_finished`` (early termination) finished rows leave their micro-batch at once; without it
    (static batching) they keep being computed, their tokens discarded, until every request of the micro-batches
    is done or the row reaches ``max_len`` cache positions (tracked in ``row_pos``).

    Returns:
        rows computed at each iteration (iteration u of every micro-batch counts as iteration u).
    """
    mbs = [list(mb) for mb in mbs]
    members = [row_req[r] for mb in mbs for r in mb]
    iters, steps, order = [0] * len(mbs), [], deque()

    def submit(j: int) -> None:
        rows = mbs[j]
        pipe.submit(Command(OP_DECODE, _i64(rows), ids=_i64([ledger.last(row_req[r]) for r in rows]), batch=j,
                            sp=sp))
        order.append(j)

    def pending() -> bool:
        return any(not ledger.done(r) for r in members)

    for j, mb in enumerate(mbs):
        if mb:
            submit(j)
    while order:
        j = order.popleft()
        toks = pipe.collect().tolist()
        t = clock()
        rows, u = mbs[j], iters[j]
        if len(steps) <= u:
            steps.append(0)
        steps[u] += len(rows)
        keep = []
        for r, tok in zip(rows, toks):
            rid = row_req[r]
            finished = ledger.done(rid) or ledger.token(rid, tok, t)
            if row_pos is not None:
                row_pos[r] += 1
            if finished and (drop_finished or (row_pos is not None and row_pos[r] >= max_len)):
                continue
            keep.append(r)
        mbs[j], iters[j] = keep, u + 1
        if keep and iters[j] < max_iters and (drop_finished or pending()):
            if drop_finished and len(keep) < len(rows) and rows == list(range(rows[0], rows[0] + len(rows))):
                mbs[j] = keep = _refill_holes(pipe, rows, keep, row_req)
            submit(j)
    return steps


def _refill_holes(pipe: Pipeline, rows: list[int], keep: list[int], row_req: list[int]) -> list[int]:
    """Keeps a micro-batch a contiguous range of cache rows after some of its rows finished: survivors past the
    new end move into the holes (one row of KV copied per finished request, instead of gathering the whole
    batch's KV at every step that follows). ``row_req`` swaps along, so finished requests sit in the tail."""
    start, m = rows[0], len(keep)
    holes = [r for r in range(start, start + m) if r not in set(keep)]
    tail = [r for r in keep if r >= start + m]
    if tail:
        pipe.submit(Command(MOVE, _i64(tail + holes)))
        for s, d in zip(tail, holes):
            row_req[s], row_req[d] = row_req[d], row_req[s]
    return list(range(start, start + m))
