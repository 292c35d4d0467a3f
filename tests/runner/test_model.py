"""Model construction and the cached prefill/decode path against the uncached forward (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from exegpt.errors import ExeGPTError
from exegpt.models import MODELS
from runner.generate import greedy_batch, greedy_reference
from runner.model import ModelArgs, Transformer


def test_from_name_uses_exegpt_shapes():
    for name, shape in MODELS.items():
        args = ModelArgs.from_name(name)
        assert (args.family, args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.ffn_dim) == (
            shape.family, shape.n_layers, shape.dim, shape.n_heads, shape.n_kv_heads, shape.ffn_dim)
        assert args.head_dim == shape.hd
    assert ModelArgs.from_name("tiny-opt").bias and not ModelArgs.from_name("tiny-opt").gated_ffn
    assert ModelArgs.from_name("smollm2-135m").rope_base == 100000.0


def test_unknown_preset_is_one_line_error():
    with pytest.raises(ExeGPTError, match="unknown model preset 'Tiny'") as e:
        ModelArgs.from_name("Tiny")  # exact match only
    assert "\n" not in str(e.value)


def test_bad_layer_range():
    with pytest.raises(ExeGPTError, match="layers"):
        Transformer(ModelArgs.from_name("tiny"), layers=(1, 5))


def test_cached_decode_equals_uncached_forward(decoder_model):
    model, args = decoder_model
    ids = torch.randint(0, args.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    full = model(ids)  # [3, 10, vocab]
    model.setup_cache(3, 16)
    lens = [4, 7, 2]
    logits = model.prefill(torch.cat([ids[i, :k] for i, k in enumerate(lens)]), lens, [0, 1, 2])
    for step in range(3):
        pos = [k + step for k in lens]
        torch.testing.assert_close(logits, full[torch.arange(3), torch.tensor(pos) - 1], atol=1e-5, rtol=1e-5)
        logits = model.decode(ids[torch.arange(3), torch.tensor(pos)], [0, 1, 2])


def test_prefill_returns_hidden_without_head(make_model):
    stage, args = make_model("tiny", head=False)
    stage.setup_cache(2, 8)
    h = stage.prefill(torch.arange(5), [3, 2], [0, 1])
    assert h.shape == (5, args.dim) and stage.cache.lengths[:2].tolist() == [3, 2]
    assert stage.decode(torch.tensor([1, 2]), [0, 1]).shape == (2, args.dim)


def test_setup_cache_is_idempotent(make_model):
    model, _ = make_model("tiny")
    cache = model.setup_cache(2, 16)
    assert model.setup_cache(2, 16) is cache and model.setup_cache(3, 16) is not cache


def test_decode_past_cache_is_an_error(make_model):
    model, _ = make_model("tiny")
    model.setup_cache(1, 3)
    model.prefill(torch.tensor([1, 2, 3]), [3], [0])
    with pytest.raises(ExeGPTError, match="max_len"):
        model.decode(torch.tensor([1]), [0])


def test_t5_preset_batched_equals_reference(make_model, make_prompts):
    model, args = make_model("tiny-t5")
    prompts = make_prompts(4, args.vocab_size, seed=5)
    budgets = [5, 2, 7, 4]
    refs = [greedy_reference(model, p, b) for p, b in zip(prompts, budgets)]
    model.setup_cache(2, 8, max_src_len=12)  # joins and compaction of self- and cross-attention rows
    assert greedy_batch(model, prompts, budgets, max_rows=2) == refs


def test_eos_stops_reference(make_model):
    model, _ = make_model("tiny")
    out = greedy_reference(model, [1, 2, 3], 10)
    assert greedy_reference(model, [1, 2, 3], 10, eos_id=out[2]) == out[: out.index(out[2]) + 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_equals_cpu(make_model, make_prompts):
    cpu, args = make_model("tiny")
    gpu, _ = make_model("tiny", device="cuda")
    prompts = make_prompts(3, args.vocab_size, seed=6)
    refs = [greedy_reference(cpu, p, 6) for p in prompts]
    gpu.setup_cache(2, 32)
    assert greedy_batch(gpu, prompts, 6, max_rows=2) == refs


@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="needs oneDNN bf16")
def test_prepacked_bf16_linear_equals_plain_and_follows_weight_changes():
    import torch.nn.functional as F

    from runner.linear import Linear
    from runner.model import FeedForward
    from runner.tp import apply_tp

    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # same bits as the plain weight
        lin.weight.mul_(2)  # in place: the packed copy must be rebuilt
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        lin.weight = torch.nn.Parameter(torch.randn(96, 64, dtype=torch.bfloat16), requires_grad=False)
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    ffn = FeedForward(ModelArgs.from_name("tiny")).to(torch.bfloat16)
    h = torch.randn(2, 1, ffn.w1.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        fused = ffn(h)  # w1 and w3 as one prepacked GEMM
        plain = ffn.w2(ffn.act(F.linear(h, ffn.w1.weight)) * F.linear(h, ffn.w3.weight))
    assert torch.equal(fused, plain)
    model = Transformer(ModelArgs.from_name("tiny")).to(torch.bfloat16)
    ids = torch.randint(0, model.args.vocab_size, (1, 5))
    full = model(ids)  # packs every weight
    apply_tp(model, rank=1, world_size=2)  # replaces them with shards: packs must follow
    block = next(iter(model.layers.values()))
    xb = torch.randn(1, 1, model.args.dim, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(block.attention.wqkv(xb), F.linear(xb, block.attention.wqkv.weight))
    assert full.shape == (1, 5, model.args.vocab_size)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@needs_onednn
def test_packed_dtype_by_input():
    from runner.linear import _ONEDNN_BF16, _PACK_MIN_PARAMS, _packed_dtype

    big, small = torch.zeros(_PACK_MIN_PARAMS // 4, 4), torch.zeros(8, 4)
    one, two, eight = torch.zeros(1, 1, 4), torch.zeros(2, 1, 4), torch.zeros(8, 1, 4)
    with torch.no_grad():
        # fp32: packed from 8 rows on, for weights of at least _PACK_MIN_PARAMS (oneDNN's call overhead).
        assert _packed_dtype(eight, big) == torch.float32
        assert _packed_dtype(two, big) is None and _packed_dtype(eight, small) is None
        # Half weights: packed in bf16 where the CPU multiplies bf16 natively, else in fp32 from two rows on; a
        # single row streams the half weights through F.linear (half the bytes).
        w16 = small.bfloat16()
        assert _packed_dtype(two.bfloat16(), w16) == (torch.bfloat16 if _ONEDNN_BF16 else torch.float32)
        assert _packed_dtype(one.bfloat16(), w16) == (torch.bfloat16 if _ONEDNN_BF16 else None)
        assert _packed_dtype(two.half(), w16.half()) == torch.float32
        assert _packed_dtype(eight, big.bfloat16()) is None  # mixed dtypes: F.linear says what it thinks of them
    assert _packed_dtype(eight, big) is None  # autograd on: plain F.linear


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_linear_is_one_rounding_of_the_exact_product_and_follows_weight_changes(dtype):
    """The packed GEMM (fp32, or bf16 where native) equals the exact product rounded once to the model dtype, up to
    fp32 accumulation order, and its packed copy follows in-place writes and replaced weights (``apply_tp``)."""
    from runner.linear import Linear
    from runner.model import FeedForward

    torch.manual_seed(0)
    lin = Linear(512, 512, bias=True).to(dtype)  # big enough to be packed in fp32 too (``_PACK_MIN_PARAMS``)
    from runner import cpu_kernels

    x = torch.randn(max(cpu_kernels.MAX_ROWS.values()) + 8, 512, dtype=dtype)  # more rows than the kernels take

    def check(out, x, w, b=None):
        """Within one rounding to ``dtype`` (a relative half-ulp, doubled) plus fp32 accumulation error."""
        exact = x.double() @ w.double().T + (0 if b is None else b.double())
        magnitude = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
        half_ulp = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
        tol = 2 * half_ulp * exact.abs() + 64 * 2 ** -24 * magnitude
        assert out.dtype == dtype and ((out.double() - exact).abs() <= tol).all()

    with torch.no_grad():
        check(lin(x), x, lin.weight, lin.bias)
        assert "_prepacked" in lin.__dict__  # the packed path ran
        lin.weight.mul_(2)  # in place: the packed copy must be rebuilt
        check(lin(x), x, lin.weight, lin.bias)
        lin.weight = torch.nn.Parameter(-lin.weight.detach(), requires_grad=False)
        check(lin(x), x, lin.weight, lin.bias)
        ffn = FeedForward(ModelArgs.from_name("tiny")).to(dtype)
        h = torch.randn(32, 1, ffn.w1.in_features, dtype=dtype)
        h1, h3 = ffn.w1(h), ffn.w3(h)  # separately
        fused = ffn.w2(ffn.act(h1) * h3)
        assert torch.allclose(ffn(h).float(), fused.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("name", ["tiny", "tiny-opt"])
def test_chunked_prefill_equals_whole_prompts(name):
    """Prompts prefilled in chunks of 3-5 tokens (rows at different offsets in one call, RoPE or OPT's learned
    positions at the offset) give the greedy tokens of whole-prompt decoding."""
    from runner.weights import load_model

    m, _, _ = load_model(name)
    m.eval()
    prompts = [list(range(3, 16)), list(range(40, 47)), list(range(100, 120))]
    ref = [greedy_reference(m, p, 4) for p in prompts]
    m.setup_cache(4, 64)
    done, out = [0, 0, 0], {}
    while any(d < len(p) for d, p in zip(done, prompts)):
        idx = [i for i in range(3) if done[i] < len(prompts[i])]
        lens = [min(3 if i == 1 else 5, len(prompts[i]) - done[i]) for i in idx]
        ids = torch.tensor([t for i, n in zip(idx, lens) for t in prompts[i][done[i]:done[i] + n]])
        logits = m.prefill(ids, lens, idx, starts=[done[i] for i in idx])
        for j, (i, n) in enumerate(zip(idx, lens)):
            done[i] += n
            if done[i] == len(prompts[i]):
                out[i] = [int(logits[j].argmax())]
    for _ in range(3):
        logits = m.decode(torch.tensor([out[i][-1] for i in range(3)]), [0, 1, 2])
        for i in range(3):
            out[i].append(int(logits[i].argmax()))
    assert [out[i] for i in range(3)] == ref
    with pytest.raises(ExeGPTError, match="chunks must start where their rows end"):
        m.prefill(torch.tensor([1, 2]), [2], [0], starts=[3])
