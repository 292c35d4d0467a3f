"""PipeInfer's executor: S target stages on ranks 0 .. S-1 and a drafter on rank S (``exegpt.policies.pipeinfer``).

Rank 0 is the head: it runs the policy's driver, computes stage 0 of every run it launches, and takes every
decision through ``exegpt.speculation.SpecHead`` (the simulated timeline drives the same head). Messages, all
torch.distributed point-to-point:
  * a run (header, then stage 0's hidden states) from each stage to the next, in launch order; the last stage
    sends the target's greedy token after each position (or after the last, for a prefill) back to the head;
  * cancellations (a range of run ids) from the head to every later stage on a channel of their own, read by a
    thread: a stage skips a cancelled run it has not started and stops one in progress before its next layer;
  * draft requests (the context) to the drafter and its drafts back.
KV: the rows the head's ``SpecHead`` assigns (``exegpt.speculation.cache_rows`` of them per stage: the main row,
and the sibling rows of tree runs). A run of w branches is a w-row prefill chunk from one start (each row a plain
causal chain, padded to the longest); before computing it a stage executes the row copies the run carries (KV
positions [a, b) of one row to another, bringing a sibling row up to date) and resets each of its rows' length to
``start``, which rolls back whatever a rejected or cancelled run wrote past it (runs reach every stage in launch
order, so the KV a run reads or copies is there, and committed KV is only ever extended in order). The head's
receive threads put results and drafts into one queue, handled in arrival order.

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
from .spec_wire import STAGE_STATS, STOP, TAG_CANCEL, TAG_DRAFT, TAG_DRAFT_REQ, TAG_RESULT, TAG_RUN, \
    TAG_STATS, pack_run, run_hdr, unpack_run, wait_until


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
    model, tok = build_stage_model(ctx, rank, device, {}, s.rows, ctx.cache_len)
    stage = _Stage(ctx, rank, model, Comm(device), delay_ns)
    if rank != 0:
        stage.serve()
        return None
    return Head(ctx, stage, tok, t0, sink).run()


class _Stage:
    """One target stage: its layers, its rows of KV, and what it counted."""

    def __init__(self, ctx: RunContext, rank: int, model, comm: Comm, delay_ns: int):
        s = ctx.plan.schedule
        self.ctx, self.rank, self.model, self.comm, self.delay_ns = ctx, rank, model, comm, delay_ns
        self.S, self.last, self.width = s.stages, rank == s.stages - 1, s.width
        self.res_len = 3 + s.width * (s.n_draft + 1)
        self.hdr_len = run_hdr(s.width)
        self.cancelled: set[int] = set()
        self.lock = threading.Lock()
        self.stats = np.zeros(STAGE_STATS)
        self.fault = ctx.fault[1] if ctx.fault is not None and ctx.fault[0] == rank else None

    def check_rows(self, gid: int, start: int, rows, copies, check: bool) -> None:
        """That the rows hold what the run's copies and branches read (they do unless a run before it was skipped
        or stopped by a cancellation that names this one too: then it is skipped as well)."""
        held = {r: int(self.model.cache.lengths[r]) for r in set(rows) | {c[i] for c in copies for i in (0, 1)}}
        why = None
        for src, dst, a, b in copies:
            if held[src] < b or held[dst] < a:
                why = f"copies positions [{a}, {b}) of row {src} (holding {held[src]}) to row {dst} (holding " \
                      f"{held[dst]})"
                break
            held[dst] = b
        for r in rows:
            if why is None and held[r] < start:
                why = f"starts at {start} but row {r} holds {held[r]} positions"
        if why is None:
            return
        if check and gid in self.cancelled:
            self.stats[1] += 1
            self.stats[5] += len(self.model.layers)
            raise Cancelled
        raise ExeGPTError(f"rank {self.rank}: run {gid} {why}")

    def copy_rows(self, copies) -> None:
        """A run's row copies: KV positions [a, b) of row ``src`` to row ``dst``, in order."""
        cache, st = self.model.cache, self.stats
        for src, dst, a, b in copies:
            held = int(cache.lengths[dst])
            st[3] += max(0, held - a)  # a lost branch's KV, rolled back
            cache.k[:, dst, :, a:b] = cache.k[:, src, :, a:b]
            cache.v[:, dst, :, a:b] = cache.v[:, src, :, a:b]
            cache.lengths[dst] = b
            st[11:13] += (1, b - a)

    @torch.inference_mode()
    def compute(self, gid: int, x: torch.Tensor, start: int, lens: list[int], rows: list[int], copies,
                n_out: int, check: bool) -> torch.Tensor:
        """The run's layers on this stage, its branches in rows ``rows`` from ``start`` after its row ``copies``
        (``check``: stop between layers once it is cancelled); the next stage's hidden states (branch after
        branch), or the last stage's greedy tokens of the last ``n_out`` positions."""
        m, st = self.model, self.stats
        if self.fault is not None and st[0] >= self.fault:
            raise RuntimeError(f"injected fault on rank {self.rank} after {int(st[0])} runs")
        self.check_rows(gid, start, rows, copies, check)
        self.copy_rows(copies)
        for r in rows:
            held = int(m.cache.lengths[r])
            if held > start and start > 0:
                st[3] += held - start  # a rejected or cancelled run's KV, rolled back
        row_t = torch.tensor(rows)
        m.cache.lengths[row_t] = start
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
            h, valid = m._prefill(x, torch.tensor(lens), row_t,
                                  None if start == 0 else torch.tensor([start] * len(rows)), layers)
        except Cancelled:
            m.cache.lengths[row_t] = start
            st[2] += 1
            raise
        h = h.reshape(-1, h.shape[-1]) if valid is None else h[valid]  # [T, dim], branch after branch
        n = h.shape[0]
        out = m._logits(h[n - n_out:]).argmax(dim=-1) if m.head else h
        st[0] += 1
        if start > 0:  # decode runs: the regression of seconds on tokens the simulated timeline is priced with
            dt, b = time.perf_counter() - t, len(rows) * max(lens)
            st[6:11] += (1, b, dt, b * b, b * dt)
        return out

    def send_on(self, gid: int, start: int, lens, rows, copies, n_out: int, out: torch.Tensor) -> None:
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
        hdr = pack_run(self.width, gid, start, lens, rows, copies, n_out, now)
        self.comm.send([_i64(hdr), out.contiguous()], self.rank + 1, TAG_RUN)

    def serve(self) -> None:
        """A stage of rank > 0: runs in order until STOP; cancellations on a thread."""
        listener = threading.Thread(target=self._cancels, daemon=True)
        listener.start()
        dim = self.model.args.dim
        dtype = next(self.model.parameters()).dtype
        while True:
            hdr = self.comm.recv((self.hdr_len,), torch.long, self.rank - 1, TAG_RUN)
            kind, gid, start, n_tok, n_out, sent, lens, rows, copies = unpack_run(self.width, hdr.tolist())
            if kind == STOP:
                break
            hidden = self.comm.recv((n_tok, dim), dtype, self.rank - 1, TAG_RUN)
            wait_until(sent + self.delay_ns)
            if gid in self.cancelled:  # skipped before it started (its row copies too: the head forgets them)
                self.stats[1] += 1
                self.stats[5] += len(self.model.layers)
                continue
            try:
                out = self.compute(gid, hidden, start, lens, rows, copies, n_out, True)
            except Cancelled:
                continue
            self.send_on(gid, start, lens, rows, copies, n_out, out)
        if not self.last:
            self.comm.send([_i64([STOP] + [0] * (self.hdr_len - 1))], self.rank + 1, TAG_RUN)
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
    """The drafter's rank: drafts (trees of up to ``width`` branches) in request order until STOP; then its counts
    to the head."""
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
    size, W = 6 + ctx.cache_len, s.width
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
        out = drafter.draft_tree(msg[6:6 + n].tolist(), k, W)
        busy += time.perf_counter() - t
        calls, tokens = calls + 1, tokens + sum(map(len, out))
        reply = torch.zeros(4 + W + W * s.n_draft, dtype=torch.long)  # header, branch lengths, branches
        reply[:4] = _i64([req, version, len(out), time.perf_counter_ns()])
        reply[4:4 + len(out)] = _i64([len(b) for b in out])
        flat = [t for b in out for t in b]
        reply[4 + W:4 + W + len(flat)] = _i64(flat)
        comm.send([reply], 0, TAG_DRAFT)
    comm.send([_i64([-1] + [0] * (3 + W + W * s.n_draft))], 0, TAG_DRAFT)  # ends the head's receiver
    comm.send([torch.tensor([calls, tokens, busy, drafter.fed], dtype=torch.float64)], 0, TAG_STATS)
    comm.flush()
