"""The KV hand-off between an encode group and a decode group on disjoint ranks (WAA; any policy that splits
prefill and decode across devices).

After each prefill every encode rank sends the KV of its layers and heads to the decode ranks that hold them
(through ``torch.distributed``; on gloo this goes through host memory, as in the paper), and the last encode stage
sends the batch's metadata and first tokens to the decode driver. The KV of a layer and a range of KV heads goes
from the encode rank holding it to the decode rank needing it, so encode and decode stages may split layers and TP
heads differently.

The decode ranks keep ``DEPTH`` receives posted ahead of their imports, so a batch's messages land while they
decode. How many batches come is up to the encode driver (they follow the arrivals), so at END every encode rank
sends ``DEPTH`` filler messages on each of its hand-off channels (and the last stage ``DEPTH`` metadata messages,
the first of them END): every posted receive is matched, and the decode ranks wait for them before the next plan.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

from exegpt.policies.waa import HANDOFF_DEPTH

from .dist import TAG_KV, TAG_META, StageRanks
from .kv_cache import row_index
from .pipeline import Command, StageRuntime, _i64

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
        self.prompt_len = prompt_len
        self.pad = _handoff_pad(self.comm.device, encode_batch, prompt_len)
        self.n_kv_heads = self.model.args.n_kv_heads * len(self.stage.ranks)
        self.targets = [(r, sl) for dst in decode_stages for r in dst.ranks
                        if (sl := _kv_slice(self.stage, self.rank, dst, r, self.n_kv_heads)) is not None]

    def after_prefill(self, cmd: Command) -> None:
        cache = self.model.cache
        rows = row_index(cmd.rows, cache.device)
        L = int(cmd.seq_lens.max())
        a = self.stage.layers[0]
        h_base = (self.rank - self.stage.leader) * (self.n_kv_heads // len(self.stage.ranks))
        for r, ((l0, l1), (h0, h1)) in self.targets:
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
        """END, then fillers for the receives the decode ranks keep posted: per round, the metadata (END first)
        before the KV on every channel, as for a batch."""
        cache = self.model.cache
        for i in range(DEPTH):
            if self.next_stage is None and self.is_leader:
                meta = torch.zeros(4 + 3 * self.encode_batch, dtype=torch.long)
                meta[0] = -1 if i == 0 else -2
                self.comm.send([meta], self.driver, TAG_META)
            for r, ((l0, l1), (h0, h1)) in self.targets:
                n = 1 if self.pad is None else \
                    2 * (l1 - l0) * self.encode_batch * (h1 - h0) * self.prompt_len * cache.head_dim
                self.comm.send([torch.zeros(n, dtype=cache.dtype, device=self.comm.device)], r, TAG_KV)


class DecodeStage(StageRuntime):
    """A decode rank: receives the KV of the encoded batches from the encode ranks and imports it on IMPORT.

    The receives of the next ``DEPTH`` batches' KV stay posted, each into its own buffer of the largest batch
    (``encode_batch`` rows of ``prompt_len`` positions), so the hand-off lands while this rank decodes and IMPORT
    only copies it into the cache rows. This is the overlap the simulator assumes (the KV
    hand-off is off the decode path). gloo takes a shorter message into the buffer, so CPU ranks send exactly the
    batch's KV; NCCL needs equal counts, so on GPUs the encode ranks send the full, zero-padded buffer
    (``_handoff_pad``).
    """

    def __init__(self, *a, encode_stages: list[StageRanks], encode_batch: int, prompt_len: int, **kw):
        super().__init__(*a, **kw)
        cache = self.model.cache
        self.encode_batch = encode_batch
        self.n_kv_heads = cache.n_kv_heads * len(self.stage.ranks)
        self.sources = [(r, sl) for src in encode_stages for r in src.ranks
                        if (sl := _kv_slice(src, r, self.stage, self.rank, self.n_kv_heads)) is not None]
        self.free = deque([torch.empty(2 * (l1 - l0) * encode_batch * (h1 - h0) * prompt_len * cache.head_dim,
                                       dtype=cache.dtype, device=self.comm.device)
                           for _, ((l0, l1), (h0, h1)) in self.sources] for _ in range(DEPTH))
        self.pad = _handoff_pad(self.comm.device, encode_batch, prompt_len)
        self.posted: deque = deque()  # (works, buffers) of the batches posted, oldest first
        if not self.gets_meta:
            for _ in range(DEPTH):
                self.post_next()

    @property
    def gets_meta(self) -> bool:
        """The decode driver receives each batch's metadata too, and posts the KV receive right after the
        metadata's (``runner.engine``): NCCL ignores tags, so receives from one peer must be posted in the order
        it sends (metadata, then KV). The other decode ranks post their own, ``DEPTH`` ahead of their imports."""
        return self.rank == self.driver

    def post_next(self) -> None:
        """Posts the receives of the next encoded batch's KV (or the END fillers) into a free buffer set."""
        bufs = self.free.popleft()
        self.posted.append(([dist.irecv(buf, r, tag=TAG_KV) for (r, _), buf in zip(self.sources, bufs)], bufs))

    def on_stop(self) -> None:
        """Waits for the receives still posted: the encode ranks' END fillers."""
        while self.posted:
            for work in self.posted.popleft()[0]:
                work.wait()

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
    must equal the send's (messages on a GPU, ``device``); None where messages go through host memory (gloo),
    which takes a shorter message, also from ranks that compute on a GPU."""
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
