"""The weights and the KV hand-off slots that the processes of one device share through torch.multiprocessing
(``RunOptions.weights="ipc"``: a GPU's way, and an option on a CPU that runs the same protocol).

The launching process builds the model once on the device and allocates, per plan, ``HANDOFF_DEPTH`` hand-off
slots, each the largest prefill batch's KV ``[2, layers, rows, kv heads, positions, head dim]`` (``SharedModel``).
``runner.launch`` hands that object to every rank through a ``torch.multiprocessing`` queue, whose reductions pass
a CUDA tensor as a CUDA IPC handle (the rank maps the launcher's allocation; nothing is copied) and a CPU tensor as
a shared-memory segment (moved there once, here, by ``share_memory_``). A rank builds its model on the meta device
and assigns the shared tensors to it (``model_from_shared``): one copy of the weights on the device whatever the
number of processes. The launcher holds the tensors until every rank has exited: torch's CUDA IPC requires the
producer to keep a tensor alive while a consumer uses it, and a rank that dies does not take the weights along.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from exegpt.errors import ExeGPTError
from exegpt.policies import policy_module
from exegpt.policies.base import DECODE, ENCODE
from exegpt.policies.waa import HANDOFF_DEPTH

from .model import cache_dtype
from .weights import _build, _finish, load_model


@dataclass(frozen=True)
class SharedModel:
    """What the launcher shares with the ranks of one device (see the module's docstring)."""

    state: dict[str, Tensor]
    """The model's weights on the device (a tied head left out: ``model_from_shared`` ties it again)."""
    args: object
    """Its ``runner.model.ModelArgs``."""
    tokenizer: object
    rings: dict[int, tuple[Tensor, ...]]
    """Per plan (its index in ``run_plans``), the ``HANDOFF_DEPTH`` hand-off slots (``runner.handoff_ring``)."""


def handoff_geometry(ctx) -> tuple[int, int]:
    """(rows, positions) of a plan's largest handed-off batch: the prefill process's cache rows and the longest
    prompt of the run (the engine sizes its hand-off by the same)."""
    rows = policy_module(ctx.plan.schedule.policy).cache_rows(ctx.plan, ENCODE)
    return rows, max((r.input_len for r in ctx.requests), default=1)


def slot_shape(args, rows: int, positions: int) -> tuple[int, ...]:
    """One hand-off slot: the K and V of ``rows`` prompts of ``positions`` tokens, every layer and KV head."""
    return (2, args.n_layers, rows, args.n_kv_heads, positions, args.head_dim)


def device_bytes(ctxs: list, args, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(weights, all) bytes the shared run puts on ``device``: the weights once, every plan's hand-off slots,
    and the larger plan's two KV caches (a process holds one plan's at a time)."""
    meta = _build(args, None, True, True)  # on the meta device: no memory
    weights = sum(p.numel() for p in meta.parameters()) * dtype.itemsize
    item = cache_dtype(dtype, device).itemsize
    per_position = 2 * args.n_layers * args.n_kv_heads * args.head_dim * item
    slots = caches = 0
    for ctx in ctxs:
        rows, positions = handoff_geometry(ctx)
        slots += HANDOFF_DEPTH * rows * positions * per_position
        module = policy_module(ctx.plan.schedule.policy)
        cached = module.cache_rows(ctx.plan, ENCODE) + module.cache_rows(ctx.plan, DECODE)
        caches = max(caches, cached * ctx.cache_len * per_position)
    return weights, weights + slots + caches


def check_fits(ctxs: list, args, dtype: torch.dtype, device: torch.device) -> None:
    """One line when a GPU's free memory cannot hold what the shared run puts on it (``device_bytes``)."""
    if device.type != "cuda":
        return
    weights, need = device_bytes(ctxs, args, dtype, device)
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise ExeGPTError(f"splitwiser on {device}: the weights once ({weights / 2**30:.2f} GiB), the hand-off "
                          f"slots and both processes' KV caches need {need / 2**30:.2f} GiB; {free / 2**30:.2f} GiB "
                          f"of the device is free")


def build_shared(spec: str, dtype: torch.dtype, device: torch.device, seed: int, ctxs: dict[int, object]
                 ) -> SharedModel:
    """Builds model ``spec`` on ``device`` once, and the hand-off slots of each plan of ``ctxs`` (by index); on a
    CPU moves every tensor into shared memory, so that each rank maps the same pages."""
    model, args, tok = load_model(spec, dtype, device, seed=seed)
    state = {k: v for k, v in model.state_dict().items() if not (k == "output.weight" and args.tied_embeddings)}
    rings = {}
    for i, ctx in ctxs.items():
        shape = slot_shape(args, *handoff_geometry(ctx))
        rings[i] = tuple(torch.zeros(shape, dtype=cache_dtype(dtype, device), device=device)
                         for _ in range(HANDOFF_DEPTH))
    if device.type == "cpu":  # once here, rather than by the queue's feeder thread at the first hand-over
        for t in list(state.values()) + [s for ring in rings.values() for s in ring]:
            t.share_memory_()
    return SharedModel(state, args, tok, rings)


def model_from_shared(shared: SharedModel):
    """The whole model with the shared weights assigned to it, not copied; (model, tokenizer)."""
    args = shared.args
    model = _build(args, None, True, True)
    missing, unexpected = model.load_state_dict(shared.state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "output.weight" and args.tied_embeddings)]
    if missing or unexpected:
        raise ExeGPTError(f"shared weights do not match the model: missing={missing[:4]} unexpected={unexpected[:4]}")
    return _finish(model), shared.tokenizer
