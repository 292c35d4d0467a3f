"""The CPU decode kernels (``runner.cpu_kernels``): the eager model's numbers, the same bits alone or batched,
the fused decode attention equal to the eager core, and a clean fallback when they cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runner import cpu_kernels
from runner.generate import greedy_batch, greedy_reference
from runner.kv_cache import KVCache
from runner.model import Attention, ModelArgs
from runner.step import decode_step, rope_tables
from runner.weights import load_model

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler for the CPU kernels")

HALF_ULP = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8}


def within_rounding(out: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """``out`` is ``exact`` rounded once to its dtype, up to fp32 accumulation error."""
    tol = 2 * HALF_ULP[out.dtype] * exact.abs() + 64 * 2 ** -24 * magnitude
    return bool(((out.double() - exact).abs() <= tol).all())


@pytest.fixture
def kernels_off(monkeypatch):
    """A function that routes every call of the model to torch's ops."""
    def off():
        monkeypatch.setattr(cpu_kernels, "usable", lambda *a, **k: False)
    return off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 6, 13, 32])  # one weight stream up to 8 rows, register tiles beyond
def test_linear_is_one_rounding_of_the_exact_product_plus_bias_and_residual(dtype, rows):
    torch.manual_seed(rows)
    K, N = 77, 45  # not multiples of the vector width: every tail path runs
    x, w = torch.randn(rows, K).to(dtype), (torch.randn(N, K) / 8).to(dtype)
    b, r = torch.randn(N).to(dtype), torch.randn(rows, N).to(dtype)
    exact = x.double() @ w.double().T + b.double()
    magnitude = x.double().abs() @ w.double().abs().T + b.double().abs()
    y = cpu_kernels.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (rows, N) and within_rounding(y, exact, magnitude)
    # The residual is added to the rounded output and rounded again, as ``r + linear(x)`` is.
    assert torch.equal(cpu_kernels.linear(x, w, b, residual=r), r + y)
    # With the weight's panels (taken from 9 rows on): the same bits.
    panels = cpu_kernels.panels(w)
    assert torch.equal(cpu_kernels.linear(x, w, b, residual=r, weight_panels=panels), r + y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# chunks of 16, a last chunk of 8 and a scalar tail; whole chunks only; one chunk of 16; no whole chunk of 16
@pytest.mark.parametrize("K", [109, 96, 29, 13])
def test_kernels_give_a_row_the_same_bits_alone_or_batched(dtype, K):
    """Alone (one weight stream), in a batch of 5 (streamed), of 30 (register tiles of every shape, partial weight
    blocks) and of 10 and 30 on the weights' panels (register tiles of 6 rows and fewer, a partial panel): the same
    bits for every row."""
    torch.manual_seed(K)
    N = 40  # weight blocks of 12, 12, 12 and 4 rows; panels of 16, 16 and 8 outputs
    x = torch.randn(30, K).to(dtype)
    w1, w3 = (torch.randn(N, K) / 8).to(dtype), (torch.randn(N, K) / 8).to(dtype)
    p1, p3 = cpu_kernels.panels(w1), cpu_kernels.panels(w3)
    together = cpu_kernels.linear(x, w1)
    assert torch.equal(together, torch.cat([cpu_kernels.linear(x[i:i + 1], w1) for i in range(30)]))
    assert torch.equal(together, torch.cat([cpu_kernels.linear(x[i:i + 5], w1) for i in range(0, 30, 5)]))
    assert torch.equal(together, cpu_kernels.linear(x, w1, weight_panels=p1))
    assert torch.equal(together, torch.cat([cpu_kernels.linear(x[i:i + 10], w1, weight_panels=p1)
                                            for i in range(0, 30, 10)]))
    g = cpu_kernels.gated(x, w1, w3, "silu")
    assert torch.equal(g, torch.cat([cpu_kernels.gated(x[i:i + 1], w1, w3, "silu") for i in range(30)]))
    assert torch.equal(g, torch.cat([cpu_kernels.gated(x[i:i + 5], w1, w3, "silu") for i in range(0, 30, 5)]))
    assert torch.equal(g, cpu_kernels.gated(x, w1, w3, "silu", weight_panels=(p1, p3)))
    assert torch.equal(g, torch.cat([cpu_kernels.gated(x[i:i + 10], w1, w3, "silu", weight_panels=(p1, p3))
                                     for i in range(0, 30, 10)]))


def test_panels_hold_each_weight_once_k_major_in_blocks_of_16_outputs():
    """The layout csrc/panels.h documents, for K = 109: partial p takes k = p, p + 16, ..., p + 80, and for p < 8
    also 96 + p; then the tail 104..108. Outputs past N are zeros."""
    N, K = 20, 109
    w = torch.arange(N * K, dtype=torch.float32).reshape(N, K)
    p = cpu_kernels.panels(w).reshape(2, K, 16)
    order = [k for q in range(16) for k in [*range(q, 96, 16), *([96 + q] if q < 8 else [])]] + [*range(104, 109)]
    assert sorted(order) == list(range(K))
    assert torch.equal(p[0], w[:16, order].T)
    assert torch.equal(p[1, :, :4], w[16:, order].T) and not p[1, :, 4:].any()


def test_a_linear_layer_builds_its_panels_once_and_again_when_its_weight_changes():
    """Panels are built by the first call of more than STREAM_ROWS rows, reused, and rebuilt when the weight is
    written in place or replaced (as apply_tp does); panels of another shape are refused in one line."""
    from runner.linear import Linear

    torch.manual_seed(0)
    lin = Linear(40, 24, bias=True)
    x = torch.randn(12, 40)
    with torch.no_grad():
        lin(x[:3])
        assert "_panels" not in lin.__dict__  # streamed: no copy
        y = lin(x)
        first = lin.__dict__["_panels"][2]
        assert torch.equal(lin(x), y) and lin.__dict__["_panels"][2] is first
        lin.weight.mul_(2)
        assert torch.equal(lin(x), cpu_kernels.linear(x, lin.weight, lin.bias))
        assert lin.__dict__["_panels"][2] is not first
        lin.weight = torch.nn.Parameter(torch.randn(24, 40))
        assert torch.equal(lin(x), cpu_kernels.linear(x, lin.weight, lin.bias))
    with pytest.raises(ValueError, match="do not match a 24x40 torch.float32 weight"):
        cpu_kernels.linear(x, lin.weight, weight_panels=cpu_kernels.panels(torch.randn(24, 41)))


@pytest.mark.parametrize("act", ["silu", "relu", "gelu", "gelu_tanh"])
def test_gated_feed_forward_and_rms_norm_follow_the_eager_ops(act):
    from runner.model import ACTIVATIONS

    torch.manual_seed(1)
    x, w1, w3 = torch.randn(5, 64), torch.randn(48, 64) / 8, torch.randn(48, 64) / 8
    eager = ACTIVATIONS[act](F.linear(x, w1)) * F.linear(x, w3)
    assert torch.allclose(cpu_kernels.gated(x, w1, w3, act), eager, rtol=1e-5, atol=1e-6)
    nw = torch.randn(64)
    assert torch.allclose(cpu_kernels.rms_norm(x, nw, 1e-5), nw * F.rms_norm(x, (64,), eps=1e-5), rtol=1e-5,
                          atol=1e-6)
    xb, nwb = x.bfloat16(), nw.bfloat16()  # bf16: normalised in fp32, rounded, scaled, rounded: the eager bits
    assert torch.equal(cpu_kernels.rms_norm(xb, nwb, 1e-5), nwb * F.rms_norm(xb, (64,), eps=1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ["slice", "index"])
def test_fused_decode_attention_equals_the_eager_core(dtype, rows, monkeypatch):
    """RoPE, the cache write at each row's own position, grouped-head attention over its prefix: the fused kernel
    against the eager core (``project`` + ``core``), same inputs, same cache, same projections."""
    monkeypatch.setitem(cpu_kernels.MAX_ROWS, dtype, 64)  # the projections on the kernels, on any machine
    args = ModelArgs.from_name("smollm2-135m")
    torch.manual_seed(0)
    attn = Attention(args).to(dtype)
    rope = rope_tables(args.head_dim, 64, args.rope_base, dtype, torch.device("cpu"))
    pos = torch.tensor([10, 4, 7])
    cache_rows = torch.tensor([1, 2, 3]) if rows == "slice" else torch.tensor([3, 0, 2])
    x = torch.randn(3, 1, args.dim).to(dtype)

    def run():
        torch.manual_seed(1)
        cache = KVCache(1, 4, 64, args.n_kv_heads, args.head_dim, torch.float32)
        cache.k.normal_()
        cache.v.normal_()
        step = decode_step(pos, cache_rows, rope, torch.device("cpu"))
        with torch.no_grad():
            return attn.fused_decode(x, step, cache), attn(x, step, cache, 0), cache

    fused, out, cache = run()
    monkeypatch.setattr(Attention, "fused_decode", lambda *a: False)
    eager, ref, ref_cache = run()
    assert fused and not eager
    if dtype == torch.bfloat16 and cpu_kernels._NATIVE_BF16:
        # torch's bf16 ops on native bf16 hardware (AMX, AVX512-BF16) round some products their own way: measured,
        # 1 of 1728 outputs one bf16 unit apart. The cache, written by the same kernels, is exact.
        assert torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v)
        ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        off = (out.float() - ref.float()).abs()
        assert (off <= ulp).all() and (off > 0).float().mean() < 0.01
    elif dtype == torch.bfloat16:  # every rounding matches the eager layer's
        assert torch.equal(out, ref) and torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v)
    else:
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(cache.k, ref_cache.k, rtol=1e-6, atol=1e-6) and torch.equal(cache.v, ref_cache.v)


@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 128])  # 24: the scalar loop; the others: 8-lane chunks
def test_fused_decode_attention_over_long_prefixes_equals_the_eager_core(head_dim, monkeypatch):
    """Every head size the vectorised core takes (and one it leaves to the scalar loop), prefixes of 1 to 77 keys:
    whole and partial sets of 8 keys, grouped heads, against the eager core in fp32."""
    args = ModelArgs(family="llama", n_layers=1, dim=4 * head_dim, n_heads=4, n_kv_heads=2, head_dim=head_dim,
                     ffn_dim=8, vocab_size=8, max_seq_len=128)
    torch.manual_seed(head_dim)
    attn = Attention(args)
    rope = rope_tables(head_dim, 128, args.rope_base, torch.float32, torch.device("cpu"))
    pos = torch.tensor([76, 0, 7, 8, 15, 16, 40])
    x = torch.randn(len(pos), 1, args.dim)

    def run():
        torch.manual_seed(1)
        cache = KVCache(1, len(pos), 128, args.n_kv_heads, head_dim, torch.float32)
        cache.k.normal_()
        cache.v.normal_()
        step = decode_step(pos, torch.arange(len(pos)), rope, torch.device("cpu"))
        with torch.no_grad():
            return attn.fused_decode(x, step, cache), attn(x, step, cache, 0)

    fused, out = run()
    monkeypatch.setattr(Attention, "fused_decode", lambda *a: False)
    eager, ref = run()
    assert fused and not eager
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_greedy_tokens_with_kernels_equal_torch_ops_alone_and_batched(kernels_off):
    model, args, _ = load_model("small", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7)]
    model.setup_cache(3, 40)
    with_kernels = [greedy_reference(model, p, 12) for p in prompts]
    assert greedy_batch(model, prompts, 12, 3) == with_kernels  # joins, compaction, rows at mixed positions
    many = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in (4, 11, 6, 2, 9, 8, 3, 10, 5, 7)]
    model.setup_cache(12, 40)
    alone = [greedy_reference(model, p, 12) for p in many]
    budgets = [12] * 5 + [12, 5, 12, 8, 12, 3, 12, 10, 12, 7]  # rows retire mid-batch: joins and compaction
    # up to 12 rows at once (the weights' panels), down to 1 (streamed)
    assert greedy_batch(model, prompts + many, budgets, 12) == [t[:n] for t, n in zip(with_kernels + alone, budgets)]
    kernels_off()
    assert [greedy_reference(model, p, 12) for p in prompts] == with_kernels


def test_a_failed_build_warns_once_and_falls_back_to_torch(monkeypatch, tmp_path):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", bad)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setenv("EXEGPT_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="CPU kernels unavailable"):
        assert cpu_kernels.load() is None
    assert cpu_kernels.load() is None  # tried once, not again
    x = torch.randn(2, 8)
    assert not cpu_kernels.usable(x, torch.randn(4, 8))
    assert not list(tmp_path.glob("kernels/*.so"))  # no half-written library left behind


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setenv("EXEGPT_CPU_KERNELS", "0")
    assert cpu_kernels.load() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 12])  # weights streamed; on their panels
def test_a_fused_decode_layer_gives_the_bits_of_its_kernels_called_one_by_one(dtype, rows, monkeypatch):
    from runner.model import TransformerBlock

    # The kernels at these rows whatever the machine (with native bf16, torch's ops take bf16 batches above a row).
    monkeypatch.setitem(cpu_kernels.MAX_ROWS, dtype, 64)

    args = ModelArgs.from_name("smollm2-135m")
    torch.manual_seed(0)
    block = TransformerBlock(args).to(dtype)
    for p in block.parameters():  # norms away from 1, so a swapped weight would show
        p.data += 0.01 * torch.randn_like(p)
    rope = rope_tables(args.head_dim, 64, args.rope_base, dtype, torch.device("cpu"))
    x = torch.randn(rows, 1, args.dim).to(dtype)
    pos, cache_rows = torch.tensor([9, 3, 6] * (rows // 3)), torch.randperm(rows + 1)[:rows]

    def run():
        cache = KVCache(1, rows + 1, 64, args.n_kv_heads, args.head_dim, torch.float32)
        torch.manual_seed(1)
        cache.k.normal_()
        cache.v.normal_()
        step = decode_step(pos, cache_rows, rope, torch.device("cpu"))
        with torch.no_grad():
            return block.fused_decode(x, step, cache), block(x, step, cache, 0), cache

    fused, out, cache = run()
    monkeypatch.setattr(TransformerBlock, "fused_decode", lambda *a: False)
    _, ref, ref_cache = run()
    assert fused
    assert torch.equal(out, ref) and torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v)
