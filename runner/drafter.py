"""Drafters for speculative decoding (``runner.pipeinfer``): they propose up to k tokens that continue a context,
stopping at the first one whose confidence is under the cutoff.

  * ``NgramDrafter`` (prompt lookup): the tokens that followed the latest earlier occurrence of the context's last
    N tokens; confidence: the share of the earlier occurrences followed by that token;
  * ``ModelDrafter``: a model's greedy tokens (the target's first layers with its head, or another model of the
    same vocabulary); confidence: the top-1 probability. It keeps its own KV cache of the context it last saw and
    rolls it back to the common prefix of the next one (a length reset).
"""

from __future__ import annotations

import numpy as np
import torch

from exegpt.errors import ExeGPTError


class NgramDrafter:
    def __init__(self, n: int, cutoff: float):
        self.n, self.cutoff = n, cutoff
        self.fed = 0

    def draft(self, ctx: list[int], k: int) -> list[int]:
        seq = list(ctx)
        out: list[int] = []
        while len(out) < k:
            tok, conf = self._next(np.asarray(seq, dtype=np.int64))
            if tok is None or conf < self.cutoff:
                break
            out.append(tok)
            seq.append(tok)
        return out

    def _next(self, seq: np.ndarray) -> tuple[int | None, float]:
        n = self.n
        if len(seq) <= n:
            return None, 0.0
        win = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # [len - n, n]: windows with a successor
        hits = np.nonzero((win == seq[-n:]).all(axis=1))[0]
        if not len(hits):
            return None, 0.0
        follow = seq[hits + n]
        tok = int(follow[-1])  # the latest occurrence's continuation
        return tok, float(np.mean(follow == tok))


class ModelDrafter:
    def __init__(self, model, cutoff: float, max_len: int):
        self.model, self.cutoff = model, cutoff
        model.setup_cache(1, max_len)
        self.seen: list[int] = []
        """Tokens whose KV the cache holds, positions 0, 1, ..."""
        self.fed = 0
        """Tokens fed to catch up with new contexts (for the cost model)."""

    @torch.inference_mode()
    def draft(self, ctx: list[int], k: int) -> list[int]:
        m, cache = self.model, self.model.cache
        p = 0
        for a, b in zip(self.seen, ctx):
            if a != b:
                break
            p += 1
        p = min(p, len(ctx) - 1)  # the last token is fed again for its logits
        if len(ctx) + k > cache.max_len:
            raise ExeGPTError(f"draft context of {len(ctx)} + {k} tokens exceeds the drafter's {cache.max_len}")
        cache.lengths[0] = p  # roll back to the common prefix
        ids = torch.tensor(ctx[p:], dtype=torch.long, device=cache.k.device)
        self.fed += len(ctx) - p
        logits = m.prefill(ids, [len(ctx) - p], [0], starts=None if p == 0 else [p])  # [1, vocab]
        self.seen = list(ctx)
        out: list[int] = []
        while True:
            probs = torch.softmax(logits[0].float(), dim=-1)
            conf, tok = probs.max(dim=-1)
            if float(conf) < self.cutoff:
                break
            out.append(int(tok))
            if len(out) >= k:
                break
            logits = m.decode(tok.view(1), [0])
            self.seen.append(int(tok))
            self.fed += 1
        return out
