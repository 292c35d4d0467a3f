"""Drafters for speculative decoding (``runner.pipeinfer``): they propose up to k tokens that continue a context,
stopping at the first one whose confidence is under the cutoff; ``draft_tree`` adds up to ``width - 1`` siblings,
the drafter's next alternatives for the first token, each continued the same way (a tree that parts at its first
token: the alternatives' first tokens are not held to the cutoff, their continuations are). No tree without a
trunk: when the top choice is under the cutoff there is no draft.

  * ``NgramDrafter`` (prompt lookup): the tokens that followed the latest earlier occurrence of the context's last
    N tokens; confidence: the share of the earlier occurrences followed by that token. Its alternatives: the
    continuations of the latest earlier occurrences that differ from the trunk's first token (and from each
    other), the most recent first;
  * ``ModelDrafter``: a model's greedy tokens (the target's first layers with its head, or another model of the
    same vocabulary); confidence: the top-1 probability; its alternatives: its next most probable tokens. It keeps
    its own KV cache of the context it last saw and rolls it back to the common prefix of the next one (a length
    reset); a sibling's tokens cost one step each but the first (``fed`` counts the tokens it fed).
"""

from __future__ import annotations

import numpy as np
import torch

from exegpt.errors import ExeGPTError
from exegpt.speculation import common_prefix


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

    def draft_tree(self, ctx: list[int], k: int, width: int = 1) -> list[list[int]]:
        """Up to ``width`` branches of up to ``k`` tokens, the trunk (``draft``) first; [] when there is none."""
        trunk = self.draft(ctx, k)
        if not trunk:
            return []
        out = [trunk]
        for tok in self._alternatives(np.asarray(ctx, dtype=np.int64), trunk[0], width - 1):
            out.append([tok] + (self.draft(list(ctx) + [tok], k - 1) if k > 1 else []))
        return out

    def _hits(self, seq: np.ndarray) -> np.ndarray:
        """Where the last N tokens occurred before (window starts with a successor), oldest first."""
        n = self.n
        if len(seq) <= n:
            return np.zeros(0, dtype=np.int64)
        win = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # [len - n, n]: windows with a successor
        return np.nonzero((win == seq[-n:]).all(axis=1))[0]

    def _next(self, seq: np.ndarray) -> tuple[int | None, float]:
        hits = self._hits(seq)
        if not len(hits):
            return None, 0.0
        follow = seq[hits + self.n]
        tok = int(follow[-1])  # the latest occurrence's continuation
        return tok, float(np.mean(follow == tok))

    def _alternatives(self, seq: np.ndarray, trunk: int, m: int) -> list[int]:
        """Up to ``m`` continuations of the latest occurrences other than ``trunk``, distinct, the latest first."""
        out: list[int] = []
        if m <= 0:
            return out
        for tok in seq[self._hits(seq)[::-1] + self.n].tolist():
            if tok != trunk and tok not in out:
                out.append(int(tok))
                if len(out) == m:
                    break
        return out


class ModelDrafter:
    def __init__(self, model, cutoff: float, max_len: int):
        self.model, self.cutoff = model, cutoff
        model.setup_cache(1, max_len)
        self.seen: list[int] = []
        """Tokens whose KV the cache holds, positions 0, 1, ..."""
        self.fed = 0
        """Tokens fed to catch up with new contexts and to continue branches (for the cost model)."""

    def draft(self, ctx: list[int], k: int) -> list[int]:
        tree = self.draft_tree(ctx, k, 1)
        return tree[0] if tree else []

    @torch.inference_mode()
    def draft_tree(self, ctx: list[int], k: int, width: int = 1) -> list[list[int]]:
        """The greedy trunk and up to ``width - 1`` siblings from the next most probable first tokens, each
        continued greedily (siblings first, so the cache ends on the trunk, which the next context continues)."""
        m, cache = self.model, self.model.cache
        p = min(common_prefix(self.seen, ctx), len(ctx) - 1)  # the last token is fed again for its logits
        if len(ctx) + k > cache.max_len:
            raise ExeGPTError(f"draft context of {len(ctx)} + {k} tokens exceeds the drafter's {cache.max_len}")
        cache.lengths[0] = p  # roll back to the common prefix
        ids = torch.tensor(ctx[p:], dtype=torch.long, device=cache.k.device)
        self.fed += len(ctx) - p
        logits = m.prefill(ids, [len(ctx) - p], [0], starts=None if p == 0 else [p])  # [1, vocab]
        self.seen = list(ctx)
        probs = torch.softmax(logits[0].float(), dim=-1)
        conf, top = probs.topk(min(width, probs.numel()))
        if float(conf[0]) < self.cutoff:
            return []
        siblings = [self._greedy(len(ctx), int(t), k) for c, t in zip(conf[1:], top[1:]) if float(c) > 0]
        return [self._greedy(len(ctx), int(top[0]), k)] + siblings

    def _greedy(self, at: int, first: int, k: int) -> list[int]:
        """``first`` and its greedy continuation to ``k`` tokens, from the cache rolled back to ``at``."""
        m, cache = self.model, self.model.cache
        cache.lengths[0] = at
        self.seen = self.seen[:at]
        out = [first]
        while len(out) < k:
            logits = m.decode(torch.tensor([out[-1]], device=cache.k.device), [0])
            self.seen.append(out[-1])
            self.fed += 1
            probs = torch.softmax(logits[0].float(), dim=-1)
            conf, tok = probs.max(dim=-1)
            if float(conf) < self.cutoff:
                break
            out.append(int(tok))
        return out
