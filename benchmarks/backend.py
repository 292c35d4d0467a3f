"""Decode throughput of the built-in backend vs transformers ``generate``, and step time vs the bandwidth bound.

One run, same weights on both sides: SmolLM2-135M (the packaged GGUF, bf16) and the ``small`` preset (fp32).
Batch 1, 8 and 32; prompts of PROMPT_LEN tokens, STEPS decode steps. The bandwidth bound of a decode step is
(weight bytes + KV bytes read) / the copy bandwidth of this machine, measured with a large tensor copy.

    python -m benchmarks.backend [--threads 2] [--steps 16]    (from the repository root)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from runner.generate import greedy_reference
from runner.model import ModelArgs, weight_bytes
from runner.weights import load_model

PROMPT_LEN = 16
BATCHES = (1, 8, 32)
WARMUP = 2
ROUNDS = 2


def copy_bandwidth(nbytes: int = 256 * 2**20, repeat: int = 5) -> float:
    """Bytes/s moved by a large tensor copy, counting read + write (STREAM's convention), median of ``repeat``."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def hf_llama(model: torch.nn.Module, args: ModelArgs, dtype: torch.dtype):
    """A transformers LlamaForCausalLM holding exactly our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                      max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
                      rope_theta=args.rope_base, tie_word_embeddings=args.tied_embeddings, dtype=dtype)
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output.weight}
    for i, block in model.layers.items():
        p = f"model.layers.{i}."
        wq, wk, wv = block.attention.wqkv.weight.split([q, kv, kv])
        sd |= {p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
               p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": block.attention.wo.weight,
               p + "mlp.gate_proj.weight": block.feed_forward.w1.weight,
               p + "mlp.up_proj.weight": block.feed_forward.w3.weight,
               p + "mlp.down_proj.weight": block.feed_forward.w2.weight,
               p + "input_layernorm.weight": block.attention_norm.weight,
               p + "post_attention_layernorm.weight": block.ffn_norm.weight}
    hf = LlamaForCausalLM(cfg).to(dtype)
    hf.load_state_dict(sd, strict=not args.tied_embeddings)
    return hf.eval()


def time_ours(model: torch.nn.Module, prompts: torch.Tensor, steps: int) -> float:
    """Median seconds of one decode step of the whole batch ``prompts`` ``[B, PROMPT_LEN]``."""
    B = prompts.shape[0]
    model.setup_cache(B, PROMPT_LEN + steps + WARMUP + 1)
    model.cache.reset(range(B))
    tok = model.prefill(prompts.reshape(-1), [PROMPT_LEN] * B, range(B)).argmax(-1)
    times = []
    for i in range(steps + WARMUP):
        t0 = time.perf_counter()
        tok = model.decode(tok, range(B)).argmax(-1)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def time_hf(hf, prompts: torch.Tensor, steps: int) -> float:
    """Seconds per decode step of transformers ``generate``: (t(1 + steps tokens) - t(1 token)) / steps."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(prompts))

    def run(n: int) -> float:
        t0 = time.perf_counter()
        hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    run(2)  # warm-up
    first = min(run(1) for _ in range(2))
    return max(run(1 + steps) - first, 1e-9) / steps


def bench(spec: str, dtype: torch.dtype, steps: int, bw: float) -> list[dict]:
    model, args, _ = load_model(spec, dtype=dtype)
    hf = hf_llama(model, args, dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (1, PROMPT_LEN), generator=g)
    # Same weights, same tokens: our greedy continuation equals transformers' (checked on 8 tokens).
    ours_tokens = greedy_reference(model, prompt[0].tolist(), 8)
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                eos_token_id=None, attention_mask=torch.ones_like(prompt))[0, PROMPT_LEN:].tolist()
    rows = []
    for B in BATCHES:
        prompts = torch.randint(0, args.vocab_size, (B, PROMPT_LEN), generator=g)
        # Alternate the two sides and keep each one's best round: other jobs on shared cores hit both alike.
        ours_s = hf_s = float("inf")
        for _ in range(ROUNDS):
            ours_s = min(ours_s, time_ours(model, prompts, steps))
            hf_s = min(hf_s, time_hf(hf, prompts, steps))
        ctx = PROMPT_LEN + steps // 2 + WARMUP  # mean context during the timed steps
        kv_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * ctx * B * model.cache.k.element_size()
        bound_s = (weight_bytes(model) + kv_bytes) / bw
        rows.append(dict(model=spec, dtype=str(dtype).removeprefix("torch."), batch=B, ours_tok_s=B / ours_s,
                         hf_tok_s=B / hf_s, speedup=hf_s / ours_s, step_ms=ours_s * 1e3, bound_ms=bound_s * 1e3,
                         of_bound=bound_s / ours_s, same_tokens=ours_tokens == hf_tokens))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    bw = copy_bandwidth()
    rows = bench("smollm2", torch.bfloat16, a.steps, bw) + bench("small", torch.float32, a.steps, bw)
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"torch {torch.__version__}, {a.threads} threads (OMP_WAIT_POLICY={wait}), copy bandwidth "
          f"{bw / 1e9:.1f} GB/s, prompt {PROMPT_LEN} tokens, {a.steps} decode steps")
    head = ("model", "dtype", "batch", "ours tok/s", "HF tok/s", "speedup", "step ms", "bound ms", "of bound",
            "same tokens")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['step_ms']:.2f} | {r['bound_ms']:.2f} | {r['of_bound']:.2f} | "
              f"{r['same_tokens']} |")
    print(f"(total {time.perf_counter() - t0:.0f} s; 'of bound' = bound ms / step ms, 1.0 = at the bandwidth bound)")


if __name__ == "__main__":
    main()
