"""Decoder-only transformers (Llama and OPT families) for the built-in backend, written like gpt-fast's model.py.

Llama: RMSNorm, rotary embeddings (HF's rotate_half convention), grouped KV heads, gated SiLU MLP, no biases.
OPT/GPT: LayerNorm, learned positions (index = position + 2, OPT's offset), plain ReLU MLP, biases everywhere.

Batches are ragged: ``prefill`` takes packed prompts and writes each to its own KV-cache row; ``decode`` advances
any set of rows by one token, each at its own position (``cache.lengths``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exegpt.errors import ExeGPTError
from exegpt.models import MODELS, ModelShape
from runner import cpu_kernels, numerics
from runner.kv_cache import KVCache, as_rows
from runner.linear import Linear, _bias, _packed_dtype, prepacked_linear
from runner.step import Step, apply_rope, chunk_step, decode_step, prefill_step, rope_tables
from runner.tp import all_reduce

OPT_POS_OFFSET = 2
"""OPT's learned position table starts with 2 unused rows: position p reads row p + 2."""

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_new" / "gelu_pytorch_tanh"
}

# Shape fields ModelShape does not carry, per preset (the real models' RoPE bases).
_PRESET_EXTRAS = {
    "smollm2-135m": dict(rope_base=100000.0),
    "llama-3.2-1b": dict(rope_base=500000.0),
}


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """Everything needed to build a model. After ``apply_tp`` the head and FFN counts are per rank."""

    family: str
    """'llama', 'opt' or 't5'."""
    n_layers: int
    """Decoder layers."""
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tied_embeddings: bool = False
    n_encoder_layers: int = 0
    """T5 only."""
    ffn_act: str = "silu"
    gated_ffn: bool = True
    """``w2(act(w1 x) * w3 x)`` when true, else ``w2(act(w1 x))``."""
    bias: bool = False
    """Biases on every Linear (OPT)."""
    rel_buckets: int = 32
    """T5 relative-position buckets."""
    rel_max_distance: int = 128
    output_scale: float = 1.0
    """Hidden states are scaled by this before the LM head (T5 with tied embeddings: dim ** -0.5)."""
    name: str = ""

    def __post_init__(self):
        if self.family not in ("llama", "opt", "t5"):
            raise ExeGPTError(f"model family {self.family!r} unknown; expected llama, opt or t5")
        if self.n_heads % self.n_kv_heads:
            raise ExeGPTError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.ffn_act not in ACTIVATIONS:
            raise ExeGPTError(f"activation {self.ffn_act!r} unsupported; expected one of {', '.join(ACTIVATIONS)}")

    @classmethod
    def from_shape(cls, shape: ModelShape) -> ModelArgs:
        """Args of a ``exegpt.models.ModelShape`` with the family's conventions (norms, activation, biases)."""
        family = dict(
            llama=dict(ffn_act="silu", gated_ffn=True, bias=False, norm_eps=1e-5),
            opt=dict(ffn_act="relu", gated_ffn=False, bias=True, norm_eps=1e-5),
            t5=dict(ffn_act="relu", gated_ffn=False, bias=False, norm_eps=1e-6,
                    output_scale=shape.dim ** -0.5 if shape.tied_embeddings else 1.0),
        )[shape.family]
        return cls(family=shape.family, n_layers=shape.n_layers, dim=shape.dim, n_heads=shape.n_heads,
                   n_kv_heads=shape.n_kv_heads, head_dim=shape.hd, ffn_dim=shape.ffn_dim, vocab_size=shape.vocab_size,
                   max_seq_len=shape.max_seq_len, tied_embeddings=shape.tied_embeddings,
                   n_encoder_layers=shape.n_encoder_layers, name=shape.name,
                   **(family | _PRESET_EXTRAS.get(shape.name, {})))

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        """Preset by exact name from ``exegpt.models.MODELS``."""
        if name not in MODELS:
            raise ExeGPTError(f"unknown model preset {name!r}; expected one of {', '.join(MODELS)}")
        return cls.from_shape(MODELS[name])


# --- building blocks ------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32, scale in the model dtype (as HF Llama / T5 do). NOTE: torch's rms_norm of a half
        # input computes in fp32 and rounds once, the same bits as ``rms_norm(x.float()).to(x.dtype)``, in one op.
        if cpu_kernels.usable(x, self.weight, any_rows=True):  # the same rounding, one call instead of ~8 ops
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x, self.weight.shape, eps=self.eps)


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype for a model of ``dtype`` on ``device``: the model's, except fp32 for a half-precision
    model on CPU.

    NOTE: torch's CPU attention kernels are 3-10x slower in bf16 than in fp32 (torch 2.13, AVX-512 BF16; batch 32
    over 512 keys: 1.43 ms vs 0.64 ms per layer). K and V are rounded to the model dtype by their projection, so
    the fp32 cache holds the same values; attention then runs in fp32 and its output is rounded back.
    """
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


def make_norm(args: ModelArgs) -> nn.Module:
    return nn.LayerNorm(args.dim, eps=args.norm_eps) if args.family == "opt" else RMSNorm(args.dim, args.norm_eps)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool = False,
           scale: float | None = None, gqa: bool | None = None) -> Tensor:
    """Attention of ``q`` ``[n, H, S, D]`` over ``k``, ``v`` ``[n, Hkv, L, D]`` (grouped heads); ``[n, H, S, D]``.

    ``gqa``: whether ``H != Hkv``, from the shapes when None (pass it from module constants under
    ``torch.compile(dynamic=True)``, where the shapes are symbolic).

    ``mask``: boolean (True = attend) or additive float, broadcastable to ``[n, H, S, L]``.
    """
    n, H, S, D = q.shape
    Hkv = k.shape[1]
    if S == 1 and n > 1 and q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu":
        # NOTE: torch's CPU flash kernel is ~5x slower than two grouped matmuls for half-precision decode at
        # batch 32 (measured on torch 2.13, AVX-512 BF16). Query heads of one KV head share it: h = kv * G + g.
        qg = q.reshape(n, Hkv, H // Hkv, D)  # [n, Hkv, G, D]
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * (scale if scale is not None else D ** -0.5)
        s = s.view(n, H, 1, -1)  # [n, H, 1, L]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        p = s.softmax(-1).to(q.dtype).view(n, Hkv, H // Hkv, -1)  # [n, Hkv, G, L]
        return torch.matmul(p, v).view(n, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=H != Hkv if gqa is None else gqa)


def attend_each_query(q: Tensor, k: Tensor, v: Tensor, step: Step, scale: float | None, gqa: bool,
                      dtype: torch.dtype) -> Tensor:
    """Causal self-attention one query of one row at a time, over exactly the keys up to its position, in the
    cache's ``dtype``: the same call for a position whether it is prefilled with its prompt, in a chunk or decoded,
    and whatever else is in the batch (``runner.numerics``). q ``[n, H, S, D]``, k and v ``[n, Hkv, kv, D]`` from
    position 0; returns ``[n, H, S, D]`` in q's dtype."""
    n, H, S, D = q.shape
    if step.decode:
        pos = step.pos.tolist() if step.pos_uniform is None else [step.pos_uniform] * n
        at = [[p] for p in pos]  # [row][query] -> position
    elif step.chunk is not None:
        _, starts, lens = step.chunk
        at = [[s + j for j in range(m)] for s, m in zip(starts, lens)]
    else:  # prompts from position 0 (padded queries past a prompt attend its padding: never read)
        at = [list(range(S))] * n
    out = q.new_zeros(n, H, S, D)
    for i, positions in enumerate(at):
        for j, p in enumerate(positions):
            qi, ki, vi = (t[i:i + 1, :, a:b].to(dtype) for t, a, b in ((q, j, j + 1), (k, 0, p + 1), (v, 0, p + 1)))
            out[i:i + 1, :, j:j + 1] = F.scaled_dot_product_attention(qi, ki, vi, scale=scale,
                                                                      enable_gqa=gqa).to(q.dtype)
    return out


def split_qkv(qkv: Tensor, step: Step, H: int, Hkv: int, D: int) -> tuple[Tensor, Tensor, Tensor]:
    """``wqkv``'s output ``[n, S, (H + 2 Hkv) D]`` -> q ``[n, H, S, D]``, k, v ``[n, Hkv, S, D]``, RoPE applied."""
    n, S, _ = qkv.shape
    qk = qkv[..., :(H + Hkv) * D].view(n, S, H + Hkv, D)  # q and k heads side by side
    if step.cos is not None:
        qk = apply_rope(qk, step.cos, step.sin)  # one rotation for q and k together
    v = qkv[..., (H + Hkv) * D:].view(n, S, Hkv, D)
    return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)  # [n, heads, S, D]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.bias)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=args.bias)
        self.scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1
        self.tp_group, self.tp_size = None, 1  # set by runner.tp.apply_tp

    def project(self, x: Tensor, step: Step) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[n, S, dim]`` -> q ``[n, H, S, D]``, k, v ``[n, Hkv, S, D]`` (RoPE applied), views of one GEMM."""
        return split_qkv(self.wqkv(x), step, self.n_heads, self.n_kv_heads, self.head_dim)

    def core(self, q: Tensor, k: Tensor, v: Tensor, step: Step, cache: KVCache | None, layer: int) -> Tensor:
        """The KV-cache update and the attention over the cache: ``[n, H, S, D]`` in q's dtype."""
        if step.decode:
            pos = step.pos if step.pos_uniform is None else step.pos_uniform
            k, v = cache.append(layer, step.rows, pos, k, v, step.kv_len)  # [n, Hkv, kv_len, D]
        elif step.chunk is not None:  # a prompt chunk after the row's cached prefix
            k, v = cache.write_chunks(layer, *step.chunk, k, v, step.kv_len)  # [n, Hkv, kv_len, D]
        elif cache is not None:  # (no cache: T5's encoder)
            cache.write_prompt(layer, step.rows, k, v)  # prompts start at position 0: attend to themselves
        gqa = self.n_heads != self.n_kv_heads
        if numerics.on() and (step.decode or step.chunk is not None or step.is_causal):
            return attend_each_query(q, k, v, step, self.scale, gqa, k.dtype if cache is None else cache.dtype)
        if k.dtype != q.dtype:  # a wider cache (``cache_dtype``): attend in its precision
            return attend(q.to(k.dtype), k, v, step.mask, step.is_causal, self.scale, gqa=gqa).to(q.dtype)
        return attend(q, k, v, step.mask, step.is_causal, self.scale, gqa=gqa)

    def out(self, y: Tensor, residual: Tensor | None = None) -> Tensor:
        """Attention output ``[n, H, S, D]`` (or ``[n, S, H D]``) -> ``wo`` -> all-reduce (-> + ``residual``) ->
        ``[n, S, dim]``."""
        if y.dim() == 4:
            n, H, S, D = y.shape
            y = y.transpose(1, 2).reshape(n, S, H * D)
        return _reduce_linear(self.wo, y, self.tp_group, self.tp_size, residual)

    def fused_decode(self, x: Tensor, step: Step, cache: KVCache | None) -> bool:
        """Whether this decode step runs on the CPU decode kernels: RoPE, cache write and attention in one call
        (``runner.cpu_kernels.attn_decode``). Needs a CPU fp32 cache and no mask beyond each row's prefix."""
        return (step.decode and cache is not None and cache.dtype == torch.float32 and cache.device.type == "cpu"
                and (step.mask is None or step.mask.dtype == torch.bool) and step.pos is not None
                and cpu_kernels.usable(x, any_rows=True) and not numerics.on())

    def decode_core(self, qkv: Tensor, step: Step, cache: KVCache, layer: int,
                    heads: tuple[int, int] | None = None) -> Tensor:
        """The fused decode core: ``wqkv``'s output ``[n, 1, (H + 2 Hkv) D]`` -> attention output ``[n, 1, H D]``
        (RoPE, cache write at each row's position, attention over its prefix). ``heads``: (H, Hkv) when ``qkv``
        holds other heads than this module's (``runner.ulysses``' share of them after its all-to-all)."""
        H, Hkv = heads or (self.n_heads, self.n_kv_heads)
        return cpu_kernels.attn_decode(qkv, step.cos, step.sin, step.pos, step.rows, cache.k[layer], cache.v[layer],
                                       H, Hkv, self.softmax_scale,
                                       step.kernel_args[0] if step.kernel_args is not None else None)

    @property
    def softmax_scale(self) -> float:
        """The scale of the attention scores: the model's own (T5: 1) or ``head_dim ** -0.5``."""
        return self.scale if self.scale is not None else self.head_dim ** -0.5

    def forward(self, x: Tensor, step: Step, cache: KVCache | None, layer: int, residual: Tensor | None = None
                ) -> Tensor:
        if self.fused_decode(x, step, cache):
            return self.out(self.decode_core(self.wqkv(x), step, cache, layer), residual)
        q, k, v = self.project(x, step)
        return self.out(self.core(q, k, v, step, cache, layer), residual)


def _reduce_linear(linear: Linear, x: Tensor, group, tp_size: int, residual: Tensor | None) -> Tensor:
    """``residual + all_reduce(linear(x))``; the residual goes into the Linear call when there is nothing to
    reduce (one rank)."""
    if tp_size == 1:
        return linear(x, residual)
    y = all_reduce(linear(x), group, tp_size)
    return y if residual is None else residual + y


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.act_name = args.ffn_act
        self.act = ACTIVATIONS[args.ffn_act]
        self.w1 = Linear(args.dim, args.ffn_dim, bias=args.bias)
        self.w3 = Linear(args.dim, args.ffn_dim, bias=args.bias) if args.gated_ffn else None
        self.w2 = Linear(args.ffn_dim, args.dim, bias=args.bias)
        self.tp_group, self.tp_size = None, 1

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``[..., dim]`` -> ``[..., dim]`` (all-reduced over the TP group), plus ``residual`` when given."""
        return _reduce_linear(self.w2, self.hidden(x), self.tp_group, self.tp_size, residual)

    def hidden(self, x: Tensor) -> Tensor:
        """The activations ``[..., ffn_dim]`` that ``w2`` reads."""
        if self.w3 is not None and cpu_kernels.usable(x, self.w1.weight, self.w3.weight, *_bias(self.w1, self.w3)):
            panels = None
            if cpu_kernels.wants_panels(x):
                panels = (cpu_kernels.cached_panels(self.w1, self.w1.weight),
                          cpu_kernels.cached_panels(self.w3, self.w3.weight))
            return cpu_kernels.gated(x, self.w1.weight, self.w3.weight, self.act_name, self.w1.bias, self.w3.bias,
                                     panels)
        dtype = _packed_dtype(x, self.w1.weight) if self.w3 is not None else None
        if dtype is not None:  # w1 and w3 as one GEMM
            h1, h3 = prepacked_linear(self, (self.w1, self.w3), x, dtype).chunk(2, dim=-1)  # [..., ffn_dim] each
            h = self.act(h1) * h3
        else:
            h = self.act(self.w1(x))  # [..., ffn_dim]
            if self.w3 is not None:
                h = h * self.w3(x)
        return h


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm, self.ffn_norm = make_norm(args), make_norm(args)
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, step: Step, cache: KVCache, layer: int) -> Tensor:
        if self.fused_decode(x, step, cache):
            return self.decode_fused(x, step, cache, layer)
        h = self.attention(self.attention_norm(x), step, cache, layer, residual=x)  # x + attention(norm(x))
        return self.feed_forward(self.ffn_norm(h), residual=h)

    def _kernel_pack(self) -> cpu_kernels.LayerPack | None:
        """This layer's weights packed for ``cpu_kernels.decode_layer_packed``, or None when the layer cannot run as
        one call (TP, LayerNorm, no gate, weights the kernels do not take). Gathered on first use and again when
        the weights moved or the TP degree changed (keyed by wqkv's storage, dtype and the TP degrees)."""
        a, f = self.attention, self.feed_forward
        w = a.wqkv.weight
        key = (w.data_ptr(), w.dtype, w.device, a.tp_size, f.tp_size)
        cached = self.__dict__.get("_pack")
        if cached is not None and cached[0] == key:
            return cached[1]
        pack = None
        if (a.tp_size == 1 and f.tp_size == 1 and f.w3 is not None and isinstance(self.attention_norm, RMSNorm)
                and isinstance(self.ffn_norm, RMSNorm) and self.attention_norm.eps == self.ffn_norm.eps
                and cpu_kernels.usable(w, a.wo.weight, f.w1.weight, f.w3.weight, f.w2.weight,
                                       self.attention_norm.weight, self.ffn_norm.weight,
                                       *_bias(a.wqkv, a.wo, f.w1, f.w3, f.w2), any_rows=True)):
            pack = cpu_kernels.pack_layer(
                self.attention_norm.weight, w, a.wqkv.bias, a.wo.weight, a.wo.bias, self.ffn_norm.weight,
                f.w1.weight, f.w1.bias, f.w3.weight, f.w3.bias, f.w2.weight, f.w2.bias, f.act_name, a.n_heads,
                a.n_kv_heads, self.attention_norm.eps, a.softmax_scale)
        self.__dict__["_pack"] = (key, pack)
        return pack

    def fused_decode(self, x: Tensor, step: Step, cache: KVCache | None) -> bool:
        """Whether this decode step runs as one kernel call (``cpu_kernels.decode_layer``): the attention core is
        fused (``Attention.fused_decode``), one rank, RMSNorms and a gated feed-forward, and every Linear takes
        ``x``'s rows (``cpu_kernels.MAX_ROWS``)."""
        pack = self._kernel_pack()
        return (pack is not None and self.attention.fused_decode(x, step, cache)
                and cpu_kernels.usable(x, pack.alive[1]))

    def decode_fused(self, x: Tensor, step: Step, cache: KVCache, layer: int, attention: bool = True) -> Tensor:
        """``forward`` of a decode step in one kernel call: the same kernels in the same order, so the same bits
        (``attention=False``: all but the attention core, see ``cpu_kernels.decode_layer``)."""
        sargs = step.kernel_args or cpu_kernels.step_args(step.cos, step.sin, step.pos, step.rows)
        pack = self._kernel_pack()
        if pack.panels is None and cpu_kernels.wants_panels(x):
            a, f = self.attention, self.feed_forward
            pack = cpu_kernels.with_panels(pack, *(cpu_kernels.cached_panels(lin, lin.weight)
                                                   for lin in (a.wqkv, a.wo, f.w1, f.w3, f.w2)))
            self.__dict__["_pack"] = (self.__dict__["_pack"][0], pack)
        return cpu_kernels.decode_layer_packed(x, pack, sargs[0], cache.k, cache.v, layer, attention)


# --- the model ------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """Decoder layers ``[a, b)`` of a llama/opt model, optionally with the embedding and the norm + LM head.

    A pipeline stage is one such module. Layer ``i`` is ``self.layers[str(i)]`` (its global index), so state-dict
    names and random seeds are per global layer.
    """

    def __init__(self, args: ModelArgs, layers: tuple[int, int] | None = None, embed: bool = True,
                 head: bool = True):
        super().__init__()
        if args.family not in ("llama", "opt"):
            raise ExeGPTError(f"Transformer builds llama/opt models; use runner.t5.T5 for family {args.family!r}")
        a, b = layers if layers is not None else (0, args.n_layers)
        if not 0 <= a <= b <= args.n_layers:
            raise ExeGPTError(f"layers={layers!r} must satisfy 0 <= a <= b <= n_layers={args.n_layers}")
        self.args, self.layer_range = args, (a, b)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim) if embed else None
        learned_pos = embed and args.family == "opt"
        self.pos_embeddings = nn.Embedding(args.max_seq_len + OPT_POS_OFFSET, args.dim) if learned_pos else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(a, b)})
        self.norm = make_norm(args) if head else None
        self.output = Linear(args.dim, args.vocab_size, bias=False) if head else None
        self.tie_weights()
        self.cache: KVCache | None = None
        self.rope: tuple[Tensor, Tensor] | None = None  # cos, sin [max_len, head_dim]
        self.tp_rank, self.tp_size = 0, 1

    def tie_weights(self) -> None:
        if self.args.tied_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @property
    def embed(self) -> bool:
        return self.tok_embeddings is not None

    @property
    def head(self) -> bool:
        return self.output is not None

    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        p = next(self.parameters(), None)
        return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))

    def setup_cache(self, max_rows: int, max_len: int) -> KVCache:
        """Preallocates the KV cache of this module's layers (idempotent for the same geometry).

        Args:
            max_rows: rows (concurrent requests) the cache holds.
            max_len: positions per row (prompt + generated tokens).
        """
        if max_len > self.args.max_seq_len:
            raise ExeGPTError(f"max_len={max_len} exceeds the model's max_seq_len={self.args.max_seq_len}")
        dtype, device = self._dtype_device()
        geometry = (len(self.layers), max_rows, max_len, self.args.n_kv_heads, self.args.head_dim,
                    cache_dtype(dtype, device), device)
        if self.cache is None or not self.cache.matches(*geometry):
            self.cache = KVCache(*geometry)
        if self.args.family == "llama" and (self.rope is None or self.rope[0].shape[0] < max_len
                                            or self.rope[0].device != device or self.rope[0].dtype != dtype):
            self.rope = rope_tables(self.args.head_dim, max_len, self.args.rope_base, dtype, device)
        return self.cache

    def _cache(self) -> KVCache:
        if self.cache is None:
            raise ExeGPTError("no KV cache: call model.setup_cache(max_rows, max_len) first")
        return self.cache

    def _run_layers(self, h: Tensor, step: Step, valid: Tensor | None = None) -> Tensor:
        """The layers over ``h`` ``[n, S, dim]`` (``valid``: the real tokens ``[n, S]``, None: all)."""
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, step, self.cache, i)
        return h

    def _logits(self, h: Tensor) -> Tensor:
        return self.output(self.norm(h)).float()  # [n, vocab]

    @torch.no_grad()
    def prefill(self, x: Tensor, seq_lens: Tensor | list[int], rows: Tensor | list[int],
                starts: Tensor | list[int] | None = None, layers=None) -> Tensor:
        """Runs packed prompts from position 0 and writes their KV to cache rows ``rows``.

        Args:
            x: token ids ``[T]`` (embed) or hidden ``[T, dim]``, prompts packed back to back.
            seq_lens: prompt lengths ``[n]``, summing to ``T``.
            rows: cache row of each prompt ``[n]``.
            starts: chunked prefill: the position ``[n]`` each row's chunk starts at, after the ``starts[i]``
                positions the row already holds (None: whole prompts from 0).
            layers: runs the layers instead of ``_run_layers``, with its arguments (``runner.ulysses``).
        Returns:
            hidden ``[T, dim]``, or (head) float32 logits of each prompt's last token ``[n, vocab]``.
        """
        seq_lens = as_rows(seq_lens)
        starts = None if starts is None else as_rows(starts)
        h, valid = self._prefill(x, seq_lens, as_rows(rows), starts, layers)  # [n, S, dim], [n, S]
        if self.head:
            n, device = h.shape[0], h.device
            return self._logits(h[torch.arange(n, device=device), (seq_lens - 1).to(device)])
        return h.reshape(-1, h.shape[-1]) if valid is None else h[valid]  # [T, dim]

    def _prefill(self, x: Tensor, seq_lens: Tensor, rows: Tensor, starts: Tensor | None = None, layers=None
                 ) -> tuple[Tensor, Tensor | None]:
        """Layers over the padded prompt batch: hidden ``[n, S, dim]`` and the valid mask ``[n, S]`` (None: all)."""
        cache = self._cache()
        n, S = seq_lens.numel(), int(seq_lens.max())
        ends = seq_lens if starts is None else starts + seq_lens
        if int(ends.max()) > cache.max_len or int(seq_lens.min()) < 1 or rows.numel() != n:
            raise ExeGPTError(f"prompt lengths must be in [1, {cache.max_len}] with one row each, "
                              f"got seq_lens={seq_lens.tolist()} rows={rows.tolist()}")
        if starts is not None and (starts.numel() != n or (cache.lengths[rows] != starts).any()):
            raise ExeGPTError(f"chunks must start where their rows end: starts={starts.tolist()}, rows hold "
                              f"{cache.lengths[rows].tolist()}")
        _, device = self._dtype_device()
        uniform = bool((seq_lens == S).all())
        valid = torch.arange(S)[None, :] < seq_lens[:, None]  # [n, S]
        valid_d = None if uniform else valid.to(device)
        if self.embed:
            ids = x.view(n, S) if uniform else x.new_zeros(n, S).index_put_((valid_d,), x)  # [n, S]
            h = self.tok_embeddings(ids)  # [n, S, dim]
            if self.pos_embeddings is not None:
                pos = torch.arange(S) if starts is None else starts[:, None] + torch.arange(S)[None, :]
                pos = pos.clamp(max=self.args.max_seq_len - 1)  # padded queries past the context: never read
                h = h + self.pos_embeddings(pos.to(device) + OPT_POS_OFFSET)
        else:
            h = x.view(n, S, -1) if uniform else x.new_zeros(n, S, x.shape[-1]).index_put_((valid_d,), x)
        step = prefill_step(seq_lens, rows, self.rope, device) if starts is None else \
            chunk_step(starts, seq_lens, rows, self.rope, device)
        h = (layers or self._run_layers)(h, step, valid_d)  # [n, S, dim]
        cache.lengths[rows] = ends
        return h, valid_d

    @torch.no_grad()
    def decode(self, x: Tensor, rows: Tensor | list[int], layers=None) -> Tensor:
        """Advances rows ``rows`` by one token each, at their own positions ``cache.lengths[rows]``.

        Args:
            x: token ids ``[n]`` (embed) or hidden ``[n, dim]``.
            rows: cache rows ``[n]``, distinct.
            layers: as in ``prefill``.
        Returns:
            hidden ``[n, dim]``, or (head) float32 logits ``[n, vocab]``.
        """
        cache = self._cache()
        rows = as_rows(rows)
        pos = cache.lengths[rows]  # [n] host
        kv_len = int(pos.max()) + 1
        if kv_len > cache.max_len:
            raise ExeGPTError(f"decode past the cache: position {kv_len - 1} >= max_len={cache.max_len}")
        _, device = self._dtype_device()
        pos_d = pos.to(device)
        if self.embed:
            h = self.tok_embeddings(x)[:, None]  # [n, 1, dim]
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(pos_d + OPT_POS_OFFSET)[:, None]
        else:
            h = x[:, None]  # [n, 1, dim]
        h = (layers or self._run_layers)(h, decode_step(pos, rows, self.rope, device, pos_d))[:, 0]  # [n, dim]
        cache.lengths[rows] += 1
        return self._logits(h) if self.head else h

    @torch.no_grad()
    def forward(self, ids: Tensor) -> Tensor:
        """Uncached full forward of ids ``[n, S]`` (or hidden ``[n, S, dim]``) to float32 logits ``[n, S, vocab]``
        (or hidden). A reference for tests; uses a temporary cache."""
        saved, self.cache = self.cache, None
        n, S = ids.shape[:2]
        try:
            self.setup_cache(n, S)
            h, _ = self._prefill(ids.reshape(n * S, *ids.shape[2:]), torch.full((n,), S), torch.arange(n))
            return self._logits(h) if self.head else h
        finally:
            self.cache = saved


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
