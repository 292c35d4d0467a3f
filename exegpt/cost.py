"""Per-stage times of an encode batch and of a decode step, composed from a Profile.

Pure functions of (profile, model shape, workload constants, stage, batch sizes), vectorised over
numpy arrays of batch sizes. Every function returns ``(seconds, ok)``: ``ok`` is False where a
lookup left the profiled range, and such a point must be treated as unusable.

Composition of one pipeline stage (tp devices, ``n`` decoder layers, ``n_enc`` encoder layers):

* encode of ``B`` prompts: ``n_enc`` encoder layers (T5) or ``n`` prefill layers, each
  dense_encode(B * E[S_in]) + E_S[attn_encode(B, S)] + 2 all-reduces of the activations (tp > 1);
  for decoder-only models the last stage adds lm_head(B) (the prefill emits the first token) and the first
  stage, led by the driver, the executor's own work engine_encode(B, prompt length); a stage that is not the
  last sends its activations onward;
  every stage pays the model's per-call step overhead.
* Shift Parallelism's base mode (a stage of ``tp`` = P devices with ``sp`` > 1, Ulysses over (SP, P / SP)): per
  layer, dense work on the rank's ceil(T / SP) tokens at TP = P / SP, attention over every token with the heads
  split P ways (the tables at tp = P), two all-to-alls over SP (the fused QKV, then the attention output) and
  two all-reduces over P / SP; once per forward an all-gather of the hidden states over SP. All-to-all and
  all-gather come from their own tables where the profile has them, else from the all-reduce table by the
  alpha-beta relations (a ring all-reduce of B bytes moves 2 (p-1)/p B per rank, an all-to-all of B (p-1)/p B, an
  all-gather of B from each rank (p-1) B): A2A(B) = AR(B / 2), AG(B) = AR(p B / 2).
* decode step of ``n`` rows at mean context ``ctx``: per layer dense_decode(n) + attn_decode(n, ctx)
  (+ attn_cross(n, E[S_in]) for T5) + 2 (3 for T5) all-reduces; lm_head(n) on the last stage and
  engine_decode(n, context) on the first (the driver leads it: commands, every row's token booked, row moves;
  measured on the CPU with two pipeline stages, the driver spent ~1 ms a 32-row micro-batch outside its
  layers); activations sent onward; the step overhead once.

Every computed term (layers, LM head, the executor's own work, the step overhead) is multiplied by
``slowdown``: the profile's measured slowdown of a rank of a multi-rank group (``Profile.rank_slowdown``, applied
by ``exegpt.simulate``; 1 for one rank and on GPUs); messages are profiled under load as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import ulysses_cost
from .models import ModelShape
from .profile import Kernel, Profile
from .workload import Workload

_MAX_BINS = 32  # input-length support compressed to this many bins for the attention expectation


@dataclass(frozen=True, eq=False)
class WorkloadStats:
    """The workload constants the cost model needs."""

    in_lengths: np.ndarray
    """Compressed input-length support (bin means) and their probabilities."""
    in_probs: np.ndarray
    in_mean: float
    in_max: int
    out_max: int
    k_lengths: np.ndarray
    """Decode iterations per query, k = output length - 1 (the prefill emits the first token)."""
    k_probs: np.ndarray
    decode_ctx: float
    """Mean context (tokens attended) of a row of a steady decode batch with early termination."""
    emax_n: np.ndarray
    """Batch sizes at which the expected maxima below are tabulated (interpolated in between)."""
    emax_in: np.ndarray
    """E[longest prompt among n]: the padded length of a prefill batch of n prompts."""
    emax_ctx: np.ndarray
    """E[longest context among n rows of a steady decode batch]: what a padded decode step attends."""

    def max_input(self, n) -> np.ndarray:
        return np.interp(np.maximum(np.asarray(n, float), 1.0), self.emax_n, self.emax_in)

    def max_input_pmf(self, n) -> np.ndarray:
        """P(longest of n prompts = ``in_lengths[i]``) ``[..., bins]`` (n need not be whole)."""
        return _max_pmf(self.in_probs, np.maximum(np.asarray(n, float), 1.0))

    def max_ctx(self, n) -> np.ndarray:
        return np.interp(np.maximum(np.asarray(n, float), 1.0), self.emax_n, self.emax_ctx)

    def prompt_len(self, n, padded: bool) -> np.ndarray:
        """The prompt length a prefill batch of ``n`` prompts is looked up at: its expected longest when the
        backend pads, else the mean."""
        return self.max_input(n) if padded else np.full(np.shape(n), self.in_mean)

    def for_prompts(self, lengths, padded: bool) -> WorkloadStats:
        """These constants with the prompt side set to one batch's own prompts of ``lengths`` tokens, so that the
        cost model times that batch (its tokens, each prompt's attention, its longest when ``padded``) instead of
        an expected one (the simulated engine, ``exegpt.sim``)."""
        lens = np.asarray(lengths, dtype=float)
        if lens.ndim != 1 or not len(lens):
            raise ValueError(f"lengths must be a non-empty list of prompt lengths, got {lengths!r}")
        top = float(lens.max())
        in_lengths, in_probs = (np.array([top]), np.ones(1)) if padded else (lens, np.full(len(lens), 1 / len(lens)))
        return dataclasses.replace(self, in_lengths=in_lengths, in_probs=in_probs, in_mean=float(lens.mean()),
                                   emax_in=np.full(len(self.emax_n), top))

    def context_len(self, n, padded: bool) -> np.ndarray:
        """The context a steady decode step of ``n`` rows is looked up at: its expected longest when the backend
        attends every row over it, else the mean (each row over its own prefix)."""
        return self.max_ctx(n) if padded else np.full(np.shape(n), self.decode_ctx)

    @classmethod
    def of(cls, w: Workload, first_token_in_encode: bool = True) -> WorkloadStats:
        """``first_token_in_encode``: decoder-only prefill emits the first output token, so a query of
        S output tokens needs S - 1 decode iterations; a T5 encoder does not (S iterations)."""
        lens, probs = w.input_len.lengths_array.astype(float), w.input_len.probs_array
        if len(lens) > _MAX_BINS:
            # Equal-probability bins; each bin is represented by its probability-weighted mean length.
            edges = np.searchsorted(np.cumsum(probs), np.linspace(0, 1, _MAX_BINS + 1)[1:-1])
            groups = np.split(np.arange(len(lens)), np.unique(edges))
            groups = [g for g in groups if len(g)]
            p = np.array([probs[g].sum() for g in groups])
            lens = np.array([np.dot(lens[g], probs[g]) / probs[g].sum() for g in groups])
            probs = p
        k = w.output_len.lengths_array - (1 if first_token_in_encode else 0)
        kp = w.output_len.probs_array
        live = k > 0
        ek, ek2 = (np.dot(k[live], kp[live]), np.dot(k[live].astype(float) ** 2, kp[live])) if live.any() else (0, 0)
        # A row of the decode batch belongs to a query with k iterations with probability ~ k P(k) and
        # has done j ~ U{0..k-1} of them: E[ctx] = E[S_in] + 1 + (E[k^2]/E[k] - 1) / 2.
        # T5 decoder self-attention sees only generated tokens (the prompt is cross-attended).
        base = w.input_len.mean() if first_token_in_encode else 0.0
        ctx = base + 1 + ((ek2 / ek - 1) / 2 if ek > 0 else 0.0)
        # The same row context as a distribution: j has P(j) = P(k > j) / E[k]; ctx = S_in + 1 + j.
        kmax = int(k.max()) if live.any() else 0
        pj = np.zeros(max(kmax, 1))
        if ek > 0:
            tail = 1 - np.cumsum(np.bincount(k[live], weights=kp[live], minlength=kmax + 1))  # P(k > j)
            pj = tail[:kmax] / ek
            pj = pj / pj.sum()
        p_in = np.zeros(w.input_len.max + 1)
        p_in[w.input_len.lengths_array] = w.input_len.probs_array
        if not first_token_in_encode:
            p_in = np.array([1.0])  # T5: self-attention over generated tokens only
        p_ctx = np.convolve(p_in, pj)  # index = S_in + j; ctx = index + 1
        n = np.unique(np.round(np.geomspace(1, 8192, 160)))
        return cls(lens, probs / probs.sum(), w.input_len.mean(), w.input_len.max, w.output_len.max, k, kp,
                   float(ctx), n, _expected_max(np.arange(len(p_in), dtype=float), p_in, n),
                   _expected_max(np.arange(len(p_ctx), dtype=float) + 1, p_ctx, n))


def _max_pmf(probs: np.ndarray, n) -> np.ndarray:
    """P(max of n iid draws = value i) ``[..., len(probs)]`` of a discrete distribution, F_i^n - F_{i-1}^n, for each
    (real) n ``[...]``."""
    cdf = np.clip(np.cumsum(probs), 0, 1)
    prev = np.concatenate([[0.0], cdf[:-1]])
    n = np.asarray(n, float)[..., None]
    return cdf ** n - prev ** n


def _expected_max(values: np.ndarray, probs: np.ndarray, n: np.ndarray) -> np.ndarray:
    """E[max of n iid draws] of a discrete distribution, for each (real) n."""
    return (values * _max_pmf(probs, n)).sum(axis=-1)


@dataclass(frozen=True, eq=False)
class CostModel:
    profile: Profile
    model: ModelShape
    stats: WorkloadStats
    per_unit: bool = False
    """Use the profile's batching envelope and unpadded batches: a lower bound for the search's box
    bounds, never an estimate."""
    slowdown: float = 1.0
    """Factor on every computed term (``Profile.slowdown``, for stages of a multi-rank group)."""

    COMPUTED = frozenset({Kernel.ATTN_ENCODE, Kernel.ATTN_DECODE, Kernel.ATTN_CROSS, Kernel.DENSE_ENCODE,
                          Kernel.DENSE_DECODE, Kernel.LM_HEAD, Kernel.ENGINE_ENCODE, Kernel.ENGINE_DECODE})

    @property
    def step_overhead_s(self) -> float:
        return self.profile.step_overhead_s * self.slowdown

    @property
    def padded(self) -> bool:
        """The backend pads a prefill batch to its longest prompt."""
        return self.profile.padded_batches and not self.per_unit

    @property
    def padded_decode(self) -> bool:
        """The backend attends every row of a decode step over the step's longest context."""
        return self.profile.padded_decode and not self.per_unit

    def _get(self, kernel: Kernel, tp: int, x, y=None):
        t, ok = self.profile.lookup(kernel, tp, x, y, per_unit=self.per_unit)
        return (t * self.slowdown if self.slowdown != 1.0 and kernel in self.COMPUTED else t), ok

    def _ar(self, tp: int, tokens) -> tuple[np.ndarray, np.ndarray]:
        if tp == 1:
            z = np.zeros(np.shape(tokens))
            return z, np.ones(np.shape(tokens), dtype=bool)
        return self._get(Kernel.ALLREDUCE, tp, self.model.activation_bytes(np.asarray(tokens, float)))

    def has_all_to_all(self, group: int) -> bool:
        """Whether all-to-alls in a group of ``group`` devices can be priced: their own table, or the all-reduce
        table they are derived from (``_a2a``)."""
        return self.profile.has(Kernel.ALLTOALL, group) or self.profile.has(Kernel.ALLREDUCE, group)

    def _a2a(self, group: int, nbytes) -> tuple[np.ndarray, np.ndarray]:
        """An all-to-all of ``nbytes`` sent by each rank of ``group`` (module docstring)."""
        nbytes = np.asarray(nbytes, dtype=float)
        if self.profile.has(Kernel.ALLTOALL, group):
            return self._get(Kernel.ALLTOALL, group, nbytes)
        return self._get(Kernel.ALLREDUCE, group, nbytes / 2)

    def _ag(self, group: int, nbytes) -> tuple[np.ndarray, np.ndarray]:
        """An all-gather of ``nbytes`` from each rank of ``group`` (module docstring)."""
        nbytes = np.asarray(nbytes, dtype=float)
        if self.profile.has(Kernel.ALLGATHER, group):
            return self._get(Kernel.ALLGATHER, group, nbytes)
        return self._get(Kernel.ALLREDUCE, group, group * nbytes / 2)

    def ulysses_comm(self, sp: int, tp: int, tokens) -> tuple[np.ndarray, np.ndarray]:
        """One base-mode layer's collectives for a step of ``tokens`` tokens on a stage of ``tp`` devices at
        SP degree ``sp``: the QKV and attention-output all-to-alls over SP, two all-reduces over tp / sp."""
        m, base = self.model, tp // sp
        per = np.ceil(np.maximum(np.asarray(tokens, dtype=float), 1.0) / sp)  # tokens per rank, padded
        if m.n_kv_heads % tp == 0:
            b = m.activation_dtype_bytes * m.hd / base
            qkv, ok1 = self._a2a(sp, per * (m.n_heads + 2 * m.n_kv_heads) * b)
            out, ok2 = self._a2a(sp, per * m.n_heads * b)
        else:  # whole GQA groups, uneven: the rank with the most heads (ceil) receives the most and sets the pace
            kv = sp * -(-m.n_kv_heads // tp) * m.activation_dtype_bytes * m.hd  # as if every SP rank held that many
            group = m.n_heads // m.n_kv_heads
            qkv, ok1 = self._a2a(sp, per * (group + 2) * kv)
            out, ok2 = self._a2a(sp, per * group * kv)
        ar, ok3 = self._ar(base, per)
        return qkv + out + 2 * ar, ok1 & ok2 & ok3

    def ulysses_gather(self, sp: int, tokens) -> tuple[np.ndarray, np.ndarray]:
        """The all-gather of every token's hidden state after a base-mode forward."""
        per = np.ceil(np.maximum(np.asarray(tokens, dtype=float), 1.0) / sp)
        return self._ag(sp, self.model.activation_bytes(per))

    def _hop(self, nbytes) -> tuple[np.ndarray, np.ndarray]:
        """One point-to-point hop of ``nbytes`` (free when the profile has no ``send_recv``: one device)."""
        nbytes = np.asarray(nbytes, dtype=float)
        if not self.profile.has(Kernel.SEND_RECV):
            return np.zeros(nbytes.shape), np.ones(nbytes.shape, dtype=bool)
        return self._get(Kernel.SEND_RECV, 1, nbytes)

    def _send(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        return self._hop(self.model.activation_bytes(np.asarray(tokens, float)))

    def encode_layer(self, tp: int, batch, sp: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """One prefill (or T5 encoder) layer for ``batch`` prompts drawn from the input distribution (``sp`` > 1:
        in Shift Parallelism's base mode, see the module docstring)."""
        b = np.asarray(batch, dtype=float)
        if sp > 1:  # Ulysses: the dense work on this rank's share of the real tokens, attention on P ranks' heads
            tokens = b * self.stats.in_mean
            attn, ok2 = self._prompt_attention(tp, b)
            if ulysses_cost.has_measured(self, sp, tp):  # the profiler timed the layer: its rest, measured
                return ulysses_cost.encode_rest(self, tp, tokens) + attn, ok2
            dense, ok1 = self._get(Kernel.DENSE_ENCODE, tp // sp, np.ceil(tokens / sp))
            comm, ok3 = self.ulysses_comm(sp, tp, tokens)
            return dense + attn + comm, ok1 & ok2 & ok3
        if self.padded:
            # Every prompt padded to the batch's longest: the expectation over the longest's distribution
            # (time grows faster than linearly with the padded length, so t(E[longest]) is too small).
            bb, s = np.broadcast_arrays(b[..., None], self.stats.in_lengths)  # [..., bins]
            attn, ok2 = self._get(Kernel.ATTN_ENCODE, tp, bb, s)
            dense, ok1 = self._get(Kernel.DENSE_ENCODE, tp, bb * s)
            ar, ok3 = self._ar(tp, bb * s)
            t = (dense + attn + 2 * ar) * self.stats.max_input_pmf(b)
            return t.sum(-1), (ok1 & ok2 & ok3).all(-1)
        tokens = b * self.stats.in_mean
        attn, ok2 = self._prompt_attention(tp, b)
        dense, ok1 = self._get(Kernel.DENSE_ENCODE, tp, tokens)
        ar, ok3 = self._ar(tp, tokens)
        return dense + attn + 2 * ar, ok1 & ok2 & ok3

    def _prompt_attention(self, tp: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One layer's attention of ``b`` prompts drawn from the input distribution: over their longest's
        distribution when the backend pads, else E_S[attn_encode(B, S)] over prompts of random lengths."""
        if self.padded:
            bb, s = np.broadcast_arrays(b[..., None], self.stats.in_lengths)
            attn, ok = self._get(Kernel.ATTN_ENCODE, tp, bb, s)
            return (attn * self.stats.max_input_pmf(b)).sum(-1), ok.all(-1)
        attn, ok = self._get(Kernel.ATTN_ENCODE, tp, b[..., None], self.stats.in_lengths)
        return attn @ self.stats.in_probs, ok.all(-1)

    def prefix_attention(self, tp: int, queries, ctx) -> tuple[np.ndarray, np.ndarray]:
        """One layer's attention of a prompt chunk's ``queries`` over the ``ctx`` keys its row held before it
        (chunked prefill): as many decode-attention rows over that context."""
        q = np.maximum(np.asarray(queries, dtype=float), 1.0)
        return self._get(Kernel.ATTN_DECODE, tp, q, np.broadcast_to(np.asarray(ctx, dtype=float), q.shape))

    def cached_prefix_attention(self, tp: int, queries, ctx) -> tuple[np.ndarray, np.ndarray]:
        """One layer's attention of a prompt's first chunk, ``queries`` tokens, over the ``ctx`` keys a prefix cache
        gave its row (``exegpt.radix``): the queries-by-keys part of the causal attention of a prompt of ``ctx +
        queries`` tokens (a prefill's kernel; the chunk's attention over itself is priced with its tokens)."""
        q = np.maximum(np.asarray(queries, dtype=float), 1.0)
        c = np.broadcast_to(np.asarray(ctx, dtype=float), q.shape)
        one = np.ones_like(q)
        full, ok1 = self._get(Kernel.ATTN_ENCODE, tp, one, c + q)
        head, ok2 = self._get(Kernel.ATTN_ENCODE, tp, one, np.maximum(c, 1.0))
        own, ok3 = self._get(Kernel.ATTN_ENCODE, tp, one, q)
        return np.maximum(full - head - own, 0.0), ok1 & ok2 & ok3

    def decode_layer(self, tp: int, rows, ctx: float | None = None, sp: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """One decoder layer, one decode step of ``rows`` rows attending ``ctx`` tokens (default: the
        steady decode batch's mean context, or its longest when the backend pads decode steps); ``sp`` > 1: in
        Shift Parallelism's base mode."""
        r = np.asarray(rows, dtype=float)
        if ctx is None:
            ctx = self.stats.context_len(r, self.padded_decode)
        if sp > 1:
            attn, ok2 = self._get(Kernel.ATTN_DECODE, tp, r, np.broadcast_to(ctx, r.shape))
            if ulysses_cost.has_measured(self, sp, tp):
                return ulysses_cost.decode_rest(self, tp, r) + attn, ok2
            dense, ok1 = self._get(Kernel.DENSE_DECODE, tp // sp, np.ceil(r / sp))
            comm, ok3 = self.ulysses_comm(sp, tp, r)
            return dense + attn + comm, ok1 & ok2 & ok3
        dense, ok1 = self._get(Kernel.DENSE_DECODE, tp, r)
        attn, ok2 = self._get(Kernel.ATTN_DECODE, tp, r, np.broadcast_to(ctx, r.shape))
        ar, ok3 = self._ar(tp, r)
        t, ok = dense + attn, ok1 & ok2 & ok3
        n_ar = 2
        if self.model.is_encoder_decoder:
            prompt = self.stats.prompt_len(r, self.padded)  # the encoder output, as padded by the prefill
            cross, ok4 = self._get(Kernel.ATTN_CROSS, tp, r, prompt)
            t, ok, n_ar = t + cross, ok & ok4, 3
        return t + n_ar * ar, ok

    def _engine(self, kernel: Kernel, rows, length) -> tuple[np.ndarray, np.ndarray]:
        """The executor's own work around a forward pass (driver side) and what isolated kernels miss, when the
        profile measured it: at ``rows`` rows of prompt (encode) or context (decode) ``length``, the length the
        kernels are looked up at (the batch's longest when the backend pads)."""
        if not self.profile.has(kernel):
            return np.zeros(np.shape(rows)), np.ones(np.shape(rows), dtype=bool)
        return self._get(kernel, 1, rows, np.broadcast_to(length, np.shape(rows)))

    def _head(self, rows) -> tuple[np.ndarray, np.ndarray]:
        return self._get(Kernel.LM_HEAD, 1, np.asarray(rows, dtype=float))

    def tp_command(self, rows, tokens) -> tuple[np.ndarray, np.ndarray]:
        """The driver's command to the other ranks of its own TP stage (the pipeline's first): one hop of the
        int64 row indices, lengths and request ids (3 per row) and token ids (``tokens``) that those ranks need
        before they can start, and so before the stage's first all-reduce completes."""
        return self._hop(8.0 * (3 * np.maximum(np.asarray(rows, dtype=float), 1.0) + np.asarray(tokens, dtype=float)))

    def stage_encode(self, tp: int, n_layers: int, n_enc_layers: int, last: bool, batch, first: bool = False,
                     sp: int = 1):
        """Seconds for one stage to encode ``batch`` prompts (see the module docstring). ``first``: the pipeline's
        first stage, which the driver leads: it pays the executor's own work (``engine_encode``), and with TP its
        other ranks get each command from the driver (``tp_command``). ``sp`` > 1: a whole-model stage in Shift
        Parallelism's base mode (its layers, then the all-gather)."""
        b = np.asarray(batch, dtype=float)
        if sp > 1:
            t, ok = self.stage_encode(tp, 0, 0, last, b, first)  # the head, the driver's work, the overhead
            lay, ok2 = self.encode_layer(tp, b, sp)
            g, ok3 = self.ulysses_gather(sp, b * self.stats.in_mean)
            return t + n_layers * lay + g, ok & ok2 & ok3
        if first:
            # The driver leads the first stage: its own work (engine_encode) and, with TP, each command's hop
            # to the stage's other ranks, before they can start.
            t, ok = self.stage_encode(tp, n_layers, n_enc_layers, last, b)
            if not self.model.is_encoder_decoder:
                e, ok3 = self._engine(Kernel.ENGINE_ENCODE, b, self.stats.prompt_len(b, self.padded))
                t, ok = t + e, ok & ok3
            if tp > 1:
                c, okc = self.tp_command(b, b * self.stats.in_mean)  # the prompts' own tokens, packed
                t, ok = t + c, ok & okc
            return t, ok
        if self.model.is_encoder_decoder:
            # T5: the encoder only (decoding starts from the start token); its output moves on to
            # the next stage or to the decoder stages.
            t, ok = self.encode_layer(tp, b)
            s, ok2 = self._send(b * self.stats.in_mean)
            return n_enc_layers * t + s + self.step_overhead_s, ok & ok2
        else:
            t, ok = self.encode_layer(tp, b)
            t = n_layers * t
        t = t + self.step_overhead_s
        if last:
            h, ok2 = self._head(b)
            return t + h, ok & ok2
        s, ok2 = self._send(b * self.stats.in_mean)
        return t + s, ok & ok2

    def stage_decode(self, tp: int, n_layers: int, last: bool, rows, ctx: float | None = None,
                     first: bool = False, sp: int = 1):
        """Seconds for one stage to run one decode step of ``rows`` rows (``first``, ``sp``: see
        ``stage_encode``)."""
        r = np.asarray(rows, dtype=float)
        if sp > 1:
            t, ok = self.stage_decode(tp, 0, last, r, ctx, first)
            lay, ok2 = self.decode_layer(tp, r, ctx, sp)
            g, ok3 = self.ulysses_gather(sp, r)
            return t + n_layers * lay + g, ok & ok2 & ok3
        if first:
            # The driver leads the first stage: its own work (engine_decode: commands, every row's token booked,
            # row moves) and, with TP, each command's hop to the stage's other ranks.
            t, ok = self.stage_decode(tp, n_layers, last, r, ctx)
            e, ok3 = self._engine(Kernel.ENGINE_DECODE, r, ctx if ctx is not None else
                                  self.stats.context_len(r, self.padded_decode))
            t, ok = t + e, ok & ok3
            if tp > 1:
                c, okc = self.tp_command(r, r)
                t, ok = t + c, ok & okc
            return t, ok
        t, ok = self.decode_layer(tp, r, ctx)
        t = n_layers * t + self.step_overhead_s
        if last:
            h, ok2 = self._head(r)
            return t + h, ok & ok2
        s, ok2 = self._send(r)
        return t + s, ok & ok2

    def token_return(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """The last stage's greedy tokens (one int64 per row) back to the pipeline's driver: one hop."""
        return self._hop(8.0 * np.maximum(np.asarray(rows, dtype=float), 1.0))

    def kv_handoff(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """WAA: seconds to move the KV cache of ``batch`` encoded prompts to the decode group."""
        b = np.asarray(batch, dtype=float)
        per_token = self.model.kv_bytes_per_token() * self.model.n_layers + \
            self.model.cross_kv_bytes_per_token() * self.model.n_layers
        if not self.profile.has(Kernel.KV_HANDOFF):
            return np.zeros(b.shape), np.ones(b.shape, dtype=bool)
        return self._get(Kernel.KV_HANDOFF, 1, b * self.stats.in_mean * per_token)
