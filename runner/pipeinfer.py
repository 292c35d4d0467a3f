"""PipeInfer's executor: S target stages on ranks 0 .. S-1 and a drafter on rank S (``exegpt.policies.pipeinfer``).

Rank 0 is the head: it runs the policy's driver, computes stage 0 of every run it launches, and takes every
decision through ``exegpt.speculation.SpecHead`` (the simulated timeline drives the same head). Messages, all
torch.distributed point-to-point:
  * a run (header, then stage 0's hidden states) from each stage to the next, in launch order; the last stage
    sends the target's greedy token after each position (or after the last, for a prefill) back to the head;
  * cancellations (a range of run ids) from the head to every later stage on a channel of their own, read by a
    thread: a stage skips a cancelled run it has not started and stops one in progress before its next layer;
  * draft requests (the context) to the drafter and its drafts back.
KV: one cache row per stage. A run writes positions ``[start, start + n)``; before computing it a stage resets the
row's length to ``start``, which rolls back whatever a rejected or cancelled run wrote past it (runs reach every
stage in launch order, so committed KV is only ever extended in order). The head's receive threads put results and
drafts into one queue, handled in arrival order.

A slow link is emulated on every hop: a message carries its send time, and its receiver does not take it before
that time plus ``link_delay_s`` (a latency: senders never wait).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from exegpt.errors import ExeGPTError
from exegpt.policies.pipeinfer import draft_spec
from exegpt.report import RunReport

from .dist import Comm
from .drafter import ModelDrafter, NgramDrafter
from .pipeline import RunContext, _i64, build_stage_model, start_clock
from .spec_head import Head
from .spec_wire import RUN_HDR, STAGE_STATS, STOP, TAG_CANCEL, TAG_DRAFT, TAG_DRAFT_REQ, TAG_RESULT, \
    TAG_RUN, TAG_STATS, wait_until



class Cancelled(Exception):
    """A run's cancellation reached its stage mid-way."""


def check_context(plan, model: str, target_args) -> None:
    """One line for a drafter the target cannot use (``run_plan`` calls it before any rank starts)."""
    kind, arg = draft_spec(plan.schedule.draft)
    if kind == "layers" and int(arg) > target_args.n_layers:
        raise ExeGPTError(f"pipeinfer: draft layers:{arg} exceeds the target's {target_args.n_layers} layers")
    if kind == "model":
        from .run import model_args

        other = model_args(arg)
        if other.vocab_size != target_args.vocab_size:
            raise ExeGPTError(f"pipeinfer: draft model {arg!r} has a vocabulary of {other.vocab_size} tokens, the "
                              f"target {model!r} {target_args.vocab_size}; a drafter must share the target's")


def run_policy(ctx: RunContext, rank: int, world_size: int, device: torch.device, sink=None) -> RunReport | None:
    """This rank's part of a run (``runner.engine.run_policy``'s; ``sink`` gets each finished request's record on
    rank 0)."""
    s = ctx.plan.schedule
    if world_size != s.num_gpus:
        raise ExeGPTError(f"pipeinfer: {s.mode} over {s.stages} stages needs {s.num_gpus} ranks, got {world_size}")
    t0 = start_clock(device)
    delay_ns = int(s.link_delay_s * 1e9)
    if rank == s.stages:
        _serve_drafter(ctx, device, delay_ns)
        return None
    model, tok = build_stage_model(ctx, rank, device, {}, 1, ctx.cache_len)
    stage = _Stage(ctx, rank, model, Comm(device), delay_ns)
    if rank != 0:
        stage.serve()
        return None
    return Head(ctx, stage, tok, t0, sink).run()


class _Stage:
    """One target stage: its layers, its row of KV, and what it counted."""

    def __init__(self, ctx: RunContext, rank: int, model, comm: Comm, delay_ns: int):
        s = ctx.plan.schedule
        self.ctx, self.rank, self.model, self.comm, self.delay_ns = ctx, rank, model, comm, delay_ns
        self.S, self.last = s.stages, rank == s.stages - 1
        self.res_len = 3 + s.n_draft + 1
        self.cancelled: set[int] = set()
        self.lock = threading.Lock()
        self.stats = np.zeros(STAGE_STATS)
        self.fault = ctx.fault[1] if ctx.fault is not None and ctx.fault[0] == rank else None

    @torch.inference_mode()
    def compute(self, gid: int, x: torch.Tensor, start: int, n_out: int, check: bool) -> torch.Tensor:
        """The run's layers on this stage (``check``: stop between layers once it is cancelled); the next stage's
        hidden states, or the last stage's greedy tokens of the last ``n_out`` positions."""
        m, st = self.model, self.stats
        if self.fault is not None and st[0] >= self.fault:
            raise RuntimeError(f"injected fault on rank {self.rank} after {int(st[0])} runs")
        n = x.shape[0]
        held = int(m.cache.lengths[0])
        if held > start and start > 0:
            st[3] += held - start  # a rejected or cancelled run's KV, rolled back
        elif held < start:
            raise ExeGPTError(f"rank {self.rank}: run {gid} starts at {start} but the row holds {held} positions")
        m.cache.lengths[0] = start
        t = time.perf_counter()

        def layers(h, step, valid):
            for i, layer in enumerate(m.layers.values()):
                if check and gid in self.cancelled:
                    st[5] += len(m.layers) - i
                    raise Cancelled
                h = layer(h, step, m.cache, i)
                st[4] += 1
            return h

        try:
            h, _ = m._prefill(x, torch.tensor([n]), torch.tensor([0]), None if start == 0 else torch.tensor([start]),
                              layers)
        except Cancelled:
            m.cache.lengths[0] = start
            st[2] += 1
            raise
        out = m._logits(h[0, n - n_out:]).argmax(dim=-1) if m.head else h.reshape(n, -1)
        st[0] += 1
        if start > 0:  # decode runs: the regression of seconds on tokens the simulated timeline is priced with
            dt = time.perf_counter() - t
            st[6:11] += (1, n, dt, n * n, n * dt)
        return out

    def send_on(self, gid: int, start: int, n_tok: int, n_out: int, out: torch.Tensor) -> None:
        """A computed run to the next stage, or its tokens to the head."""
        now = time.perf_counter_ns()
        if self.last:
            buf = torch.zeros(self.res_len, dtype=torch.long)
            buf[:3] = _i64([gid, n_out, now])
            buf[3:3 + n_out] = out
            if self.rank == 0:
                self.local = buf
            else:
                self.comm.send([buf], 0, TAG_RESULT)
            return
        self.comm.send([_i64([0, gid, start, n_tok, n_out, now]), out.contiguous()], self.rank + 1, TAG_RUN)

    def serve(self) -> None:
        """A stage of rank > 0: runs in order until STOP; cancellations on a thread."""
        listener = threading.Thread(target=self._cancels, daemon=True)
        listener.start()
        dim = self.model.args.dim
        dtype = next(self.model.parameters()).dtype
        while True:
            hdr = self.comm.recv((RUN_HDR,), torch.long, self.rank - 1, TAG_RUN)
            kind, gid, start, n_tok, n_out, sent = hdr.tolist()
            if kind == STOP:
                break
            hidden = self.comm.recv((n_tok, dim), dtype, self.rank - 1, TAG_RUN)
            wait_until(sent + self.delay_ns)
            if gid in self.cancelled:  # skipped before it started
                self.stats[1] += 1
                self.stats[5] += len(self.model.layers)
                continue
            try:
                out = self.compute(gid, hidden, start, n_out, True)
            except Cancelled:
                continue
            self.send_on(gid, start, n_tok, n_out, out)
        if not self.last:
            self.comm.send([_i64([STOP, 0, 0, 0, 0, 0])], self.rank + 1, TAG_RUN)
        else:
            self.comm.send([_i64([-1] + [0] * (self.res_len - 1))], 0, TAG_RESULT)  # ends the head's receiver
        listener.join()
        self.comm.send([torch.tensor(self.stats, dtype=torch.float64)], 0, TAG_STATS)
        self.comm.flush()

    def _cancels(self) -> None:
        while True:
            kind, lo, hi, sent = self.comm.recv((4,), torch.long, 0, TAG_CANCEL).tolist()
            if kind == STOP:
                return
            wait_until(sent + self.delay_ns)
            with self.lock:
                self.cancelled.update(range(lo, hi + 1))


def _serve_drafter(ctx: RunContext, device: torch.device, delay_ns: int) -> None:
    """The drafter's rank: drafts in request order until STOP; then its counts to the head."""
    from .weights import load_model

    s = ctx.plan.schedule
    kind, arg = draft_spec(s.draft)
    if kind == "ngram":
        drafter = NgramDrafter(int(arg), s.cutoff)
    else:
        spec, layers = (ctx.model, (0, int(arg))) if kind == "layers" else (arg, None)
        model, _, _ = load_model(spec, torch.float32, device, layers=layers, embed=True, head=True, seed=ctx.seed)
        drafter = ModelDrafter(model.eval(), s.cutoff, ctx.cache_len + s.n_draft + 1)
    comm = Comm(device)
    size = 6 + ctx.cache_len
    fault = ctx.fault[1] if ctx.fault is not None and ctx.fault[0] == s.stages else None
    calls, tokens, busy = 0, 0, 0.0
    while True:
        msg = comm.recv((size,), torch.long, 0, TAG_DRAFT_REQ)
        kind_, req, version, k, n, sent = msg[:6].tolist()
        if kind_ == STOP:
            break
        wait_until(sent + delay_ns)
        if fault is not None and calls >= fault:
            raise RuntimeError(f"injected fault on the drafter's rank {s.stages} after {calls} drafts")
        t = time.perf_counter()
        out = drafter.draft(msg[6:6 + n].tolist(), k)
        busy += time.perf_counter() - t
        calls, tokens = calls + 1, tokens + len(out)
        reply = torch.zeros(4 + s.n_draft, dtype=torch.long)
        reply[:4] = _i64([req, version, len(out), time.perf_counter_ns()])
        reply[4:4 + len(out)] = _i64(out)
        comm.send([reply], 0, TAG_DRAFT)
    comm.send([_i64([-1] + [0] * (3 + s.n_draft))], 0, TAG_DRAFT)  # ends the head's receiver
    comm.send([torch.tensor([calls, tokens, busy, drafter.fed], dtype=torch.float64)], 0, TAG_STATS)
    comm.flush()
