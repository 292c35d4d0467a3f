"""The KV hand-off between a prefill process and a decode process of one device through shared slots
(``runner.colocate_ipc``): the KV stays on the device, and gloo carries only each batch's metadata and the
decode process's credits.

gloo moves CPU tensors only (its send and receive take no CUDA tensor), so the hand-off of ``runner.handoff`` would
take every batch's KV from the GPU to host memory and back. Here the launcher allocates ``HANDOFF_DEPTH`` slots
on the device that both processes map (CUDA IPC; shared memory on a CPU), and batch ``b`` goes through slot
``b % HANDOFF_DEPTH``:

  1. the prefill process copies the batch's KV from its cache into the slot, waits for its stream to finish the
     copy, and only then sends the batch's metadata (the other process's stream does not see this one's work:
     the metadata must not announce a slot still being written);
  2. the decode process, on the batch's IMPORT, copies the slot into its cache rows and waits for the copy before
     the engine sends the batch's credit;
  3. the prefill process starts batch ``b + HANDOFF_DEPTH`` only with the credit of batch ``b``
     (``exegpt.policies.waa.encoder``), so it never writes a slot the decode process has yet to read.

On a CPU every copy is complete when it returns; the same code runs there (``weights="ipc"``), so the protocol's
order and its slots are exercised without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from exegpt.errors import ExeGPTError

from .dist import TAG_META
from .handoff import DEPTH, EncodeStage
from .kv_cache import row_index
from .pipeline import PREFILL, Command, StageRuntime


def _whole_model(rt: StageRuntime) -> None:
    """The slots hold every layer and KV head: one rank a process, each holding the whole model."""
    if len(rt.stage.ranks) != 1 or rt.stage.layers != (0, rt.model.args.n_layers):
        raise ExeGPTError(f"the shared hand-off slots need one rank a process holding every layer; rank {rt.rank} "
                          f"holds layers {rt.stage.layers} with {len(rt.stage.ranks)} rank(s)")


def _settle(device: torch.device) -> None:
    """Waits until this process's work on ``device`` is done (the copies into or out of a slot)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class RingEncodeStage(EncodeStage):
    """The prefill process: each batch's KV into its slot, then its metadata (``emit``); no KV over gloo."""

    def __init__(self, *a, ring: tuple[Tensor, ...], **kw):
        super().__init__(*a, **kw)
        _whole_model(self)
        self.ring = ring

    def emit(self, cmd: Command, tokens: Tensor) -> None:
        if cmd.op == PREFILL:
            cache = self.model.cache
            n, L = cmd.rows.numel(), int(cmd.seq_lens.max())
            rows = row_index(cmd.rows, cache.device)
            slot = self.ring[cmd.batch % DEPTH]
            slot[0, :, :n, :, :L] = cache.k[:, rows, :, :L]
            slot[1, :, :n, :, :L] = cache.v[:, rows, :, :L]
            _settle(cache.device)  # the slot holds the batch before the metadata says so
        super().emit(cmd, tokens)

    def after_prefill(self, cmd: Command) -> None:
        """Nothing more: the KV went into the slot before the metadata (``emit``)."""

    def on_end(self, cmd: Command) -> None:
        """END, then a filler for each metadata receive the decode process keeps posted."""
        for i in range(DEPTH):
            meta = torch.zeros(4 + 3 * self.encode_batch, dtype=torch.long)
            meta[0] = -1 if i == 0 else -2
            self.comm.send([meta], self.driver, TAG_META)


class RingDecodeStage(StageRuntime):
    """The decode process: on IMPORT, a batch's KV from its slot into the cache rows."""

    def __init__(self, *a, encode_stages, encode_batch: int, prompt_len: int, ring: tuple[Tensor, ...], **kw):
        super().__init__(*a, **kw)
        _whole_model(self)
        self.encode_batch, self.ring = encode_batch, ring

    def post_next(self) -> None:
        """Nothing to post: a batch's metadata (the engine's receive) is all that travels."""

    def on_import(self, cmd: Command) -> None:
        cache = self.model.cache
        n, L = cmd.rows.numel(), int(cmd.seq_lens.max())
        rows = row_index(cmd.rows, cache.device)
        slot = self.ring[cmd.batch % DEPTH]
        cache.k[:, rows, :, :L] = slot[0, :, :n, :, :L]
        cache.v[:, rows, :, :L] = slot[1, :, :n, :, :L]
        cache.lengths[cmd.rows] = cmd.seq_lens
        _settle(cache.device)  # read before the credit lets the prefill process write the slot again
