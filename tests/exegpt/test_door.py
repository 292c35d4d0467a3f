"""Bad input at the public entries is refused before anything is computed or allocated, in one line that names
the value and what was expected: wrong types, numbers given as words, relations (max >= mean), absurd sizes."""

from __future__ import annotations

import math

import pytest

from exegpt import (Distribution, ExeGPTError, Plan, RequestSLO, Workload, evaluate_schedule, find_schedule,
                    run_simulated, simulate)
from exegpt.devices import Cluster, get_device

S = Workload.task("S")


@pytest.fixture(scope="module")
def plan():
    return find_schedule(S, math.inf, policies=["rra"], devices="1xA100")


CASES = [
    (lambda: Workload.truncated_normal(input=(256, 50, 100), output=(32, 13, 80)),
     r"input: mean length 256 is above the max length 100; expected max >= mean"),
    (lambda: Workload.truncated_normal(input=("256", 252, 512), output=(32, 13, 80)),
     r"input: mean length '256' must be a number > 0"),
    (lambda: Distribution.truncated_normal(1e12, 5, 2e12),
     r"max length 2000000000000.0 must be a whole number in \[1, 10,000,000\]"),
    (lambda: Distribution.truncated_normal(100, 5, 10**15),
     r"max length 1000000000000000 must be a whole number in \[1, 10,000,000\]"),
    (lambda: Distribution.from_samples([12, 10**13]),
     r"sequence length 10000000000000 is not a whole number of tokens in \[1, 10,000,000\]"),
    (lambda: Distribution((1, 10**8), (0.5, 0.5)), r"sequence length 100,000,000 is above the 10,000,000 tokens"),
    (lambda: Cluster(get_device("A40"), 10**8), r"device count 100000000 must be a whole number in \[1, 4,096\]"),
    (lambda: find_schedule(S, 3.1, devices="100000000xA40"), r"device count in '100000000xA40' must be in \[1, 4,096\]"),
    (lambda: find_schedule(S, 3.1, memory_fraction="0.9"), r"memory_fraction '0.9' must be a number in \(0, 1\]"),
    (lambda: find_schedule(S, 3.1, eps_throughput="0.1"), r"eps_throughput '0.1' must be a number >= 0"),
    (lambda: find_schedule(S, RequestSLO(ttft_s=2.0, tpot_s="0.1")), r"TPOT bound '0.1' must be a number"),
    (lambda: simulate("rra", S), r"schedule must be a policy's schedule \(RRASchedule, .*got str 'rra'"),
    (lambda: evaluate_schedule(Plan, S, 3.1), r"schedule must be a policy's schedule .*got type"),
    (lambda: run_simulated({"schedule": 1}), r"plan must be a Plan \(find_schedule's result, or Plan.load\(path\)\), "
                                             r"got dict \{'schedule': 1\}"),
]


@pytest.mark.parametrize("call, message", CASES, ids=[m[:40] for _, m in CASES])
def test_bad_input_is_one_line_naming_it(call, message):
    with pytest.raises(ExeGPTError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_a_run_of_an_absurd_size_or_seed_is_refused(plan):
    with pytest.raises(ExeGPTError, match=r"number of requests 1000000000 must be a whole number in \[1, 1,000,000\]"):
        run_simulated(plan, num_requests=10**9)
    with pytest.raises(ExeGPTError, match=r"seed 'x' must be a whole number >= 0"):
        run_simulated(plan, num_requests=10, seed="x")
    assert run_simulated(plan, num_requests=10, seed=3).num_finished == 10


def test_a_plan_json_with_an_unknown_field_is_refused_naming_it(plan):
    d = plan.to_dict()
    assert Plan.from_dict(d) == plan
    for where in (d, d["workload"], d["bound"], d["workload"]["output_len"]):
        where["colour"] = "blue"
        with pytest.raises(ExeGPTError, match=r"has unknown field 'colour'; expected some of "):
            Plan.from_dict(d)
        del where["colour"]
    assert Plan.from_dict(d) == plan


def test_a_profile_json_with_an_unknown_field_is_refused_naming_it():
    from pathlib import Path

    from exegpt import Profile

    d = Profile.load(Path(__file__).parents[1] / "data" / "tiny-cpu.json").to_dict()
    assert Profile.from_dict(d).to_dict() == d
    d["tabels"] = []
    with pytest.raises(ExeGPTError, match=r"profile JSON has unknown field 'tabels'; expected some of "):
        Profile.from_dict(d)
    del d["tabels"]
    d["tables"][0]["secnds"] = []
    with pytest.raises(ExeGPTError, match=r"profile table '\w+' has unknown field 'secnds'"):
        Profile.from_dict(d)
