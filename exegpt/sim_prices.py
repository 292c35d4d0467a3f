"""How the simulated engine (``exegpt.sim``) prices a driver's actions: prefills as flow shops over the group's
stages, prompt chunks with their attention over the prefix their rows hold, WAA's encode batches and merges, and
decode iterations (the busiest stage against the slowest micro-batch's round trip). See ``exegpt.sim`` for the
rules; these are the methods of its ``SimEngine``."""

from __future__ import annotations

import dataclasses

import numpy as np

from .cost import CostModel
from .policies.base import DECODE, ENCODE, MAIN, Decode, Merge, Merged, Peek
from .policies.waa import HANDOFF_DEPTH
from .rules import split_even
from .stages import decode_times, encode_times, spans_ranks


class SimPrices:
    """The pricing half of ``exegpt.sim.SimEngine`` (its state: ``prob``, ``stages``, ``ledger``, the drivers'
    clocks)."""

    def _prompt_lens(self, rids, resume: bool = False) -> np.ndarray:
        """The prompts of ``rids`` (``resume``: with the tokens they generated but the last, recomputed after a
        preemption)."""
        return self.ledger.inp[rids] + (np.maximum(self.ledger.gen[rids] - 1, 0) if resume else 0)

    def _prompts_cost(self, lens) -> CostModel:
        """The cost model with the prompt side set to prompts of these lengths."""
        return dataclasses.replace(self.prob.cost, stats=self.prob.stats.for_prompts(np.asarray(lens), self.padded))

    def _encode_times(self, stages, lens, base: bool = False) -> list[float]:
        """Seconds of each of ``stages`` to encode prompts of ``lens`` tokens as one batch (``base``: Shift
        Parallelism's base mode)."""
        t = encode_times(self.prob, stages, len(lens), self._prompts_cost(lens), base)[0]
        return [float(np.ravel(x)[0]) for x in t]

    def _prefill(self, stages, rids: list[int], parts: int, t0: float, resume: bool = False, sp: bool = False
                 ) -> float:
        """``rids`` as ``parts`` pipelined micro-batches over ``stages`` from ``t0``; returns when the first tokens
        are in (``resume``: recomputed after a preemption, prompt and tokens but the last; no token)."""
        mbs = split_even(rids, parts)
        t_end = self._flow(stages, mbs, [self._encode_times(stages, self._prompt_lens(mb, resume), sp) for mb in mbs],
                           None if resume else mbs, t0)
        if not resume:
            self.ledger.tokens_at(rids, t_end)
        return t_end

    def _chunks(self, items: tuple[tuple[int, int, int], ...], parts: int, t0: float, sp: bool = False,
                new: set[int] = frozenset()) -> float:
        """Prompt chunks (request, start, length) as ``parts`` pipelined micro-batches from ``t0``: each stage's
        prefill of the chunks' own tokens, plus their attention over the prefixes their rows hold
        (``CostModel.prefix_attention``)."""
        stages, led = self.stages[MAIN], self.ledger
        mbs = split_even(list(items), parts)
        times = []
        for mb in mbs:
            t = self._encode_times(stages, [m for _, _, m in mb], sp)  # the chunks' own tokens
            slow = self.prob.slowdown if spans_ranks(stages) else 1.0
            # (queries, keys before them) of continued prompts, and of new ones starting from a cached prefix
            cost = self.prob.cost
            for prefix, price in (([(m, s) for r, s, m in mb if s > 0 and r not in new], cost.prefix_attention),
                                  ([(m, s) for r, s, m in mb if s > 0 and r in new], cost.cached_prefix_attention)):
                if prefix:
                    q, c = np.array(prefix, dtype=float).T
                    for i, st in enumerate(stages):
                        t[i] += st.n_layers * float(np.sum(price(st.tp, q, c)[0])) * slow
            times.append(t)
        firsts = [[r for r, s, _ in mb if r in new] for mb in mbs]
        t_end = self._flow(stages, mbs, times, firsts, t0)
        ends = [r for r, s, m in items if s + m == led.inp[r]]
        if ends:
            led.tokens_at(ends, t_end)
        return t_end

    def _flow(self, stages, mbs: list, times: list[list[float]], starting: list[list[int]] | None,
              t0: float) -> float:
        """Micro-batches ``mbs`` with per-stage seconds ``times`` through ``stages`` as a flow shop from ``t0``;
        ``starting[j]``: the requests whose prefill starts with micro-batch j. Returns when the last micro-batch's
        tokens are back."""
        p = len(stages)
        done = np.zeros(p)  # when each stage finished its latest micro-batch
        arrive = []
        for j, (mb, t) in enumerate(zip(mbs, times)):
            if starting is not None and starting[j]:
                self.ledger.started(starting[j], t0 + done[0])  # submitted when stage 0 finished the one before
            prev = 0.0
            for s in range(p):
                done[s] = max(done[s], prev) + t[s]
                prev = done[s]
            arrive.append(prev)
        if p > 1:
            ret = float(self.prob.cost.token_return(float(max(len(mb) for mb in mbs)))[0])
            arrive = [a + ret for a in arrive]
        return t0 + max(max(arrive), done[0])

    def _encode_batch(self, d, rids: tuple[int, ...]) -> None:
        """One WAA encode batch through the encode stages, from the driver's clock."""
        t = [x * self.coupling for x in self._encode_times(self.stages[ENCODE], self._prompt_lens(list(rids)))]
        if self.pricing is not None:  # the decode process computes through the batch unless it waits for one
            scale, kappa = self.pricing(ENCODE, len(rids))
            t = [x * scale for x in t]
            t[0] += kappa * t[0] * self._decoding()
        else:
            t[0] += self.extra[ENCODE] * min(t[0], self.last_dec)  # the decode group computing meanwhile
        t0 = max(self.free[0], d.t)
        self.ledger.started(rids, t0)
        prev = t0
        for i, ti in enumerate(t):
            self.free[i] = max(self.free[i], prev) + ti
            prev = self.free[i]
        self.busy.append((t0, float(self.free[0])))
        self.ledger.tokens_at(rids, prev)  # the prefill's token
        hand = float(np.ravel(self._prompts_cost(self._prompt_lens(list(rids))).kv_handoff(len(rids))[0])[0])
        self.batches.append((rids, t0, prev, hand))
        d.t = float(self.free[0])

    def _ready(self, k: int) -> float:
        """When handed-off batch ``k`` can be imported: its first tokens, and its KV where the hand-off is off the
        decode ranks' compute."""
        _, _, first, hand = self.batches[k]
        return first + (0.0 if self.on_compute else hand)

    def _merge(self, d, k: int) -> Merged:
        rids, t0, first, hand = self.batches[k]
        d.t = max(d.t, self._ready(k))  # the batch's metadata (and, off compute, its KV)
        if self.on_compute:
            d.t += hand * self.coupling  # the decode driver imports the batch's KV between iterations
        self.merges.append(d.t)
        return Merged(rids, first - t0)

    def _decoding(self) -> float:
        """1 while the decode driver has requests to decode (it is not waiting for a hand-off), else 0."""
        return float(any(d.group == DECODE and not d.finished and not isinstance(d.blocked, (Peek, Merge))
                         for d in self.drivers))

    def _encoding_during(self, a: float, b: float) -> float:
        return sum(max(0.0, min(b, e) - max(a, s0)) for s0, e in self.busy[-HANDOFF_DEPTH - 1:])

    def _decode(self, d, action: Decode) -> tuple[int, ...]:
        led, stages = self.ledger, self.stages[d.group]
        mbs = [np.asarray(mb, dtype=np.int64) for mb in action.micro_batches if mb]
        pos = [led.inp[mb] + led.gen[mb] for mb in mbs]  # each row's context
        steps = []
        for _ in range(action.max_iters):
            if action.drop_finished:
                keep = [~led.finished[mb] for mb in mbs]
                mbs = [mb[k] for mb, k in zip(mbs, keep) if k.any()]
                pos = [c[k] for c, k in zip(pos, keep) if k.any()]
            else:
                if all(led.finished[mb].all() for mb in mbs):
                    break
                keep = [~led.finished[mb] | (c < self.plan.workload.max_total_len) for mb, c in zip(mbs, pos)]
                mbs = [mb[k] for mb, k in zip(mbs, keep) if k.any()]
                pos = [c[k] for c, k in zip(pos, keep) if k.any()]
            if not mbs:
                break
            dt = self._step(stages, mbs, pos, action.sp)
            if d.group == DECODE and self.split:
                dt *= self.coupling
                if self.pricing is not None:
                    scale, kappa = self.pricing(DECODE, sum(len(mb) for mb in mbs))
                    dt *= scale
                    dt += kappa * self._encoding_during(d.t, d.t + dt)
                else:
                    dt += self.extra[DECODE] * self._encoding_during(d.t, d.t + dt)  # the encode group meanwhile
                self.last_dec = dt
            d.t += dt
            steps.append(sum(len(mb) for mb in mbs))
            live = np.concatenate(mbs)
            live = live[~led.finished[live]]
            if len(live):
                led.tokens_at(live, d.t)
            pos = [c + 1 for c in pos]
        return tuple(steps)

    def _step(self, stages, mbs: list[np.ndarray], pos: list[np.ndarray], sp: bool = False) -> float:
        """Seconds of one decode iteration of micro-batches ``mbs`` at contexts ``pos`` pipelined over ``stages``."""
        sizes = np.array([len(mb) for mb in mbs], dtype=float)
        ctx = np.array([c.max() if self.padded_decode else c.mean() for c in pos], dtype=float)
        per_stage, _ = decode_times(self.prob, stages, sizes, ctx, base=sp)
        t = np.stack([np.broadcast_to(x, sizes.shape) for x in per_stage])  # [stage, micro-batch]
        if len(stages) == 1:
            return float(t.sum())
        ret = np.asarray(self.prob.cost.token_return(sizes)[0], dtype=float)
        return float(max(t.sum(axis=1).max(), (t.sum(axis=0) + ret).max()))
