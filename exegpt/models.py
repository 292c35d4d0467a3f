"""Model shapes: the numbers the cost and memory models need, for named models.

The runner builds its modules from the same shapes (``runner.model.ModelArgs.from_shape``),
so a name means one architecture everywhere in the project.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import ExeGPTError

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
"""fp8: FP8 (e4m3) weights and GEMM inputs (W8A8, as vLLM serves an FP8 checkpoint); the hidden states between
layers, and so the collectives' messages, stay bf16 (``activation_dtype_bytes``)."""


def even_shares(n: int, p: int) -> tuple[int, ...]:
    """``n`` items dealt to ``p`` ranks as evenly as they go, the larger shares first (``numpy.array_split``'s
    and ``torch.tensor_split``'s order)."""
    q, r = divmod(n, p)
    return (q + 1,) * r + (q,) * (p - r)


def kv_shares(n_kv_heads: int, p: int) -> tuple[int, ...]:
    """KV heads on each of ``p`` ranks when heads are sharded in whole GQA groups (a KV head and the query heads
    that read it): ``n_kv_heads / p`` each when ``p`` divides it, else one more on the first ranks (SmolLM2's 3 on
    2 ranks: 2 + 1). Needs 1 <= ``p`` <= ``n_kv_heads``."""
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= n_kv_heads:
        raise ExeGPTError(f"{p!r} ranks cannot each hold whole heads of {n_kv_heads} KV heads; expected 1 to "
                          f"{n_kv_heads}")
    return even_shares(n_kv_heads, p)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A transformer's shape. Decoder-only unless ``n_encoder_layers`` > 0 (T5)."""

    name: str
    family: str
    """'llama' (RMSNorm, RoPE, GQA, gated MLP), 'opt' (LayerNorm, learned positions, plain MLP), or 't5'."""
    n_layers: int
    """Decoder layers (all layers of a decoder-only model)."""
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    """Longest context (prompt + output) the model supports."""
    n_encoder_layers: int = 0
    """Encoder layers of an encoder-decoder model; 0 for decoder-only models."""
    head_dim: int = 0
    """Per-head width; 0 means dim // n_heads."""
    tied_embeddings: bool = False
    dtype: str = "fp16"
    """Serving precision: fp16, bf16 or fp32."""
    kv_dtype: str = ""
    """Precision of the KV cache when the backend keeps it wider than ``dtype`` (the built-in runner keeps fp32
    KV for half-precision models on a CPU); empty: ``dtype``. ``Problem`` takes it from the profile."""
    packed_dtype: str = ""
    """Precision of an extra, prepacked copy of every Linear weight the backend keeps (the built-in runner on a
    CPU); empty: none. ``Problem`` takes it from the profile; weight bytes count it."""
    panel_dtype: str = ""
    """Precision of a second extra copy of every Linear weight the backend keeps (the built-in runner's CPU kernels:
    the k-major panels of decode batches above 8 rows); empty: none. From the profile, counted like
    ``packed_dtype``."""

    def __post_init__(self):
        if self.family not in ("llama", "opt", "t5"):
            raise ExeGPTError(f"model family {self.family!r} unknown; expected llama, opt or t5")
        for f in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, f) < 1:
                raise ExeGPTError(f"{f}={getattr(self, f)!r} must be >= 1")
        if self.n_heads % self.n_kv_heads:
            raise ExeGPTError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim == 0 and self.dim % self.n_heads:
            raise ExeGPTError(f"n_heads={self.n_heads} must divide dim={self.dim} (or give head_dim)")
        if self.dtype not in DTYPE_BYTES:
            raise ExeGPTError(f"dtype {self.dtype!r} unknown; expected one of {', '.join(DTYPE_BYTES)}")
        for f in ("kv_dtype", "packed_dtype", "panel_dtype"):
            if getattr(self, f) and getattr(self, f) not in DTYPE_BYTES:
                raise ExeGPTError(f"{f} {getattr(self, f)!r} unknown; expected one of {', '.join(DTYPE_BYTES)}")

    # --- derived sizes ------------------------------------------------------------------------

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def is_encoder_decoder(self) -> bool:
        return self.n_encoder_layers > 0

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.kv_dtype or self.dtype]

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    def _attn_params(self) -> int:
        q_out = self.n_heads * self.hd
        kv_out = self.n_kv_heads * self.hd
        return self.dim * (q_out + 2 * kv_out) + q_out * self.dim

    def _mlp_params(self) -> int:
        return (3 if self.gated_mlp else 2) * self.dim * self.ffn_dim

    def encoder_layer_params(self) -> int:
        return self._attn_params() + self._mlp_params() + 2 * self.dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer (cross-attention included for T5)."""
        cross = self._attn_params() + self.dim if self.is_encoder_decoder else 0
        return self._attn_params() + self._mlp_params() + 2 * self.dim + cross

    def embedding_params(self) -> int:
        positions = self.max_seq_len * self.dim if self.family == "opt" else 0
        head = 0 if self.tied_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + positions + head

    def params(self) -> int:
        return (self.n_layers * self.layer_params() + self.n_encoder_layers * self.encoder_layer_params()
                + self.embedding_params())

    @property
    def copies_bytes_per_param(self) -> int:
        """Bytes of a Linear weight's parameter in the backend's extra copies (prepacked, panels; 0: none)."""
        return sum(DTYPE_BYTES[d] for d in (self.packed_dtype, self.panel_dtype) if d)

    @property
    def weight_bytes_per_param(self) -> int:
        """Bytes a Linear weight's parameter takes in memory: its own, plus its extra copies' if any."""
        return self.dtype_bytes + self.copies_bytes_per_param

    def layer_bytes(self, tp: int = 1) -> float:
        """Weight bytes of one decoder layer on one rank of a TP group of ``tp`` (extra copies included)."""
        return self.layer_params() * self.weight_bytes_per_param / tp

    def encoder_layer_bytes(self, tp: int = 1) -> float:
        return self.encoder_layer_params() * self.weight_bytes_per_param / tp

    def embedding_bytes(self) -> float:
        return self.embedding_params() * self.dtype_bytes

    def kv_bytes_per_token(self, tp: int = 1) -> float:
        """KV-cache bytes one token adds to one decoder layer, on the most loaded rank of a TP group of ``tp`` (whole
        GQA groups a rank: ``ceil(n_kv_heads / tp)`` KV heads)."""
        return float(2 * -(-self.n_kv_heads // tp) * self.hd * self.kv_dtype_bytes)

    def cross_kv_bytes_per_token(self, tp: int = 1) -> float:
        """T5: cross-attention K/V bytes one *input* token adds to one decoder layer (0 for decoder-only)."""
        return 2 * self.n_heads * self.hd * self.kv_dtype_bytes / tp if self.is_encoder_decoder else 0.0

    @property
    def activation_dtype_bytes(self) -> int:
        """Bytes of one element of the hidden states and attention tensors: bf16's for an FP8 model."""
        return 2 if self.dtype == "fp8" else self.dtype_bytes

    def activation_bytes(self, tokens: float) -> float:
        """Bytes of the hidden states of ``tokens`` tokens (a pipeline or all-reduce message)."""
        return tokens * self.dim * self.activation_dtype_bytes

    def valid_split(self, p: int) -> bool:
        """Whether ``p`` ranks can shard the heads in whole GQA groups (``kv_shares``): 1 <= ``p`` <= the KV
        heads, evenly or not. The degrees tensor and sequence parallelism run on."""
        return isinstance(p, int) and 1 <= p <= self.n_kv_heads

    def valid_tp(self, tp: int) -> bool:
        """TP shards whole heads: ``tp`` must divide both the query and the KV head counts."""
        return tp >= 1 and self.n_heads % tp == 0 and self.n_kv_heads % tp == 0

    def with_dtype(self, dtype: str) -> ModelShape:
        return replace(self, dtype=dtype)


def _s(name, family, n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab_size, max_seq_len, **kw):
    return ModelShape(name, family, n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab_size, max_seq_len, **kw)


# The paper's Table 1 models, common open models, and small presets for the built-in backend.
MODELS: dict[str, ModelShape] = {m.name: m for m in (
    _s("t5-11b", "t5", 24, 1024, 128, 128, 65536, 32128, 2048, n_encoder_layers=24, head_dim=128),
    _s("opt-13b", "opt", 40, 5120, 40, 40, 20480, 50272, 2048),
    _s("gpt3-39b", "opt", 48, 8192, 64, 64, 32768, 50257, 2048),
    _s("gpt3-101b", "opt", 80, 10240, 80, 80, 40960, 50257, 2048),
    _s("gpt3-175b", "opt", 96, 12288, 96, 96, 49152, 50257, 2048),
    _s("gpt3-341b", "opt", 120, 15360, 120, 120, 61440, 50257, 2048),
    _s("llama-2-7b", "llama", 32, 4096, 32, 32, 11008, 32000, 4096),
    _s("llama-2-13b", "llama", 40, 5120, 40, 40, 13824, 32000, 4096),
    _s("codellama-34b", "llama", 48, 8192, 64, 8, 22016, 32016, 16384),
    _s("llama-2-70b", "llama", 80, 8192, 64, 8, 28672, 32000, 4096),
    _s("llama-3.2-1b", "llama", 16, 2048, 32, 8, 8192, 128256, 8192, tied_embeddings=True),
    _s("smollm2-135m", "llama", 30, 576, 9, 3, 1536, 49152, 8192, tied_embeddings=True, dtype="bf16"),
    # Small presets that run on two CPU cores (fp32).
    _s("tiny", "llama", 2, 64, 4, 2, 256, 256, 512, dtype="fp32"),
    _s("tiny-opt", "opt", 2, 64, 4, 4, 256, 256, 512, dtype="fp32"),
    _s("tiny-t5", "t5", 2, 64, 4, 4, 256, 256, 512, n_encoder_layers=2, dtype="fp32"),
    _s("small", "llama", 4, 256, 8, 4, 1024, 2048, 1024, dtype="fp32"),
    _s("small-opt", "opt", 4, 256, 8, 8, 1024, 2048, 1024, dtype="fp32"),
)}


def get_model(name: str | ModelShape) -> ModelShape:
    """A named shape (exact, case-insensitive match) or the shape itself."""
    if isinstance(name, ModelShape):
        return name
    key = str(name).lower()
    if key not in MODELS:
        raise ExeGPTError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[key]
