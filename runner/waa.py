"""WAA executor (WAA-C and WAA-M): an encode pipeline and a decode pipeline on disjoint ranks, concurrently.

The encode driver (rank 0) prefills batches of B_E queries through the encode stages. After each prefill
every encode rank sends the KV of its layers and heads to the decode ranks that hold them (through
``torch.distributed``; on gloo this goes through host memory, as in the paper), and the last encode stage
sends the batch's first tokens to the decode driver. The decode driver merges one encoded batch per decode
iteration whenever its cache has the rows free, waiting for it if the encoder is behind (backpressure the
other way: the encoder waits for a credit, at most ``DEPTH`` batches ahead), then runs one decode iteration
of the whole batch in micro-batches of B_m rows, pipelined over the decode stages. Finished rows are
compacted out every iteration.

Rules shared with the simulator: one encode batch per decode iteration when rows are free; the prefill's
token is the first output token (S tokens take S - 1 decode iterations); decode micro-batches of B_m rows;
decode cache rows ``ceil(decode_batch) + encode_batch``.

The KV of a layer and a range of KV heads goes from the encode rank holding it to the decode rank needing
it, so encode and decode stages may split layers and TP heads differently.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

from exegpt.rules import SteadyMarker, SteadyWindow, split_by, waa_cache_rows as cache_rows
from exegpt.simulate import HANDOFF_DEPTH

from .dist import TAG_CREDIT, TAG_KV, TAG_META, StageRanks
from .kv_cache import fill_holes, row_index
from .pipeline import COMPACT, END, IMPORT, PREFILL, Command, Pipeline, RunContext, StageRuntime, _i64, \
    driver_clock, eos_of, make_runtime, make_tp_groups, progress_bar, run_decode, start_clock
from .report import RunReport, build_report
from .requests import Request, RequestTracker

DEPTH = HANDOFF_DEPTH
"""Encoded batches the encoder may run ahead of the decoder's merges, and hand-off receives (metadata and KV)
the decode ranks keep posted. gloo moves a message only once its receive is posted, and then only when both
processes' communication threads get a core; with the receive of batch k + 1 posted only after batch k merged, a
CPU decode driver waited 0.9 ms a merge for metadata the encoder had sent long before, and the encoder 1.4 ms a
batch for credits (instrumented, WAA-C B_E = 1, two ranks on two cores)."""


def _kv_slice(src: StageRanks, src_rank: int, dst: StageRanks, dst_rank: int, n_kv_heads: int
              ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Global (layers, kv heads) that ``src_rank`` holds and ``dst_rank`` needs, or None."""
    l0, l1 = max(src.layers[0], dst.layers[0]), min(src.layers[1], dst.layers[1])

    def heads(s: StageRanks, r: int) -> tuple[int, int]:
        per = n_kv_heads // len(s.ranks)
        t = r - s.leader
        return t * per, (t + 1) * per

    (a0, a1), (b0, b1) = heads(src, src_rank), heads(dst, dst_rank)
    h0, h1 = max(a0, b0), min(a1, b1)
    if l0 >= l1 or h0 >= h1:
        return None
    return (l0, l1), (h0, h1)


class EncodeStage(StageRuntime):
    """An encode rank: after each prefill, hands the KV to the decode ranks; the last stage sends the batch's
    metadata and first tokens to the decode driver."""

    def __init__(self, *a, decode_stages: list[StageRanks], encode_batch: int, prompt_len: int, t0_ns: int = 0,
                 **kw):
        super().__init__(*a, **kw)
        self.decode_stages, self.encode_batch, self.t0_ns = decode_stages, encode_batch, t0_ns
        self.pad = _handoff_pad(self.model.cache.device, encode_batch, prompt_len)
        self.n_kv_heads = self.model.args.n_kv_heads * len(self.stage.ranks)

    def after_prefill(self, cmd: Command) -> None:
        cache = self.model.cache
        rows = row_index(cmd.rows, cache.device)
        L = int(cmd.seq_lens.max())
        a = self.stage.layers[0]
        h_base = (self.rank - self.stage.leader) * (self.n_kv_heads // len(self.stage.ranks))
        for dst in self.decode_stages:
            for r in dst.ranks:
                sl = _kv_slice(self.stage, self.rank, dst, r, self.n_kv_heads)
                if sl is None:
                    continue
                (l0, l1), (h0, h1) = sl
                at = (slice(l0 - a, l1 - a), rows, slice(h0 - h_base, h1 - h_base), slice(0, L))
                self.comm.send([pack_kv(cache.k[at], cache.v[at], self.pad)], r, TAG_KV)

    def emit(self, cmd: Command, tokens: torch.Tensor) -> None:
        n = cmd.rows.numel()
        meta = torch.zeros(4 + 3 * self.encode_batch, dtype=torch.long)
        meta[:4] = _i64([n, cmd.batch, cmd.time_ns, time.perf_counter_ns() - self.t0_ns])
        meta[4:4 + n], meta[4 + n:4 + 2 * n] = cmd.req, cmd.seq_lens
        meta[4 + 2 * n:4 + 3 * n] = tokens.cpu()
        self.comm.send([meta], self.driver, TAG_META)

    def on_end(self, cmd: Command) -> None:
        if self.next_stage is None and self.is_leader:
            meta = torch.zeros(4 + 3 * self.encode_batch, dtype=torch.long)
            meta[0] = -1
            self.comm.send([meta], self.driver, TAG_META)


class DecodeStage(StageRuntime):
    """A decode rank: receives the KV of the encoded batches from the encode ranks and imports it on IMPORT.

    The receives of the next ``DEPTH`` batches' KV stay posted, each into its own buffer of the largest batch
    (``encode_batch`` rows of ``prompt_len`` positions), so the hand-off lands while this rank decodes and IMPORT
    only copies it into the cache rows. This is the overlap the simulator assumes (the KV
    hand-off is off the decode path). gloo takes a shorter message into the buffer, so CPU ranks send exactly the
    batch's KV; NCCL needs equal counts, so on GPUs the encode ranks send the full, zero-padded buffer
    (``_handoff_pad``).
    """

    def __init__(self, *a, encode_stages: list[StageRanks], batches: int, encode_batch: int, prompt_len: int,
                 **kw):
        super().__init__(*a, **kw)
        cache = self.model.cache
        self.n_kv_heads = cache.n_kv_heads * len(self.stage.ranks)
        self.sources = [(r, sl) for src in encode_stages for r in src.ranks
                        if (sl := _kv_slice(src, r, self.stage, self.rank, self.n_kv_heads)) is not None]
        self.free = deque([torch.empty(2 * (l1 - l0) * encode_batch * (h1 - h0) * prompt_len * cache.head_dim,
                                       dtype=cache.dtype, device=cache.device)
                           for _, ((l0, l1), (h0, h1)) in self.sources] for _ in range(DEPTH))
        self.pad = _handoff_pad(cache.device, encode_batch, prompt_len)
        self.batches_left = batches
        self.posted: deque = deque()  # (works, buffers) of the batches posted, oldest first
        if not self.gets_meta:
            for _ in range(DEPTH):
                self.post_next()

    @property
    def gets_meta(self) -> bool:
        """The decode driver receives each batch's metadata too, and posts the KV receive right after the
        metadata's (``drive_decode``): NCCL ignores tags, so receives from one peer must be posted in the order
        it sends (metadata, then KV). The other decode ranks post their own, ``DEPTH`` ahead of their imports."""
        return self.rank == self.driver

    def post_next(self) -> None:
        """Posts the receives of the next encoded batch's KV into a free buffer set, if a batch is still to come."""
        if self.batches_left > 0:
            self.batches_left -= 1
            bufs = self.free.popleft()
            self.posted.append(([dist.irecv(buf, r, tag=TAG_KV) for (r, _), buf in zip(self.sources, bufs)], bufs))

    def on_import(self, cmd: Command) -> None:
        if not self.posted:
            raise RuntimeError(f"rank {self.rank}: IMPORT of batch {cmd.batch} but every encoded batch was imported")
        works, bufs = self.posted.popleft()
        cache = self.model.cache
        n, L, D = cmd.rows.numel(), int(cmd.seq_lens.max()), cache.head_dim
        rows = row_index(cmd.rows, cache.device)
        a = self.stage.layers[0]
        h_base = (self.rank - self.stage.leader) * cache.n_kv_heads
        for work, ((_, ((l0, l1), (h0, h1))), buf) in zip(works, zip(self.sources, bufs)):
            work.wait()
            kv = unpack_kv(buf, (l1 - l0, n, h1 - h0, L, D), self.pad)
            at = (slice(l0 - a, l1 - a), rows, slice(h0 - h_base, h1 - h_base), slice(0, L))
            cache.k[at], cache.v[at] = kv[0], kv[1]
        cache.lengths[cmd.rows] = cmd.seq_lens
        self.free.append(bufs)
        if not self.gets_meta:
            self.post_next()


def _handoff_pad(device: torch.device, encode_batch: int, prompt_len: int) -> tuple[int, int] | None:
    """The (rows, positions) KV hand-offs are padded to: the receiver's full buffer where NCCL's receive count
    must equal the send's; None on CPU, where gloo takes a shorter message."""
    return None if device.type == "cpu" else (encode_batch, prompt_len)


def pack_kv(k: torch.Tensor, v: torch.Tensor, pad: tuple[int, int] | None) -> torch.Tensor:
    """The hand-off message of ``k``, ``v`` ``[l, n, h, L, D]``: ``[2, l, n, h, L, D]`` (one copy out of the
    cache), or zero-padded to the receiver's buffer ``[2, l, B, h, P, D]`` when ``pad`` = (B, P)."""
    if pad is None:
        return torch.stack([k, v])
    l, n, h, L, D = k.shape
    out = k.new_zeros(2, l, pad[0], h, pad[1], D)
    out[0, :, :n, :, :L], out[1, :, :n, :, :L] = k, v
    return out


def unpack_kv(buf: torch.Tensor, shape: tuple[int, int, int, int, int], pad: tuple[int, int] | None
              ) -> torch.Tensor:
    """The ``[2, l, n, h, L, D]`` KV of ``shape`` = (l, n, h, L, D) in a receive buffer that ``pack_kv(..., pad)``
    filled (a view)."""
    l, n, h, L, D = shape
    if pad is None:  # the message fills the front of the buffer
        return buf[:2 * l * n * h * L * D].view(2, l, n, h, L, D)
    return buf.view(2, l, pad[0], h, pad[1], D)[:, :, :n, :, :L]


def encode_batches(ctx: RunContext, encode_batch: int) -> list[list[Request]]:
    """The encoded batches, in order: the runnable requests in batches of ``encode_batch``. The encode driver
    submits them; the decode ranks size and count their KV receives by them."""
    tracker = RequestTracker(ctx.requests, ctx.plan.estimate.latency_len, ctx.max_seq_len, ctx.cache_len,
                             ctx.stop_at_eos, 0 if ctx.stop_at_eos else None)
    return split_by(tracker.runnable, encode_batch)


def run_waa(ctx: RunContext, rank: int, world_size: int, device: torch.device) -> RunReport | None:
    """This rank's part of a WAA run; the decode driver returns the report."""
    plan, sched = ctx.plan, ctx.plan.schedule
    groups = make_tp_groups(ctx.layout)
    enc, dec = ctx.stages_of("encode"), ctx.stages_of("decode")
    enc_driver, dec_driver = enc[0].leader, dec[0].leader
    t0 = start_clock(device)
    batches = encode_batches(ctx, sched.encode_batch)
    prompt_len = max((len(r.prompt) for b in batches for r in b), default=1)
    if ctx.stage_of(rank).pipeline == "encode":
        rt = make_runtime(ctx, rank, device, groups, sched.encode_batch, ctx.cache_len, driver=dec_driver,
                          cls=EncodeStage, decode_stages=dec, encode_batch=sched.encode_batch,
                          prompt_len=prompt_len, t0_ns=t0)
        if rank != enc_driver:
            rt.serve()
            return None
        drive_encode(Pipeline(rt, enc[-1].leader, returns_tokens=False), batches, dec_driver, t0)
        return None
    rows = cache_rows(plan)
    rt = make_runtime(ctx, rank, device, groups, rows, ctx.cache_len, driver=dec_driver, cls=DecodeStage,
                      encode_stages=enc, batches=len(batches), encode_batch=sched.encode_batch,
                      prompt_len=prompt_len)
    if rank != dec_driver:
        rt.serve()
        return None
    tracker = RequestTracker(ctx.requests, plan.estimate.latency_len, ctx.max_seq_len, ctx.cache_len,
                             ctx.stop_at_eos, eos_of(ctx, rt.tokenizer), ctx.keep_tokens)
    bar = progress_bar(ctx, tracker)
    enc_s, dec_it, steady = drive_decode(Pipeline(rt, dec[-1].leader), tracker, sched, rows, enc[-1].leader,
                                         enc_driver, driver_clock(t0), plan.estimate.decode_batch, len(batches))
    if bar is not None:
        bar.close()
    return build_report(sched.policy.value, tracker.records(), plan.estimate.latency_len, enc_s, dec_it,
                        world_size, plan.estimate, steady)


def drive_encode(pipe: Pipeline, batches: list[list[Request]], dec_driver: int, t0_ns: int) -> None:
    """The encode driver: ``batches`` (``encode_batches``) through the encode pipeline, at most DEPTH ahead of the
    merges."""
    comm, sent, credits = pipe.rt.comm, 0, 0
    for k, batch in enumerate(batches):
        if k - credits >= DEPTH:  # backpressure: wait until the decoder merged a batch
            comm.recv((1,), torch.long, dec_driver, TAG_CREDIT)
            credits += 1
        pipe.submit(Command(PREFILL, _i64(range(len(batch))), seq_lens=_i64([len(r.prompt) for r in batch]),
                            ids=_i64([t for r in batch for t in r.prompt]), req=_i64([r.id for r in batch]), batch=k,
                            time_ns=time.perf_counter_ns() - t0_ns))
        sent += 1
    pipe.submit(Command(END, _i64([])))
    for _ in range(sent - credits):
        comm.recv((1,), torch.long, dec_driver, TAG_CREDIT)
    pipe.stop()


def drive_decode(pipe: Pipeline, tracker: RequestTracker, sched, rows: int, enc_last: int, enc_driver: int,
                 clock, planned_batch: float, batches: int
                 ) -> tuple[list[float], list[tuple[float, int]], SteadyWindow | None]:
    """The decode driver. Returns (encode seconds per batch, (seconds, rows) per decode iteration, the steady
    window: from the first iteration whose batch reached ``planned_batch`` rows until the encoder finished).
    ``batches``: how many the encoder sends (``encode_batches``); their metadata and the encoder's end message
    are received ``DEPTH`` ahead."""
    comm = pipe.rt.comm
    size = 4 + 3 * sched.encode_batch
    metas: deque = deque()  # posted metadata receives, oldest first
    to_post = batches + 1  # the batches' metadata and the end message

    def post_meta() -> None:  # this batch's metadata, then its KV (``DecodeStage.gets_meta``)
        nonlocal to_post
        if to_post > 0:
            to_post -= 1
            metas.append(comm.irecv((size,), torch.long, enc_last, TAG_META))
            pipe.rt.post_next()

    alive: list[int] = []  # request of each cache row
    enc_s: list[float] = []
    dec: list[tuple[float, int]] = []
    for _ in range(DEPTH):
        post_meta()
    held: torch.Tensor | None = None  # a received batch waiting for free rows
    encoder_done = False
    steady = SteadyMarker(enc_s, dec)
    while True:
        keep = fill_holes([i for i, rid in enumerate(alive) if not tracker.done(rid)])
        if len(keep) < len(alive):
            pipe.submit(Command(COMPACT, _i64(keep)))
            alive = [alive[i] for i in keep]
        # One encoded batch joins per decode iteration (the simulator's period = max(encode, decode)): wait for
        # the next one whenever it has room. (gloo's irecv does not progress under is_completed() polling, so
        # a poll would merge only when the batch ran empty.)
        if held is None and not encoder_done and len(alive) + sched.encode_batch <= rows:
            work, buf = metas.popleft()
            work.wait()
            held = buf.cpu()
            if int(held[0]) < 0:
                encoder_done, held = True, None
                steady.end(clock())
        if held is not None and len(alive) + int(held[0]) <= rows:
            _merge(pipe, tracker, held, alive, enc_s)
            comm.send([_i64([int(held[1])])], enc_driver, TAG_CREDIT)
            held = None
            post_meta()
        active = [i for i, rid in enumerate(alive) if not tracker.done(rid)]
        if not active:
            if encoder_done and held is None:
                break
            continue
        t = clock()
        if len(active) >= planned_batch:
            steady.begin(t)
        steps = run_decode(pipe, tracker, split_by(active, sched.micro_batch), alive, clock, 1)
        dec.append((clock() - t, steps[0]))
    pipe.stop()
    return enc_s, dec, steady.window(clock())


def _merge(pipe: Pipeline, tracker: RequestTracker, meta: torch.Tensor, alive: list[int], enc_s: list[float]
           ) -> None:
    """Imports an encoded batch into the rows after ``alive`` and records its encode start and first tokens."""
    n, batch, start_ns, first_ns = (int(x) for x in meta[:4])
    req, seq, tok = meta[4:4 + n], meta[4 + n:4 + 2 * n], meta[4 + 2 * n:4 + 3 * n]
    pipe.submit(Command(IMPORT, _i64(range(len(alive), len(alive) + n)), seq_lens=seq.clone(), req=req.clone(),
                        batch=batch))
    for rid, t in zip(req.tolist(), tok.tolist()):
        tracker.start(rid, start_ns / 1e9)
        tracker.token(rid, t, first_ns / 1e9)
    alive += req.tolist()
    enc_s.append((first_ns - start_ns) / 1e9)
