"""RunReport aggregation and JSON round-trip; requests, admission and the request ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exegpt import Estimate, ExeGPTError, Workload
from exegpt.ledger import Ledger, reject_reason
from exegpt.report import FAILED, FINISHED, RequestRecord, RunReport, build_report
from runner.requests import Request, make_requests


def _rec(i: int, start: float, finish: float, n: int = 4, len_tok: float | None = None, **kw) -> RequestRecord:
    return RequestRecord(id=i, input_len=5, output_len=n, status=FINISHED, encode_start_s=start,
                         first_token_s=start + 0.01, finish_s=finish, num_generated=n, latency_len_token_s=len_tok,
                         **kw)


def test_steady_window_throughput_and_latency():
    # 11 completions one per second from t=1..11; the 10 %..90 % window spans t=2..10: 8 completions in 8 s.
    recs = [_rec(i, 0.0, 1.0 + i, len_tok=0.5 + i) for i in range(11)]
    recs.append(RequestRecord(id=11, input_len=900, output_len=4, status=FAILED, reason="too long"))
    rep = build_report("rra", recs, latency_len=3, encode_times_s=[0.2, 0.4],
                       decode_iters=[(0.1, 4), (0.3, 2)])
    assert rep.throughput_seq_s == pytest.approx(1.0)
    assert rep.throughput_tok_s == pytest.approx(4.0)
    assert rep.makespan_s == pytest.approx(11.0)
    assert rep.overall_seq_s == pytest.approx(1.0)
    assert rep.latency_s == pytest.approx(10.5)  # worst case
    assert rep.latency_p50_s == pytest.approx(5.5)
    assert rep.encode_stage_s == pytest.approx(0.3)
    assert rep.decode_step_s == pytest.approx(0.2)
    assert rep.decode_batch == pytest.approx(3.0)
    assert (rep.num_finished, rep.num_failed) == (11, 1)


def test_few_requests_fall_back_to_overall_rate():
    rep = build_report("static", [_rec(0, 0.0, 2.0), _rec(1, 0.0, 4.0)], 8, [], [])
    assert rep.throughput_seq_s == pytest.approx(0.5)
    assert math.isnan(rep.latency_s) and math.isnan(rep.encode_stage_s)


def test_report_json_round_trip(tmp_path):
    est = Estimate(2.0, 20.0, 1.5, 10, 0.1, 0.02, 8.0, memory_bytes=(1e6, 2e6))
    recs = [_rec(i, 0.1 * i, 1.0 + i, tokens=(1, 2, 3, 4)) for i in range(6)]
    recs.append(RequestRecord(id=6, input_len=3, output_len=2, status=FAILED, reason="over budget"))
    rep = build_report("waa_c", recs, 10, [0.1], [(0.02, 3)], num_ranks=2, estimate=est)
    back = RunReport.load(rep.save(tmp_path / "r.json"))
    assert back.requests == rep.requests
    assert back.estimate == est
    for name in ("throughput_seq_s", "throughput_tok_s", "encode_stage_s", "decode_step_s", "decode_batch",
                 "makespan_s", "num_finished", "num_failed", "policy", "num_ranks", "latency_len"):
        assert getattr(back, name) == getattr(rep, name), name
    assert math.isnan(back.latency_s)  # no request reached token 10: NaN survives as null
    table = rep.table()
    assert "predicted" in table and "throughput (seq/s)" in table and "over budget" in table


def test_report_field_names_match_estimate():
    est_fields = {"throughput_seq_s", "throughput_tok_s", "latency_s", "latency_len", "encode_stage_s",
                  "decode_step_s", "decode_batch"}
    assert est_fields <= set(RunReport.__dataclass_fields__)
    assert est_fields <= set(Estimate.__dataclass_fields__)


def test_bad_report_json():
    with pytest.raises(ExeGPTError, match="not valid JSON"):
        RunReport.from_json("{")
    with pytest.raises(ExeGPTError, match="schema"):
        RunReport.from_json('{"schema": 99}')


def test_failed_record_needs_reason():
    with pytest.raises(ExeGPTError, match="reason"):
        RequestRecord(id=0, input_len=1, output_len=1, status=FAILED)
    with pytest.raises(ExeGPTError, match="status"):
        RequestRecord(id=0, input_len=1, output_len=1, status="lost")


def test_make_requests_seeded_and_in_vocab():
    w = Workload.truncated_normal((20, 5, 40), (10, 3, 20))
    a, b = make_requests(w, 30, 100, seed=7), make_requests(w, 30, 100, seed=7)
    assert a == b and a != make_requests(w, 30, 100, seed=8)
    assert [r.id for r in a] == list(range(30))
    assert all(0 <= t < 100 for r in a for t in r.prompt)
    assert all(1 <= r.input_len <= 40 and 1 <= r.output_len <= 20 for r in a)


def test_make_requests_from_trace_pairs():
    w = Workload.from_pairs([(5, 2), (7, 3)])
    reqs = make_requests(w, 50, 64, seed=1)
    assert {(r.input_len, r.output_len) for r in reqs} <= {(5, 2), (7, 3)}


def test_reject_reason():
    assert reject_reason(10, 10, 64, 32) is None
    assert "context of 16" in reject_reason(10, 10, 16, 32)
    assert "KV-cache budget of 18" in reject_reason(10, 10, 64, 18)


def test_tracker_ledger():
    lengths = [(2, 3), (50, 2), (1, 2)]
    tr = Ledger(lengths, [0.0, 0.0, 0.0], latency_len=2, max_seq_len=40, cache_len=40, stop_at_eos=True, eos_id=9,
                keep_tokens=True)
    assert tr.runnable == [0, 2] and 1 in tr.rejected
    tr.started([0], 0.0)
    assert not tr.token(0, 5, 0.1)
    assert tr.token(0, 9, 0.2)  # EOS
    with pytest.raises(ExeGPTError):
        tr.token(0, 5, 0.3)
    tr.started([2], 0.0)
    tr.token(2, 4, 0.4)
    recs = {r.id: r for r in tr.records()}
    assert recs[0].status == FINISHED and recs[0].tokens == (5, 9) and recs[0].latency_len_token_s == 0.2
    assert recs[1].status == FAILED and "context" in recs[1].reason
    assert recs[2].status == FAILED and "ended before" in recs[2].reason
    with pytest.raises(ExeGPTError, match="EOS"):
        Ledger(lengths, [0.0] * 3, 2, 40, 40, stop_at_eos=True)


def test_request_validation():
    with pytest.raises(ExeGPTError):
        Request(0, (), 3)
    with pytest.raises(ExeGPTError):
        Request(0, (1,), 0)
    assert np.isclose(Request(0, (1, 2), 3).total_len, 5)
