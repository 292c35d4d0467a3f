"""Greedy decoding as small, separately compilable functions (gpt-fast's generate.py, for ragged batches).

``prefill`` and ``decode_step`` work on any model with the runner API (``Transformer`` or ``T5``): they take cache
rows and return the next token of each. ``greedy_reference`` decodes one request alone and is the ground truth
every schedule must reproduce; ``greedy_batch`` is a simple continuous-batching loop (joins + compaction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from runner.kv_cache import KVCache


def sample(logits: Tensor) -> Tensor:
    """Greedy choice ``[n]`` from logits ``[n, vocab]``."""
    return logits.argmax(dim=-1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def is_encoder_decoder(model: nn.Module) -> bool:
    return hasattr(model, "encode")


def prompt_logits(model: nn.Module, ids: Tensor, seq_lens: Tensor, rows, **kw) -> Tensor:
    """Runs packed prompts ``ids`` ``[T]`` of ``seq_lens`` (CPU ``[n]``) into cache ``rows``; the logits of each
    one's first generated token ``[n, vocab]`` (a pipeline stage without the head: its hidden states, as
    ``prefill`` returns them). Encoder-decoder models encode the prompts and start their decoders
    from ``decoder_start_id``; ``kw`` goes to a decoder-only model's ``prefill`` (``runner.ulysses``' ``sp``)."""
    if is_encoder_decoder(model):
        model.encode(ids, seq_lens, rows)
        start = torch.full((seq_lens.numel(),), model.decoder_start_id, dtype=torch.long, device=ids.device)
        return model.prefill(start, torch.ones_like(seq_lens), rows)
    return model.prefill(ids, seq_lens, rows, **kw)


def prefill(model: nn.Module, prompts: Sequence[Sequence[int]], rows: Sequence[int]) -> Tensor:
    """Runs prompts into cache ``rows`` and returns each one's first generated token ``[n]`` (``prompt_logits``)."""
    device = _device(model)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)  # [T]
    seq_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # [n]
    return sample(prompt_logits(model, ids, seq_lens, rows))


def decode_step(model: nn.Module, tokens: Tensor, rows: Sequence[int] | Tensor) -> Tensor:
    """One decode step of ``rows`` fed ``tokens`` ``[n]``; returns the next tokens ``[n]``."""
    return sample(model.decode(tokens, rows))


def make_decode_step(model: nn.Module, compile: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """``decode_step`` bound to ``model``, optionally ``torch.compile``d (off by default: CPU compile is slow to warm).

    Keep the returned callable on an object; modules and globals are never rebound.
    """
    def step(tokens: Tensor, rows: Tensor) -> Tensor:
        return decode_step(model, tokens, rows)

    if compile:
        return torch.compile(step, dynamic=True)
    return step


def _swap_cache(model: nn.Module, cache: KVCache | None) -> KVCache | None:
    old, model.cache = model.cache, cache
    return old


@torch.no_grad()
def greedy_reference(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                     eos_id: int | None = None) -> list[int]:
    """Decodes one request alone on a fresh one-row cache (the model's own cache is left untouched).

    Returns:
        the generated token ids, at most ``max_new_tokens``, ending with ``eos_id`` if it was produced.
    """
    saved = _swap_cache(model, None)
    try:
        if is_encoder_decoder(model):
            model.setup_cache(1, max_new_tokens + 1, max_src_len=len(prompt_ids))
        else:
            model.setup_cache(1, len(prompt_ids) + max_new_tokens)
        out: list[int] = []
        tok = prefill(model, [prompt_ids], [0])  # [1]
        while True:
            out.append(int(tok[0]))
            if len(out) >= max_new_tokens or (eos_id is not None and out[-1] == eos_id):
                return out
            tok = decode_step(model, tok, [0])
    finally:
        _swap_cache(model, saved)


@torch.no_grad()
def greedy_batch(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 max_rows: int, eos_id: int | None = None, step: Callable | None = None) -> list[list[int]]:
    """Continuous batching on the model's cache: admit prompts into free rows, decode, retire, compact.

    Requests join a running batch as soon as a row frees up, so rows decode at different positions. The cache must
    be set up (``model.setup_cache``) with ``max_rows`` rows and room for the longest request.

    Returns:
        the generated ids of each prompt, as ``greedy_reference`` would give them.
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    step = step or (lambda t, r: decode_step(model, t, r))
    device = _device(model)
    outs: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))
    running: list[int] = []  # request id of cache row i
    last: list[int] = []  # last token of row i
    model.cache.reset(range(model.cache.max_rows))
    while waiting or running:
        # Admit: new prompts prefill into the free rows behind the running ones.
        if waiting and len(running) < max_rows:
            new = waiting[: max_rows - len(running)]
            waiting = waiting[len(new):]
            first = prefill(model, [prompts[r] for r in new], range(len(running), len(running) + len(new)))
            running += new
            last += first.tolist()
            for r, t in zip(new, first.tolist()):
                outs[r].append(t)
        # Retire finished rows and compact the survivors to the front.
        done = [i for i, r in enumerate(running)
                if len(outs[r]) >= budgets[r] or (eos_id is not None and outs[r][-1] == eos_id)]
        if done:
            keep = [i for i in range(len(running)) if i not in done]
            model.cache.compact(keep)
            running, last = [running[i] for i in keep], [last[i] for i in keep]
            continue
        nxt = step(torch.tensor(last, device=device), torch.arange(len(running))).tolist()
        last = nxt
        for r, t in zip(running, nxt):
            outs[r].append(t)
    return outs
