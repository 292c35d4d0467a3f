"""The head of PipeInfer's executor (rank 0, ``runner.pipeinfer``): the policy's driver on the wall clock, each
request's prefill and decoding through ``exegpt.speculation.SpecHead``, and the run's report with what the
stages and the drafter counted (``RunReport.speculation``)."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import numpy as np
import torch

from exegpt.errors import ExeGPTError
from exegpt.ledger import Ledger
from exegpt.policies import driver_groups
from exegpt.policies.base import MAIN, WaitArrival, decision
from exegpt.policies.pipeinfer import Speculate
from exegpt.report import RunReport, build_report
from exegpt.speculation import Run, SpecCounts, SpecHead

from .pipeline import RunContext, _i64, eos_of
from .spec_wire import STAGE_STATS, STOP, TAG_CANCEL, TAG_DRAFT, TAG_DRAFT_REQ, TAG_RESULT, TAG_RUN, TAG_STATS, \
    run_hdr, wait_until
from .view import WallClockView


class Head(WallClockView):
    """Rank 0: stage 0, the driver and the decisions."""

    def __init__(self, ctx: RunContext, stage, tokenizer, t0_ns: int, sink=None):
        """``sink``: called with the records of the requests as each finishes, so that they outlive a failure of
        the run (``runner.launch.publish``)."""
        s = ctx.plan.schedule
        self.ctx, self.stage, self.s, self.t0_ns = ctx, stage, s, t0_ns
        self.comm, self.S = stage.comm, s.stages
        reqs = ctx.requests
        self.prompts = [r.prompt for r in reqs]
        self.ledger = Ledger([(r.input_len, r.output_len) for r in reqs], [r.arrival_s for r in reqs],
                             ctx.kept_lens,
                             ctx.max_seq_len, ctx.cache_len, ctx.stop_at_eos, eos_of(ctx, tokenizer),
                             ctx.keep_tokens, track_tokens=True)
        self.runnable = list(self.ledger.runnable)
        self.arrive = self.ledger.arrival[self.runnable]
        self.taken, self.took = 0, set()  # one request at a time, in arrival order
        self.num_stages, self.max_len = self.S, ctx.cache_len
        self.events: queue.Queue = queue.Queue()
        self.counts = SpecCounts()
        self.next_gid = 0
        self.inflight: dict[int, Run] = {}  # global run id -> the current request's run
        self.gid_of: dict[int, int] = {}  # the current request's run id -> global run id
        self.hops: list[float] = []
        self.draft_calls = [0, 0, 0]  # drafts back, tokens in them, drafts that stopped short of what was asked
        self.asked: dict[int, int] = {}
        self.log: list[str] | None = [] if ctx.log_decisions else None
        self.stream_to(sink)

    # --- the View of exegpt.policies.base: ``WallClockView`` ----------------------------------------------

    # --- the run ----------------------------------------------------------------------------------------

    def run(self) -> RunReport:
        threads = []
        if self.S > 1:
            threads.append(threading.Thread(target=self._receiving, args=(self._receive_results,), daemon=True))
        if self.s.mode != "plain":
            threads.append(threading.Thread(target=self._receiving, args=(self._receive_drafts,), daemon=True))
        for t in threads:
            t.start()
        gen, result = driver_groups(self.ctx.plan)[MAIN](self), None
        while True:
            try:
                action = gen.send(result)
            except StopIteration:
                break
            if isinstance(action, WaitArrival):
                nxt = self.arrived()
                if nxt < len(self.runnable):
                    time.sleep(max(0.0, float(self.arrive[nxt]) - self.now()))
            elif isinstance(action, Speculate):
                self._serve(action.rid)
            else:
                raise ExeGPTError(f"the pipeinfer executor cannot execute {action!r}")
            result = None
            if self.log is not None:
                self.log.append(decision(MAIN, action, result))
        stats = self._shutdown(threads)
        rep = build_report(self.s.policy.value, self.ledger.records(), self.ctx.plan.estimate.latency_len, [], [],
                           self.s.num_gpus, self.ctx.plan.estimate, None, decisions=tuple(self.log or ()))
        return dataclasses.replace(rep, speculation=stats)

    def _serve(self, rid: int) -> None:
        """One request: its prefill, then runs and drafts as its ``SpecHead`` decides, until its last token."""
        if rid != self.runnable[self.taken] or self.taken >= self.arrived():
            raise ExeGPTError(f"pipeinfer serves arrived requests in arrival order, got {rid}")
        self.taken += 1
        self.gid_of.clear()
        led, prompt = self.ledger, self.prompts[rid]
        led.started([rid], self.now())
        pre = self._launch(Run(-1, 0, tuple(prompt), False), n_out=1)
        while True:
            kind, *data = self._next_event()
            if kind == "result" and data[0] == pre:
                break
        self.inflight.clear()
        if led.token(rid, data[1][0], self.now()):
            return self.stream(force=True)
        head = SpecHead(tuple(prompt), data[1][0], int(led.out[rid]), self.s.mode, self.s.depth, self.s.width)
        self._act(head, rid)
        while not head.done and not led.done(rid):
            kind, *data = self._next_event()
            if kind == "result":
                run = self.inflight.pop(data[0], None)
                if run is None:
                    continue  # a cancelled run's, or an earlier request's
                committed, cancelled = head.on_result(run.id, data[1][:run.fed])
                t = self.now()
                for tok in committed:
                    if led.token(rid, tok, t):
                        break
                self._cancel(cancelled)
            else:
                req, ask, tokens = data
                if req != rid:
                    continue
                self._count_draft(ask, tokens)
                run = head.on_draft(ask, tokens)
                if run is not None:
                    self._launch(run)
            self._act(head, rid)
        self._cancel(list(head.runs))
        self.counts.add(head.counts)
        self.stream(force=True)

    def _next_event(self) -> tuple:
        ev = self.events.get()
        if ev[0] == "error":
            raise RuntimeError(f"rank 0: a receive failed: {ev[1]}")
        return ev

    def _act(self, head: SpecHead, rid: int) -> None:
        """What the head's state calls for: the non-speculative run, a draft request."""
        run = head.plain_run()
        if run is not None:
            self._launch(run)
        if head.wants_draft():
            ask, chain, room = head.ask_draft()
            k = min(room, self.s.n_draft)
            self.asked[ask] = k
            msg = torch.zeros(6 + self.ctx.cache_len, dtype=torch.long)
            msg[:6] = _i64([0, rid, ask, k, len(chain), time.perf_counter_ns()])
            msg[6:6 + len(chain)] = _i64(chain)
            self.comm.send([msg], self.S, TAG_DRAFT_REQ)

    def _count_draft(self, ask: int, branches: list[list[int]]) -> None:
        """Counts a draft's trunk (the acceptance model's ``stop_p``: where the drafter stopped short)."""
        c, n = self.draft_calls, len(branches[0]) if branches else 0
        c[0] += 1
        c[1] += n
        c[2] += n < self.asked.pop(ask, 0)

    def _launch(self, run: Run, n_out: int | None = None) -> int:
        """Stage 0 computes ``run`` here and passes it on; returns its global id."""
        gid, self.next_gid = self.next_gid, self.next_gid + 1
        n_out = run.fed if n_out is None else n_out
        if run.id >= 0:
            self.inflight[gid] = run
            self.gid_of[run.id] = gid
        x = torch.tensor([t for b in run.branches for t in b], dtype=torch.long)
        lens = [len(b) for b in run.branches]
        out = self.stage.compute(gid, x, run.start, lens, list(run.rows), run.copies, n_out, False)
        self.stage.send_on(gid, run.start, lens, list(run.rows), run.copies, n_out, out)
        if self.S == 1:
            buf = self.stage.local
            self.events.put(("result", gid, buf[3:3 + n_out].tolist()))
        return gid

    def _cancel(self, runs: list[Run]) -> None:
        """Tells every later stage to drop ``runs`` (consecutive launches)."""
        gids = [self.gid_of[r.id] for r in runs if r.id in self.gid_of]
        for g in gids:
            self.inflight.pop(g, None)
        if gids and self.S > 1:
            msg = _i64([0, min(gids), max(gids), time.perf_counter_ns()])
            for r in range(1, self.S):
                self.comm.send([msg], r, TAG_CANCEL)

    # --- receive threads --------------------------------------------------------------------------------

    def _receiving(self, loop) -> None:
        """Runs a receive loop; a failure (a peer died) reaches the head as an event instead of leaving it
        waiting."""
        try:
            loop()
        except Exception as e:  # noqa: BLE001 - handed to the head, which raises it
            self.events.put(("error", f"{type(e).__name__}: {e}"))

    def _receive_results(self) -> None:
        size = self.stage.res_len
        while True:
            buf = self.comm.recv((size,), torch.long, self.S - 1, TAG_RESULT)
            gid, n, sent = buf[:3].tolist()
            if gid < 0:
                return
            wait_until(sent + self.stage.delay_ns)
            self.hops.append((time.perf_counter_ns() - sent) / 1e9)
            self.events.put(("result", gid, buf[3:3 + n].tolist()))

    def _receive_drafts(self) -> None:
        W = self.s.width
        size = 4 + W + W * self.s.n_draft
        while True:
            buf = self.comm.recv((size,), torch.long, self.S, TAG_DRAFT)
            req, ask, n, sent = buf[:4].tolist()
            if req < 0:
                return
            wait_until(sent + self.stage.delay_ns)
            flat, branches, at = buf[4 + W:].tolist(), [], 0
            for m in buf[4:4 + n].tolist():
                branches.append(flat[at:at + m])
                at += m
            self.events.put(("draft", req, ask, branches))

    def _shutdown(self, threads) -> dict:
        """Stops every rank and gathers what each counted."""
        stop = _i64([STOP, 0, 0, 0])
        for r in range(1, self.S):
            self.comm.send([stop], r, TAG_CANCEL)
        if self.S > 1:
            self.comm.send([_i64([STOP] + [0] * (run_hdr(self.s.width) - 1))], 1, TAG_RUN)
        if self.s.mode != "plain":
            self.comm.send([_i64([STOP] + [0] * (5 + self.ctx.cache_len))], self.S, TAG_DRAFT_REQ)
        for t in threads:
            t.join()
        stages = [self.stage.stats] + [self.comm.recv((STAGE_STATS,), torch.float64, r, TAG_STATS).numpy()
                                       for r in range(1, self.S)]
        drafter = None
        if self.s.mode != "plain":
            drafter = self.comm.recv((4,), torch.float64, self.S, TAG_STATS).tolist()
        self.comm.flush()
        return speculation_stats(self.counts, stages, drafter, self.draft_calls, self.hops)


def speculation_stats(counts: SpecCounts, stages, drafter, draft_calls, hops) -> dict:
    """``RunReport.speculation``: the heads' counts, each stage's, the drafter's, and what the simulated timeline
    is priced with (``stage_base_s``, ``stage_tok_s``: a straight line of a stage's seconds on a run's padded
    tokens; the acceptance model: ``trunk_acceptance`` (alpha), ``stop_p`` (the trunks' stops per drafted token)
    and ``rescue`` (per sibling tried where the trunk missed))."""
    out = {f: getattr(counts, f) for f in counts.__slots__}
    out["acceptance"] = counts.acceptance
    out["trunk_acceptance"], out["rescue"] = counts.trunk_acceptance, counts.rescue
    names = ("runs", "skipped", "aborted", "rolled_back", "layers", "layers_saved")
    out["stages"] = [{k: int(v) for k, v in zip(names, st[:6])} | {"copies": int(st[11]), "copied": int(st[12])}
                     for st in stages]
    out["stage_sums"] = [[float(x) for x in st[6:11]] for st in stages]
    fits = [fit_line(st[6:11]) for st in stages]
    out["stage_base_s"], out["stage_tok_s"] = [f[0] for f in fits], [f[1] for f in fits]
    out["hop_s"] = float(np.median(hops)) if hops else 0.0
    if drafter is not None:
        calls, tokens, busy, fed = drafter
        out["drafter"] = {"calls": int(calls), "tokens": int(tokens), "busy_s": busy, "fed": int(fed)}
        out["draft_tok_s"] = busy / max(1.0, tokens + fed)
        back, toks, stops = draft_calls
        out["stop_p"] = stops / (toks + stops) if toks + stops else 0.0
    return out


def fit_line(sums) -> tuple[float, float]:
    """(base, per-token) seconds: least squares of a stage's decode runs from their sums (n, Σb, Σt, Σb², Σbt),
    which add up over runs; the slope is 0 when every run had the same size."""
    n, sb, st, sbb, sbt = (float(x) for x in sums)
    if not n:
        return 0.0, 0.0
    den = n * sbb - sb * sb
    slope = max(0.0, (n * sbt - sb * st) / den) if n > 1 and den > 1e-9 * n * n else 0.0
    return (st - slope * sb) / n, slope
