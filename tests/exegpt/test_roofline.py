"""Roofline profiles: shape of the tables, scaling laws, datasheet sanity, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from exegpt import DeviceSpec, ExeGPTError, Kernel, Profile, get_model
from exegpt.devices import GiB
from exegpt.roofline import Efficiency, layer_ops, resolve_tp, roofline_profile, size_grid


@pytest.fixture(scope="module")
def opt_a40():
    return roofline_profile("opt-13b", "A40")


def test_tables_positive_and_monotone(opt_a40):
    assert opt_a40.source == "roofline" and opt_a40.tp_degrees() == (1, 2, 4, 8)
    for t in opt_a40.tables:
        s = np.asarray(t.seconds)
        assert np.all(s > 0), t.kernel
        for axis in range(s.ndim):
            assert np.all(np.diff(s, axis=axis) >= 0), (t.kernel, t.tp, axis)
        # already its own envelope: the lookups return the modelled numbers
        np.testing.assert_allclose(t.envelope(), s, rtol=1e-9)


def test_grids_cover_the_requested_ranges(opt_a40):
    m = get_model("opt-13b")
    assert opt_a40.seconds(Kernel.ATTN_ENCODE, 1, 1024, m.max_seq_len) > 0
    for kernel in (Kernel.DENSE_DECODE, Kernel.LM_HEAD):
        assert opt_a40.seconds(kernel, 1, 65536) > 0 and opt_a40.max_coord(kernel) == np.inf
    assert opt_a40.seconds(Kernel.SEND_RECV, 1, 4 * GiB) > opt_a40.seconds(Kernel.SEND_RECV, 1, 1024)
    assert size_grid(1, 10) == (1, 2, 3, 4, 6, 8, 10)


def test_decode_attention_scales_with_context_and_batch(opt_a40):
    t = lambda b, c: opt_a40.seconds(Kernel.ATTN_DECODE, 1, b, c)  # noqa: E731
    assert 1.8 < t(64, 2048) / t(64, 1024) <= 2.0
    assert 1.8 < t(128, 1024) / t(64, 1024) <= 2.0
    # prefill attention grows faster than linearly in the sequence length (causal s^2)
    e = lambda s: opt_a40.seconds(Kernel.ATTN_ENCODE, 1, 16, s)  # noqa: E731
    assert e(2048) / e(1024) > 3.0


def test_tp2_roughly_halves_dense_work(opt_a40):
    for tokens in (1, 4096):
        ratio = opt_a40.seconds(Kernel.DENSE_DECODE, 2, tokens) / opt_a40.seconds(Kernel.DENSE_DECODE, 1, tokens)
        assert 0.45 < ratio < 0.6
    assert opt_a40.seconds(Kernel.ALLREDUCE, 8, 1e8) > opt_a40.seconds(Kernel.ALLREDUCE, 2, 1e8)


def test_decode_of_one_token_is_weight_bound_on_a40(opt_a40):
    m = get_model("opt-13b")
    floor = m.layer_bytes() / 696e9  # ~629 MB per layer / 696 GB/s = 0.90 ms
    assert 0.85e-3 < floor < 0.95e-3
    t = opt_a40.seconds(Kernel.DENSE_DECODE, 1, 1)
    assert floor / Efficiency().memory <= t < 1.15 * floor / Efficiency().memory


def test_encoder_decoder_has_cross_attention_and_distinct_layers():
    p = roofline_profile("t5-11b", "A100", tp_degrees=(1, 2))
    assert p.has(Kernel.ATTN_CROSS, 1) and p.has(Kernel.ATTN_CROSS, 2)
    assert not roofline_profile("llama-2-7b", "A100").has(Kernel.ATTN_CROSS)
    names_enc = {op.name for op in layer_ops(get_model("t5-11b"), 1, "encode")}
    names_dec = {op.name for op in layer_ops(get_model("t5-11b"), 1, "decode")}
    assert "cross_kv_proj" in names_enc and {"cross_q_proj", "cross_o_proj"} <= names_dec


def test_round_trip_and_provenance(opt_a40):
    back = Profile.from_json(opt_a40.to_json())
    assert back.source == "roofline" and back.tp_degrees() == opt_a40.tp_degrees()
    for kernel, tp, x, y in ((Kernel.DENSE_DECODE, 4, 300, None), (Kernel.ATTN_DECODE, 2, 37, 900),
                             (Kernel.ALLREDUCE, 8, 5e6, None)):
        assert back.seconds(kernel, tp, x, y) == pytest.approx(opt_a40.seconds(kernel, tp, x, y))
    assert back.provenance["efficiency"]["compute"] == Efficiency().compute
    assert roofline_profile("opt-13b", "A40") is opt_a40  # cached


def test_tp_degrees_follow_the_model():
    assert roofline_profile("smollm2-135m", "A100").tp_degrees() == (1,)  # 9 heads, 3 KV heads
    assert resolve_tp(get_model("llama-2-70b"), (8, 2)) == (1, 2, 8)
    with pytest.raises(ExeGPTError, match=r"tp=3 does not divide") as e:
        roofline_profile("opt-13b", "A40", tp_degrees=(3,))
    assert "\n" not in str(e.value)


def test_bad_input_is_one_line():
    for call in (lambda: roofline_profile("opt-13b", "B200"), lambda: roofline_profile("gpt-5", "A40"),
                 lambda: Efficiency(compute=1.5), lambda: roofline_profile("opt-13b", "A40", tp_degrees=(0,))):
        with pytest.raises(ExeGPTError) as e:
            call()
        assert "\n" not in str(e.value)


def test_custom_device_records_its_memory():
    dev = DeviceSpec("MyGPU", 24 * GiB, 100e12, 1e12, 50e9, 25e9)
    p = roofline_profile("llama-2-7b", dev, tp_degrees=(1,))
    assert p.device == "MyGPU" and p.device_memory_bytes == 24 * GiB


def test_fp8_prices_gemms_at_the_fp8_peak_and_the_rest_in_bf16():
    """An FP8 model (W8A8) on Hopper: its layers' GEMMs at twice the fp16 peak reading 1-byte weights; the KV
    cache (bf16), the attention and the hidden states as the fp16 model's; no FP8 tensor cores, one line."""
    import dataclasses

    from exegpt.models import get_model

    m16 = get_model("llama-2-70b")
    m8 = dataclasses.replace(m16.with_dtype("fp8"), kv_dtype="bf16")
    p16, p8 = roofline_profile(m16, "H200"), roofline_profile(m8, "H200")
    t16, _ = p16.lookup(Kernel.DENSE_ENCODE, 8, [1.0, 16384.0])  # weight-bound (kernel latencies weigh in), compute
    t8, _ = p8.lookup(Kernel.DENSE_ENCODE, 8, [1.0, 16384.0])
    assert t8[0] < 0.75 * t16[0] and 0.45 < t8[1] / t16[1] < 0.6
    a16, _ = p16.lookup(Kernel.ATTN_DECODE, 8, 16.0, 2048.0)
    a8, _ = p8.lookup(Kernel.ATTN_DECODE, 8, 16.0, 2048.0)
    assert float(a8) == pytest.approx(float(a16)) and p8.kv_dtype == "bf16"
    assert m8.activation_bytes(10) == m16.activation_bytes(10) and m8.layer_bytes() == m16.layer_bytes() / 2
    with pytest.raises(ExeGPTError, match="device A100 has no FP8 tensor cores"):
        roofline_profile(m8, "A100")
