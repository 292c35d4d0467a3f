"""Stage execution: commands flow through a pipeline of stages with their activations; tokens flow back.

Every pipeline has a *driver*, the leader of its first stage, on which the policy's driver runs
(``runner.engine``). A command (prefill or decode of one micro-batch, or a cache
operation) is executed by each stage in pipeline order: the driver sends it to its TP peers, computes
stage 0, and sends the command with the hidden states to every rank of stage 1, whose leader forwards to
stage 2, and so on. The last stage's leader returns the greedy tokens of compute commands to the driver.
Every stage sees the commands in the order the driver issued them, so cache operations (compaction, KV
import) stay consistent with the micro-batches in flight. Up to any number of micro-batches can be in
flight: sends are asynchronous and the driver collects tokens first-in first-out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .dist import HEADER, TAG_BULK, TAG_CMD, TAG_TOKENS, Comm, StageRanks
from .launch import Fault, take_shared
from .generate import prompt_logits

PREFILL, DECODE, COMPACT, IMPORT, END, STOP, MOVE, CHUNK = 1, 2, 3, 4, 5, 6, 7, 8
PREFIX_LOAD, PREFIX_SAVE = 20, 21
"""Prefix cache (``runner.prefix_pool``): rows, lengths (``seq_lens``), slots (``ids``), positions (SAVE: ``req``);
``batch`` the pool's slots."""
COMPUTE = (PREFILL, DECODE, CHUNK)


@dataclass(frozen=True, slots=True)
class Command:
    """One unit of work for every stage of a pipeline."""

    op: int
    rows: Tensor
    """Cache rows ``[n]`` (CPU int64); for COMPACT the rows to keep, in order; for MOVE the source rows
    followed by as many destination rows."""
    seq_lens: Tensor | None = None
    """PREFILL / IMPORT: prompt lengths ``[n]``."""
    ids: Tensor | None = None
    """Input token ids of the first stage: packed prompts ``[T]`` (PREFILL) or ``[n]`` (DECODE)."""
    req: Tensor | None = None
    """PREFILL / IMPORT: request id of each row ``[n]``; CHUNK (a prompt chunk continuing each row): the position
    ``[n]`` each row's chunk starts at."""
    batch: int = 0
    """Encode-batch or micro-batch number."""
    time_ns: int = 0
    """WAA: when the encode batch started (ns since the run's start)."""
    sp: bool = False
    """Compute commands of a Shift Parallelism stage: run in its base (Ulysses) configuration."""


def _i64(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.long).reshape(-1)


INLINE_ROWS = 256
"""Rows of hidden states a command's first message holds (``inline_bytes``); a larger command's remainder follows
as a second message."""


def inline_bytes(dim: int, dtype: torch.dtype) -> int:
    """Capacity of a command's first message: the header, and the metadata (up to two int64 per row) and hidden
    states of ``INLINE_ROWS`` rows. Every rank of a pipeline derives the same capacity from the model."""
    return 8 * HEADER + INLINE_ROWS * (16 + dim * dtype.itemsize)


def send_command(comm: Comm, cmd: Command, hidden: Tensor | None, dst: int, inline: int) -> None:
    """One message of at most ``inline`` bytes: the header ``[op, n, T, has_seq, has_req, batch, time_ns,
    hidden_rows, sp]``, the int64 meta (rows, seq_lens, req, ids) and the hidden states; what exceeds ``inline``
    follows on ``TAG_BULK``. NCCL needs equal counts, so on GPUs the first message is padded to ``inline``.

    NOTE: one message, into a receive the peer posted beforehand (``CommandInbox``). gloo moves a message only once
    its receive is posted; one posted after the previous message arrived is announced back to the sender, whose
    gloo thread then writes the data, and that thread must wait for a core while both ranks compute. Measured on
    the 2-core development VM: a header-then-payload hop took 200-290 us one way (median; 4-8 ms in one of ten),
    one message 80 us; in a two-stage pipeline whole ranks sat idle 2.6-2.8 ms for a payload whose header had
    arrived.
    """
    ids = cmd.ids if hidden is None else None
    parts = [cmd.rows] + [t for t in (cmd.seq_lens, cmd.req, ids) if t is not None]
    header = [cmd.op, cmd.rows.numel(), 0 if ids is None else ids.numel(), cmd.seq_lens is not None,
              cmd.req is not None, cmd.batch, cmd.time_ns, 0 if hidden is None else hidden.shape[0], cmd.sp]
    msg = torch.cat([_i64(header)] + [_i64(p) for p in parts]).view(torch.uint8).to(comm.device)
    if hidden is not None:
        msg = torch.cat([msg, hidden.contiguous().view(torch.uint8).reshape(-1)])
    first = msg[:inline]
    if comm.equal_counts and first.numel() < inline:
        first = torch.cat([first, first.new_zeros(inline - first.numel())])
    comm.send([first], dst, TAG_CMD)
    if msg.numel() > inline:
        comm.send([msg[inline:]], dst, TAG_BULK)


class CommandInbox:
    """The commands from one source rank, the receive of the next one always posted before this rank computes the
    current one (see ``send_command``)."""

    def __init__(self, comm: Comm, src: int, dim: int, dtype: torch.dtype):
        self.comm, self.src, self.dim, self.dtype = comm, src, dim, dtype
        self.inline = inline_bytes(dim, dtype)
        self._posted = self._post() if comm.prepost else None  # NCCL: posted when needed (``Comm.prepost``)

    def _post(self):
        return self.comm.irecv((self.inline,), torch.uint8, self.src, TAG_CMD)

    def next(self) -> tuple[Command, Tensor | None]:
        """The next command and its hidden states (None without). After STOP nothing more is posted."""
        buf = (self._posted or self._post()).wait()
        h = buf[:8 * HEADER].view(torch.long).tolist()
        op, n, T, has_seq, has_req, batch, time_ns, hidden_rows, sp = h
        meta_bytes = 8 * (n + n * has_seq + n * has_req + T)
        total = 8 * HEADER + meta_bytes + hidden_rows * self.dim * self.dtype.itemsize
        if total > self.inline:  # received before the next post: NCCL matches a pair's messages in order
            buf = torch.cat([buf, self.comm.recv((total - self.inline,), torch.uint8, self.src, TAG_BULK)])
        self._posted = self._post() if op != STOP and self.comm.prepost else None
        meta = buf[8 * HEADER:8 * HEADER + meta_bytes].view(torch.long).cpu()
        parts, off = [], 0
        for size in (n, n * has_seq, n * has_req, T):
            parts.append(meta[off:off + size])
            off += size
        hidden = None
        if hidden_rows:
            hidden = buf[8 * HEADER + meta_bytes:total].view(self.dtype).view(hidden_rows, self.dim)
        # parts: rows, seq_lens, req, ids
        cmd = Command(op, parts[0], parts[1] if has_seq else None, parts[3] if T else None,
                      parts[2] if has_req else None, batch, time_ns, bool(sp))
        return cmd, hidden


class StageRuntime:
    """One rank's part of a pipeline stage: its model shard and KV cache, and where commands go next.

    Subclasses (WAA) add what happens after a prefill (KV export), on IMPORT and on END.
    """

    def __init__(self, model, stage: StageRanks, prev_stage: StageRanks | None, next_stage: StageRanks | None,
                 rank: int, comm: Comm, driver: int, fault: Fault | None = None):
        self.model, self.stage, self.next_stage, self.rank, self.comm = model, stage, next_stage, rank, comm
        self.prev_stage = prev_stage
        self.driver = driver
        """Rank that receives the last stage's tokens."""
        self.local_tokens: deque[Tensor] = deque()
        self.tokenizer = None
        self.fault = fault
        self.num_executed = 0
        param = next(model.parameters())
        self.dim, self.dtype, self.device = model.args.dim, param.dtype, param.device  # device: where it computes
        self.inline = inline_bytes(self.dim, self.dtype)

    @property
    def is_leader(self) -> bool:
        return self.rank == self.stage.leader

    def source(self) -> int:
        """Where this rank receives commands from."""
        return self.stage.leader if self.prev_stage is None else self.prev_stage.leader

    @torch.inference_mode()
    def process(self, cmd: Command, hidden: Tensor | None) -> None:
        """Executes ``cmd`` on this rank and passes it on (leader) to the next stage or back as tokens."""
        if self.fault is not None:
            self.fault.strike(self.rank, self.num_executed)
        self.num_executed += 1
        out = None
        if cmd.op in COMPUTE:
            x = (cmd.ids if self.model.embed else hidden).to(self.device)
            mode = {"sp": True} if cmd.sp else {}  # a Shift Parallelism stage's base mode (runner.ulysses)
            if cmd.op == PREFILL:  # (T5: the encoder, then the decoder's first step)
                out = prompt_logits(self.model, x, cmd.seq_lens, cmd.rows, **mode)
            elif cmd.op == CHUNK:
                out = self.model.prefill(x, cmd.seq_lens, cmd.rows, starts=cmd.req, **mode)
            else:
                out = self.model.decode(x, cmd.rows, **mode)
        elif cmd.op == COMPACT:
            self.model.cache.compact(cmd.rows)
        elif cmd.op in (PREFIX_LOAD, PREFIX_SAVE):
            from .prefix_pool import apply

            apply(self, cmd.op == PREFIX_LOAD, cmd)
        elif cmd.op == MOVE:
            half = cmd.rows.numel() // 2
            self.model.cache.move(cmd.rows[:half], cmd.rows[half:])
        elif cmd.op == IMPORT:
            self.on_import(cmd)
        elif cmd.op == END:
            self.on_end(cmd)
        if self.is_leader:
            if self.next_stage is not None:
                fwd = out if cmd.op in COMPUTE else None
                for dst in self.next_stage.ranks:
                    send_command(self.comm, cmd, fwd, dst, self.inline)
            elif cmd.op in COMPUTE:
                self.emit(cmd, out.argmax(dim=-1))
        if cmd.op == PREFILL:
            self.after_prefill(cmd)  # after emit: the WAA meta goes before the KV on every channel

    def emit(self, cmd: Command, tokens: Tensor) -> None:
        """The last stage's greedy tokens ``[n]`` of a compute command: back to the driver."""
        if self.rank == self.driver:
            self.local_tokens.append(tokens.cpu())
        else:
            self.comm.send([tokens.to(torch.long)], self.driver, TAG_TOKENS)

    def after_prefill(self, cmd: Command) -> None:
        """Hook after a prefill has been passed on (WAA encode ranks export the KV here)."""

    def on_import(self, cmd: Command) -> None:
        """Hook for IMPORT (WAA decode ranks receive KV here)."""
        raise RuntimeError(f"rank {self.rank}: IMPORT on a stage that does not import KV")

    def on_end(self, cmd: Command) -> None:
        """Hook for END (the WAA encode pipeline tells the decode driver it is done)."""

    def on_stop(self) -> None:
        """Hook at STOP (decode ranks wait for the receives they still have posted)."""

    def serve(self) -> None:
        """Worker loop of a non-driver rank: execute commands until STOP."""
        inbox = CommandInbox(self.comm, self.source(), self.dim, self.dtype)
        while True:
            cmd, hidden = inbox.next()
            if cmd.op == STOP:
                if self.is_leader and self.next_stage is not None:
                    for dst in self.next_stage.ranks:
                        send_command(self.comm, cmd, None, dst, self.inline)
                break
            self.process(cmd, hidden)
        self.on_stop()
        self.comm.flush()


class Pipeline:
    """The driver's handle on its pipeline: submit commands, collect tokens in submission order."""

    def __init__(self, runtime: StageRuntime, last_leader: int, returns_tokens: bool = True):
        self.rt = runtime
        self.last_leader = last_leader
        self.returns_tokens = returns_tokens
        """False for WAA's encode pipeline, whose tokens go to the decode driver."""
        self._inflight: deque = deque()
        """Per compute command not yet collected: its posted token receive (work, buffer), its row count where
        receives are posted when needed, or None when the driver's own stage emits the tokens."""

    def submit(self, cmd: Command) -> None:
        if cmd.op in COMPUTE and self.returns_tokens:
            # The tokens' receive is posted before the command leaves (gloo moves a message only into a posted
            # receive; see send_command); on NCCL when collected (``Comm.prepost``).
            n, comm = cmd.rows.numel(), self.rt.comm
            if self.last_leader == self.rt.rank:
                self._inflight.append(None)
            else:
                self._inflight.append(comm.irecv((n,), torch.long, self.last_leader, TAG_TOKENS) if comm.prepost
                                      else n)
        for peer in self.rt.stage.ranks[1:]:
            send_command(self.rt.comm, cmd, None, peer, self.rt.inline)
        self.rt.process(cmd, None)

    def collect(self) -> Tensor:
        """Greedy tokens ``[n]`` of the oldest compute command still in flight (blocks)."""
        posted = self._inflight.popleft()
        if posted is None:
            return self.rt.local_tokens.popleft()
        if isinstance(posted, int):
            return self.rt.comm.recv((posted,), torch.long, self.last_leader, TAG_TOKENS).cpu()
        return posted.wait().cpu()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def stop(self) -> None:
        """Ends every worker of this pipeline and waits for this rank's sends."""
        cmd = Command(STOP, _i64([]))
        for peer in self.rt.stage.ranks[1:]:
            send_command(self.rt.comm, cmd, None, peer, self.rt.inline)
        if self.rt.next_stage is not None:
            for dst in self.rt.next_stage.ranks:
                send_command(self.rt.comm, cmd, None, dst, self.rt.inline)
        self.rt.on_stop()
        self.rt.comm.flush()


# --- building a rank's part of a run -----------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunContext:
    """Everything a rank needs to execute a plan (picklable: it is sent to spawned ranks)."""

    plan: object
    """The ``exegpt.Plan`` (its stages already remapped to the model's layer count)."""
    layout: tuple[StageRanks, ...]
    model: str
    """Preset name, checkpoint folder or 'smollm2'."""
    dtype: str
    requests: tuple
    """``runner.requests.Request`` of the run, in order."""
    max_seq_len: int
    cache_len: int
    """KV positions per row: the plan's memory budget per sequence."""
    stop_at_eos: bool = False
    eos_id: int | None = None
    keep_tokens: bool = False
    seed: int = 0
    """Seed of random weights."""
    fault: Fault | None = None
    """A fault to inject (``runner.launch.Fault``)."""
    progress: bool = False
    log_decisions: bool = False
    batch_invariant: bool = False
    encoder_decoder: bool = False
    """A T5 model (``runner.t5``): one rank, each prefill the encoder and the decoder's first step."""
    latency_lens: tuple[int, ...] | None = None
    """Per request, the output length whose token time its record keeps (default: the plan's bound length)."""
    drift: object | None = None
    """``exegpt.replan.DriftOptions``: the driver of the group that finishes requests re-plans live on drift."""
    steady_stop: object | None = None
    """``exegpt.rules.SteadyStop``: end the run once its steady window holds what it asks (measurement runs)."""
    shared_weights: str | None = None
    """Processes sharing one device (Splitwiser): the file every rank maps its whole model from
    (``runner.colocate``)."""
    shared_ipc: int | None = None
    """Processes sharing one device by ``weights="ipc"``: the model comes from what the launcher shared
    (``runner.colocate_ipc.SharedModel``), and this is the plan's key to its hand-off slots."""

    @property
    def kept_lens(self):
        """The output length whose token time each request's record keeps: ``latency_lens``, else the bound's."""
        return self.plan.estimate.latency_len if self.latency_lens is None else self.latency_lens

    def stages_of(self, pipeline: str) -> list[StageRanks]:
        return [s for s in self.layout if s.pipeline == pipeline]

    def stage_of(self, rank: int) -> StageRanks:
        return next(s for s in self.layout if rank in s.ranks)


def make_tp_groups(layout: tuple[StageRanks, ...], rank: int) -> dict[int, object]:
    """One process group per TP stage, keyed by its leader, and for a Shift Parallelism stage (``Stage.sp`` > 1)
    its ``runner.ulysses.ShiftGroups`` (``rank``'s place in it); every rank creates them in the same order."""
    from .ulysses import make_groups

    groups = {}
    if dist.is_initialized():
        for s in layout:
            if s.stage.sp > 1:
                groups[s.leader] = make_groups(s.stage.sp, len(s.ranks) // s.stage.sp, s.leader, rank - s.leader)
            elif len(s.ranks) > 1:
                groups[s.leader] = dist.new_group(list(s.ranks))
    return groups


_LAST_BUILT: dict[tuple, tuple] = {}
"""The last unsharded stage model this process built, by everything its weights depend on. Processes that run
plan after plan (``run_plans``' one-rank plans, the profiler's calibration runs, the fidelity benchmark) build a
model once instead of once a plan: llama-3.2-1b's random weights took 25 s on one CPU thread (bf16)."""


def build_stage_model(ctx: RunContext, rank: int, device: torch.device, groups: dict, max_rows: int,
                      max_len: int):
    """Loads this rank's layers (and embedding/head), shards them for its TP group, allocates the cache (a new
    one, empty, also when the weights are the last run's).

    Returns (model, tokenizer or None).
    """
    from .tp import apply_tp
    from .weights import load_model

    sr = ctx.stage_of(rank)
    if ctx.shared_weights is not None or ctx.shared_ipc is not None:  # one copy shared by the device's processes
        from .colocate import load_shared, warm_up
        from .colocate_ipc import model_from_shared

        # A mapped file's weights go to this rank's device; the launcher's tensors stay on the device they are on.
        model, tok = load_shared(ctx.shared_weights) if ctx.shared_ipc is None else model_from_shared(take_shared())
        model.setup_cache(max_rows, max_len)
        warm_up(model, max_rows, max_len)
        return (model.to(device) if ctx.shared_ipc is None else model), tok
    key = (ctx.model, ctx.dtype, str(device), sr.layers, sr.first, sr.last, ctx.seed)
    if ctx.encoder_decoder:  # T5 loads whole; its cross-attention cache holds the longest prompt
        model, _, tok = load_model(ctx.model, DTYPES[ctx.dtype], device, seed=ctx.seed)
        model.setup_cache(max_rows, max_len, max_src_len=max((r.input_len for r in ctx.requests), default=1))
        return model.eval(), tok
    if len(sr.ranks) == 1 and key in _LAST_BUILT:
        model, tok = _LAST_BUILT[key]
        model.cache = None
    else:
        _LAST_BUILT.clear()  # at most one model held between runs
        model, _, tok = load_model(ctx.model, DTYPES[ctx.dtype], device, layers=sr.layers, embed=sr.first,
                                   head=sr.last, seed=ctx.seed)
        if sr.stage.sp > 1:
            from .ulysses import ShiftModel

            model = ShiftModel(model, groups[sr.leader])
        elif len(sr.ranks) > 1:
            apply_tp(model, rank - sr.leader, len(sr.ranks), groups[sr.leader])
        else:
            _LAST_BUILT[key] = (model, tok)
    model.eval()
    model.setup_cache(max_rows, max_len)
    return model, tok


def make_runtime(ctx: RunContext, rank: int, device: torch.device, groups: dict, max_rows: int, max_len: int,
                 driver: int, cls=StageRuntime, **kw) -> StageRuntime:
    """This rank's StageRuntime within its pipeline (``driver`` receives the last stage's tokens)."""
    sr = ctx.stage_of(rank)
    pipe = ctx.stages_of(sr.pipeline)
    prev = pipe[sr.index - 1] if sr.index > 0 else None
    nxt = pipe[sr.index + 1] if sr.index + 1 < len(pipe) else None
    model, tok = build_stage_model(ctx, rank, device, groups, max_rows, max_len)
    rt = cls(model, sr, prev, nxt, rank, Comm(device), driver, fault=ctx.fault, **kw)
    rt.tokenizer = tok
    return rt


def start_clock(device: torch.device) -> int:
    """The run's time origin (``perf_counter_ns`` of rank 0), agreed by every rank after a barrier.

    ``perf_counter`` is CLOCK_MONOTONIC on Linux, shared by the processes of one host; across hosts only
    rank-local durations are meaningful.
    """
    import time

    if not dist.is_initialized():
        return time.perf_counter_ns()
    dist.barrier()
    t = torch.tensor([time.perf_counter_ns()], dtype=torch.long, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


def eos_of(ctx: RunContext, tokenizer) -> int | None:
    """The EOS id: the one given, else the tokenizer's."""
    if ctx.eos_id is not None:
        return ctx.eos_id
    for name in ("eos_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return None
