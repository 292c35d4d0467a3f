"""Profiles from the shipped A100 / H100 / A40 measurements and the calibrated GEMM model."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from exegpt import (ExeGPTError, Kernel, Profile, RRASchedule, Workload, evaluate_schedule, find_schedule,
                    get_model)
from exegpt import gpu_data
from exegpt.gpu_data import (MEASURED_MODELS, NETWORK, builtin_profile, calibrate, fit_validation, gpu_profile,
                             holdout_error, load_gpu, load_network)
from exegpt.roofline import roofline_profile

from .conftest import tiny_cpu_profile

SRC = Path("/work/shared/data/gpu-profiles")


def _csv_rows(path: Path, **match):
    with path.open() as f:
        return [r for r in csv.DictReader(f) if all(r[k] == str(v) for k, v in match.items())]


@pytest.mark.skipif(not SRC.exists(), reason="source CSVs not available")
@pytest.mark.parametrize("gpu,model,folder,tp,tokens", [
    ("a100", "llama-2-7b", "meta-llama/Llama-2-7b-hf", 1, 1),
    ("h100", "llama-2-70b", "meta-llama/Llama-2-70b-hf", 4, 512),
    ("a40", "codellama-34b", "codellama/CodeLlama-34b-Instruct-hf", 8, 1024),
])
def test_derived_compute_matches_source(gpu, model, folder, tp, tokens):
    (row,) = _csv_rows(SRC / "compute" / gpu / folder / "mlp.csv", num_tokens=tokens,
                       num_tensor_parallel_workers=tp)
    ops = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "add")  # two residual adds, one timed
    expect_s = sum(float(row[f"time_stats.{op}.median"]) for op in ops) * 1e-3
    d = load_gpu(gpu)["models"][model]["tp"][str(tp)]
    i = d["num_tokens"].index(tokens)
    assert d["layer_s"][i] == pytest.approx(expect_s, abs=1e-6)
    assert d["ops"]["mlp_up_proj"][i] == pytest.approx(float(row["time_stats.mlp_up_proj.median"]) * 1e-3, abs=1e-7)


@pytest.mark.skipif(not SRC.exists(), reason="source CSVs not available")
def test_derived_network_matches_source():
    (row,) = _csv_rows(SRC / "network" / "a100_dgx" / "all_reduce.csv", num_workers=8, devices_per_node=8,
                       size=67108864)
    series = next(s for s in load_network()["topologies"]["a100_dgx"]["all_reduce"]
                  if s["num_workers"] == 8 and s["devices_per_node"] == 8)
    got = series["seconds"][series["bytes"].index(67108864)]
    assert got == pytest.approx(float(row["time_stats.all_reduce.median"]) * 1e-3, abs=1e-7)
    assert "all_reduce" not in load_network()["topologies"]["a40_pairwise_nvlink"]


def test_measured_model_reproduces_measured_dense_time():
    p = gpu_profile("llama-2-7b", "A100")
    assert p.source == "gpu-data" and p.tp_degrees() == (1, 2, 4, 8)
    for tp in (1, 2, 4, 8):
        d = load_gpu("a100")["models"]["llama-2-7b"]["tp"][str(tp)]
        n = len(d["num_tokens"])
        table = next(t for t in p.tables if t.kernel == Kernel.DENSE_DECODE and t.tp == tp)
        assert table.xs[:n] == tuple(float(x) for x in d["num_tokens"])
        np.testing.assert_allclose(table.seconds[:n], d["layer_s"], rtol=1e-12)
        # lookups go through the profile's monotone envelope, which irons out measurement noise
        looked_up = p.seconds(Kernel.DENSE_DECODE, tp, np.asarray(d["num_tokens"], dtype=float))
        rel = np.abs(looked_up / np.asarray(d["layer_s"]) - 1)
        assert np.median(rel) < 0.1 and rel.max() < 0.5
    # beyond the measured 4096 tokens the calibrated extension continues the measurements
    t4k, t8k = (p.seconds(Kernel.DENSE_DECODE, 1, x) for x in (4096, 8192))
    assert 1.8 < t8k / t4k < 2.2


def test_calibration_predicts_a_held_out_model_within_the_stated_error():
    stated = gpu_profile("opt-13b", "A100").provenance["calibration"]["holdout"]["llama-2-70b"]
    got = holdout_error("a100", "llama-2-70b")
    assert calibrate("a100", exclude=("llama-2-70b",)).fitted_on == ("llama-2-7b", "codellama-34b")
    assert got["median"] <= stated["median"] + 1e-3 and got["max"] <= stated["max"] + 1e-3
    assert stated["median"] < 0.05 and stated["p90"] < 0.1
    # the claims shipped for every GPU and held-out model stay modest
    for gpu in ("a100", "h100", "a40"):
        for m in MEASURED_MODELS:
            assert fit_validation()[gpu][m]["median"] < 0.06


def test_other_shape_on_a40_is_weight_bound_at_one_token():
    p = gpu_profile("opt-13b", "A40")
    m = get_model("opt-13b")
    floor = m.layer_bytes() / 696e9  # weights streamed once per decode step
    t1 = p.seconds(Kernel.DENSE_DECODE, 1, 1)
    assert floor < t1 < 1.6 * floor
    assert 0.4 < p.seconds(Kernel.DENSE_DECODE, 2, 1) / t1 < 0.6
    assert p.provenance["dense"].startswith("calibrated")
    assert "ring model" in p.provenance["network"]["allreduce_tp4"]
    assert gpu_profile("llama-2-7b", "A100").provenance["network"]["allreduce_tp8"].startswith("measured")


def test_encoder_decoder_and_round_trip():
    p = gpu_profile("t5-11b", "H100", tp_degrees=(1, 4))
    assert p.has(Kernel.ATTN_CROSS, 4) and p.tp_degrees() == (1, 4)
    assert p.seconds(Kernel.DENSE_ENCODE, 1, 512) != p.seconds(Kernel.DENSE_DECODE, 1, 512)
    back = Profile.from_json(p.to_json())
    assert back.source == "gpu-data"
    assert back.seconds(Kernel.ALLREDUCE, 4, 3e6) == pytest.approx(p.seconds(Kernel.ALLREDUCE, 4, 3e6))
    assert back.provenance["calibration"]["holdout"] == p.provenance["calibration"]["holdout"]


def test_builtin_profile_falls_back_to_the_roofline():
    assert builtin_profile("opt-13b", "A40").source == "gpu-data"
    assert builtin_profile("opt-13b", "L4").source == "roofline"
    assert builtin_profile("tiny", "A100").source == "roofline"  # fp32: outside the fp16 measurements
    assert gpu_profile("opt-13b", "a40") is gpu_profile("opt-13b", "A40")  # cached


@pytest.mark.parametrize("call,match", [
    (lambda: gpu_profile("opt-13b", "L4"), "no shipped measurements"),
    (lambda: gpu_profile("opt-13b", "TPU"), "unknown device"),
    (lambda: gpu_profile("opt-13b", "A100", tp_degrees=(3,)), "does not divide"),
    (lambda: gpu_profile("gpt3-341b", "A100", tp_degrees=(1, 2, 4, 8, 40)), "exceeds the measured"),
    (lambda: gpu_profile("tiny", "A100"), "fp16"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(ExeGPTError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


# --- shipped measured profiles ------------------------------------------------------------------------------


def _tables(prof):
    return {(t.kernel, t.tp): t for t in prof.tables}


def _ship(tmp_path, monkeypatch, prof, name):
    monkeypatch.setattr(gpu_data, "PROFILES_DIR", tmp_path)
    prof.save(tmp_path / name)


def test_shipped_measured_profile_is_the_builtin_one_with_modelled_collectives(tmp_path, monkeypatch):
    """A profile measured on one H200 (no peer: no collectives) is what planning for H200s uses; the collectives
    it lacks come from the modelled profile at its TP degrees, and the provenance says which."""
    measured = tiny_cpu_profile()
    one_gpu = dataclasses.replace(measured, device="H200",
                                  tables=tuple(t for t in measured.tables if t.kernel not in NETWORK))
    _ship(tmp_path, monkeypatch, one_gpu, "tiny-h200.json")
    prof = builtin_profile("tiny", "H200")
    assert prof.source == "measured" and prof.id == one_gpu.id
    tables = _tables(prof)
    for t in one_gpu.tables:  # every measured table is kept as measured
        assert tables[t.kernel, t.tp] == t
    model = _tables(roofline_profile("tiny", "H200", (1, 2)))
    for kernel, tp in ((Kernel.ALLREDUCE, 2), (Kernel.SEND_RECV, 1), (Kernel.KV_HANDOFF, 1)):
        assert tables[kernel, tp] == model[kernel, tp]
    assert not prof.has(Kernel.ALLREDUCE, 4)  # the measured profile's TP degrees are 1 and 2
    assert prof.provenance["modelled_tables"] == {"allreduce tp=2": "roofline", "send_recv": "roofline",
                                                  "kv_handoff": "roofline"}
    # find_schedule without a profile plans on it.
    w = Workload.truncated_normal(input=(32, 8, 64), output=(16, 4, 32))
    plan = find_schedule(w, 10.0, model="tiny", devices="2xH200")
    again = evaluate_schedule(plan.schedule, w, 10.0, profile=prof, devices="2xH200")
    assert plan.estimate == again.estimate
    assert evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), w, 10.0, model="tiny", devices="1xH200").estimate == \
        evaluate_schedule(RRASchedule(4, 4, 1, 0, 1), w, 10.0, profile=prof, devices="1xH200").estimate


def test_shipped_profile_complete_or_absent(tmp_path, monkeypatch):
    measured = dataclasses.replace(tiny_cpu_profile(), device="H200")
    _ship(tmp_path, monkeypatch, measured, "tiny-h200.json")
    prof = builtin_profile("tiny", "H200")  # nothing to fill in: the file as measured
    assert prof.id == measured.id and _tables(prof) == _tables(measured) and "modelled_tables" not in prof.provenance
    assert builtin_profile("tiny", "H100").source == "roofline"  # no file for H100 (and tiny is fp32)


def test_shipped_profile_of_another_model_is_one_line(tmp_path, monkeypatch):
    _ship(tmp_path, monkeypatch, dataclasses.replace(tiny_cpu_profile(), device="H100"), "tiny-h200.json")
    with pytest.raises(ExeGPTError, match=r"^shipped profile tiny-h200.json holds tiny on H100, not tiny on H200$"):
        builtin_profile("tiny", "H200")
