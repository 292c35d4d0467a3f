import numpy as np
import pytest

from exegpt import Distribution, ExeGPTError, Workload
from exegpt.workload import TASKS


def test_truncated_normal_matches_paper_table3_p99_for_S_and_C1():
    # Table 3 lists p99 output lengths 63 (S) and 137 (C1); the discretised truncated normal gives 63 and 134.
    assert Workload.task("S").output_len.quantile(0.99) == 63
    assert abs(Workload.task("C1").output_len.quantile(0.99) - 137) <= 3


@pytest.mark.parametrize("task", list(TASKS))
def test_tasks_respect_their_max_and_sum_to_one(task):
    w = Workload.task(task)
    (_, _, in_max), (_, _, out_max) = TASKS[task]
    assert w.input_len.max <= in_max and w.output_len.max <= out_max
    assert abs(sum(w.output_len.probs) - 1) < 1e-9


def test_from_samples_quantile_and_mean():
    d = Distribution.from_samples([1, 2, 2, 3, 3, 3, 4, 4, 4, 4])
    assert d.lengths == (1, 2, 3, 4)
    assert d.mean() == pytest.approx(3.0)
    assert d.quantile(0.5) == 3 and d.quantile(1.0) == 4 and d.quantile(0.1) == 1


def test_expected_max_matches_monte_carlo():
    d = Workload.task("S").output_len
    rng = np.random.default_rng(0)
    mc = d.sample((20000, 8), rng).max(axis=1).mean()
    assert d.expected_max(8) == pytest.approx(mc, rel=0.01)
    assert d.expected_max(1) == pytest.approx(d.mean())


@pytest.mark.parametrize("lengths,probs,match", [
    ((), (), "at least one length"),
    ((0, 2), (0.5, 0.5), "whole number of tokens >= 1"),
    ((-3,), (1.0,), "-3"),
    ((1, 2), (0.5, 0.4), "sum to 0.9"),
    ((2, 1), (0.5, 0.5), "strictly increasing"),
    ((1, 2), (1.2, -0.2), "-0.2"),
])
def test_bad_distributions_are_one_line_errors(lengths, probs, match):
    with pytest.raises(ExeGPTError, match=match) as e:
        Distribution(lengths, probs)
    assert "\n" not in str(e.value)


def test_bad_samples_and_normal_parameters():
    with pytest.raises(ExeGPTError, match="zero samples"):
        Distribution.from_samples([])
    with pytest.raises(ExeGPTError, match="2.5"):
        Distribution.from_samples([1, 2.5])
    with pytest.raises(ExeGPTError, match="mean length -1"):
        Distribution.truncated_normal(-1, 3, 10)
    with pytest.raises(ExeGPTError, match="unknown task 'X'"):
        Workload.task("X")


def test_trace_formats_keep_joint_sample(tmp_path):
    vidur = tmp_path / "v.csv"
    vidur.write_text("num_prefill_tokens,num_decode_tokens,arrived_at\n10,3,0.5\n20,5,1.0\n10,5,2.0\n")
    w = Workload.from_trace(vidur)
    assert w.pairs == ((10, 3), (20, 5), (10, 5))
    assert w.arrivals_s == (0.0, 0.5, 1.5)
    assert w.input_len.lengths == (10, 20) and w.output_len.probs == pytest.approx((1 / 3, 2 / 3))
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,100,7\n"
                     "2023-11-16 18:15:47.1805900,200,9\n")
    w = Workload.from_trace(azure)
    assert w.pairs == ((100, 7), (200, 9)) and w.arrivals_s == pytest.approx((0.0, 0.5))


@pytest.mark.parametrize("text,match", [
    ("a,b\n1,2\n", "expected num_prefill_tokens"),
    ("num_prefill_tokens,num_decode_tokens\n1,x\n", "line 2: expected numbers"),
    ("num_prefill_tokens,num_decode_tokens\n0,3\n", "whole numbers >= 1"),
    ("num_prefill_tokens,num_decode_tokens\n", "no requests"),
])
def test_bad_traces(tmp_path, text, match):
    f = tmp_path / "t.csv"
    f.write_text(text)
    with pytest.raises(ExeGPTError, match=match):
        Workload.from_trace(f)


def test_missing_trace_file():
    with pytest.raises(ExeGPTError, match="cannot read trace file"):
        Workload.from_trace("/nonexistent/trace.csv")


@pytest.mark.parametrize("name,n", [("arxiv", 28257), ("azure_conv", 19366), ("azure_code", 8819)])
def test_builtin_traces(name, n):
    w = Workload.trace(name)
    assert len(w.pairs) == n
    assert w.correlation() is not None


def test_scaled_trace_keeps_pairs():
    w = Workload.trace("azure_code").scaled(0.01, 0.1)
    assert len(w.pairs) == 8819 and max(i for i, _ in w.pairs) <= 75


@pytest.mark.parametrize("mean,std,max_len", [(200, 80, 512), (50, 100, 300), (30, 5, 64)])
def test_fit_recovers_a_truncated_normal_that_truncation_hides(mean, std, max_len):
    """20,000 samples of a truncated normal: the fit finds the normal's own mean and std, not the samples' (50 and
    100 truncated to 1..300 have a sample mean near 99)."""
    from exegpt.distribution import fit_truncated_normal

    d = Distribution.truncated_normal(mean, std, max_len)
    x = np.random.default_rng(0).choice(d.lengths_array, size=20000, p=d.probs_array)
    m, s, top = fit_truncated_normal(x, max_len)
    assert abs(m - mean) < 0.05 * std and abs(s - std) < 0.05 * std and top == max_len
    fitted = Distribution.fit(x, max_len)
    assert abs(fitted.mean() - d.mean()) < 0.02 * d.mean()
    with pytest.raises(ExeGPTError, match="max_len=10 is below the longest sample"):
        fit_truncated_normal(x, 10)


def test_trace_formats_mooncake_sharegpt_burstgpt(tmp_path):
    """Mooncake JSON lines (timestamps in ms), ShareGPT JSON (lengths counted as ceil(characters / 4)) and BurstGPT
    CSV (failed requests, with no response tokens, skipped and counted) load with their pairs and arrivals."""
    import json

    moon = tmp_path / "mooncake.jsonl"
    moon.write_text("\n".join(json.dumps({"timestamp": 1000 * i + 500, "input_length": 100 + i, "output_length": 10 + i,
                                          "hash_ids": [i]}) for i in range(5)) + "\n")
    w = Workload.from_trace(moon)
    assert w.pairs == tuple((100 + i, 10 + i) for i in range(5)) and w.arrivals_s == (0.0, 1.0, 2.0, 3.0, 4.0)
    share = tmp_path / "sharegpt.json"
    share.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "x" * 41}, {"from": "gpt", "value": "y" * 8}]},
        {"id": "b", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q" * 4},
                                      {"from": "gpt", "value": "r" * 5}, {"from": "human", "value": "more"}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "no question"}]}]))
    w = Workload.from_trace(share)
    assert w.pairs == ((11, 2), (1, 2)) and w.arrivals_s is None and "1 skipped" in w.name
    burst = tmp_path / "burst.csv"
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "5,ChatGPT,472,18,490,Conversation log\n6.5,GPT-4,1087,0,1087,Conversation log\n"
                     "8,ChatGPT,50,230,280,API log\n")
    w = Workload.from_trace(burst)
    assert w.pairs == ((472, 18), (50, 230)) and w.arrivals_s == (0.0, 3.0) and "1 skipped" in w.name
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(ExeGPTError, match="line 1: expected a JSON object with input_length and output_length"):
        Workload.from_trace(bad)
