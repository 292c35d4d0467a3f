"""Weight loading: HF checkpoints match transformers' logits; SmolLM2 GGUF; seeded presets; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from exegpt.errors import ExeGPTError
from runner.generate import greedy_reference
from runner.weights import load_model

transformers = pytest.importorskip("transformers")

ATOL = RTOL = 1e-4


def _rerandomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Wider-than-default random weights, so layout mistakes (RoPE halves vs pairs, q/k/v order) show up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * x if "norm" in name else 0.1 * x)
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                p.copy_(x if "positions" not in name else 0.1 * x)
            else:
                p.copy_(x / p.shape[1] ** 0.5)


def _save(hf_model, path) -> str:
    hf_model.save_pretrained(path, safe_serialization=True)
    return str(path)


SEQS = [[3, 17, 42, 9, 100, 7, 64, 2, 11, 5, 90], [8, 1, 77, 77, 30, 31, 4]]
PROMPT_LENS = [6, 3]  # prefill this many tokens, then decode the rest one by one


def _compare_decoder_only(hf_model, folder: str) -> None:
    model, args, tok = load_model(folder)
    assert tok is None
    want = [hf_model(torch.tensor([s])).logits[0] for s in SEQS]  # [S, vocab] each
    model.setup_cache(2, 16)
    prompts = [s[:k] for s, k in zip(SEQS, PROMPT_LENS)]
    logits = model.prefill(torch.tensor([t for p in prompts for t in p]), PROMPT_LENS, [1, 0])  # ragged batch
    for i, k in enumerate(PROMPT_LENS):
        torch.testing.assert_close(logits[i], want[i][k - 1], atol=ATOL, rtol=RTOL)
    for step in range(4):  # decode both rows at their own positions
        pos = [k + step for k in PROMPT_LENS]
        logits = model.decode(torch.tensor([s[p] for s, p in zip(SEQS, pos)]), [1, 0])
        for i, p in enumerate(pos):
            torch.testing.assert_close(logits[i], want[i][p], atol=ATOL, rtol=RTOL)


def test_llama_logits_match_transformers(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _rerandomize(hf)
    _compare_decoder_only(hf, _save(hf, tmp_path))


def test_opt_logits_match_transformers(tmp_path):
    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                 attn_implementation="eager")
    hf = transformers.OPTForCausalLM(cfg).eval()
    _rerandomize(hf)
    _compare_decoder_only(hf, _save(hf, tmp_path))


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_t5_logits_match_transformers(tmp_path, ff):
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                feed_forward_proj=ff, decoder_start_token_id=0, attn_implementation="eager")
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    _rerandomize(hf)
    model, args, _ = load_model(_save(hf, tmp_path))
    assert args.family == "t5" and args.gated_ffn == (ff == "gated-gelu")
    src = [SEQS[0], SEQS[1][:5]]
    dec = [[0, 5, 9, 100, 3, 44], [0, 70, 2, 2, 61, 8]]
    want = [hf(input_ids=torch.tensor([s]), decoder_input_ids=torch.tensor([d])).logits[0] for s, d in zip(src, dec)]
    model.setup_cache(2, 8, max_src_len=16)
    model.encode(torch.tensor(src[0] + src[1]), [len(s) for s in src], [0, 1])
    logits = model.prefill(torch.tensor([0, 0]), [1, 1], [0, 1])
    torch.testing.assert_close(logits, torch.stack([w[0] for w in want]), atol=ATOL, rtol=RTOL)
    for p in range(1, 6):
        logits = model.decode(torch.tensor([d[p] for d in dec]), [0, 1])
        torch.testing.assert_close(logits, torch.stack([w[p] for w in want]), atol=ATOL, rtol=RTOL)


def test_t5_greedy_reference_matches_transformers_generate(tmp_path):
    cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, attn_implementation="eager")
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    _rerandomize(hf, seed=1)
    model, _, _ = load_model(_save(hf, tmp_path))
    want = hf.generate(torch.tensor([SEQS[0]]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, 1:].tolist()
    assert greedy_reference(model, SEQS[0], 8) == want


def test_hf_pipeline_stage_loads_only_its_layers(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _rerandomize(hf)
    folder = _save(hf, tmp_path)
    full, _, _ = load_model(folder)
    first, _, _ = load_model(folder, layers=(0, 1), head=False)
    stage, _, _ = load_model(folder, layers=(1, 3), embed=False)
    assert list(stage.layers) == ["1", "2"] and stage.tok_embeddings is None
    torch.testing.assert_close(stage.output.weight, full.tok_embeddings.weight)  # tied head without embedding
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    torch.testing.assert_close(stage(first(ids)), full(ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full(ids), hf(ids).logits, atol=ATOL, rtol=RTOL)


def test_seeded_presets_are_reproducible_per_layer():
    full, _, _ = load_model("tiny", seed=3)
    again, _, _ = load_model("tiny", seed=3)
    other, _, _ = load_model("tiny", seed=4)
    stage, _, _ = load_model("tiny", layers=(1, 2), embed=False, seed=3)
    for (name, p), q in zip(full.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(full.layers["0"].attention.wqkv.weight, other.layers["0"].attention.wqkv.weight)
    for name, p in stage.state_dict().items():
        assert torch.equal(p, full.state_dict()[name]), name


def test_bf16_preset():
    model, _, _ = load_model("tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = greedy_reference(model, [1, 2, 3], 4)
    assert len(out) == 4 and all(0 <= t < 256 for t in out)


def test_smollm2_greedy_continuation(smollm2):
    model, args, tok = smollm2
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    assert args.rope_base == 100000.0 and args.tied_embeddings
    ids = tok.encode("The capital of France is")
    assert tok.decode(ids) == "The capital of France is"
    out = greedy_reference(model, ids, 4)
    assert tok.decode(out).startswith(" Paris")
    assert greedy_reference(model, ids, 4) == out  # deterministic


@pytest.mark.parametrize("spec, match", [
    ("no-such-model", "unknown model"),
    ("tiny-llama", "unknown model"),  # exact match only
])
def test_unknown_spec(spec, match):
    with pytest.raises(ExeGPTError, match=match) as e:
        load_model(spec)
    assert "\n" not in str(e.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(ExeGPTError, match="config.json") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 64}))
    with pytest.raises(ExeGPTError, match="unsupported architecture") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)
