"""PipeInfer as a policy: the speculation head decodes exactly the target's tokens whatever the drafter does, the
simulated timeline's baselines match their closed forms, cancellations save work, the policy runs on the
simulated engine, and bad knobs get one line each."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from exegpt import Profile, Workload, evaluate_schedule, run_simulated
from exegpt.errors import ExeGPTError
from exegpt.policies import describe, policy_module, schedule_from_dict
from exegpt.policies.pipeinfer import PipeInferSchedule, best_schedule
from exegpt.problem import problem
from exegpt.schedule import schedule_to_dict
from exegpt.spec_sim import Acceptance, SpecCosts, SpecOptions, simulate_request
from exegpt.speculation import MAX_WIDTH, SpecHead, cache_rows

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"
COSTS = SpecCosts((0.015, 0.012, 0.014), (5e-4, 4e-4, 6e-4), (10, 10, 10), hop_s=0.01, draft_s=1e-3,
                  draft_tok_s=5e-4)


@pytest.mark.parametrize("mode", ["plain", "sync", "pipeinfer"])
def test_lossless_for_every_knob_and_acceptance(mode):
    """The timeline's tokens are symbolic (the target's token at position p is p; a wrong draft is -1): every
    committed token must be the target's, for draft lengths 1 to 8, depths 1 to 3 and acceptance 0 (every draft
    rejected) to 1."""
    for k in (1, 3, 8):
        for depth in (1, 3):
            for alpha in (0.0, 0.4, 1.0):
                tl = simulate_request(COSTS, Acceptance(alpha, 0.2), SpecOptions(mode, k, depth), 17, 40,
                                      np.random.default_rng(k * 10 + depth))
                assert tl.tokens == list(range(17, 17 + 40))
                assert len(tl.token_s) == 40 and tl.token_s == sorted(tl.token_s) and tl.token_s[0] == tl.ttft_s
                c = tl.counts
                assert c.accepted <= c.verified <= c.drafted
                if mode == "pipeinfer" and alpha == 0.0:
                    assert c.cancelled > 0 and tl.layers_aborted > 0  # rejections cancel runs in flight
                if mode != "pipeinfer":
                    assert c.cancelled == 0 and tl.layers_aborted == 0
                if alpha == 1.0 and mode != "plain":
                    assert c.accepted == c.verified


@pytest.mark.parametrize("mode", ["sync", "pipeinfer"])
def test_trees_are_lossless_and_siblings_rescue(mode):
    """Widths 2 and 3: the same tokens for every knob, acceptance and rescue rate, while the simulated stages keep
    each KV row's length and correctness, run the copies the runs carry and roll back what cancellations leave
    (a wrong row would return a wrong token, and the timeline checks at the end that no row holds less than the
    head believes). Siblings rescue rejected first tokens; their rows are brought up to date by copies."""
    total = np.zeros(5)
    for width in (2, 3):
        for k in (1, 4):
            for depth in (1, 2):
                for alpha in (0.0, 0.5):
                    for rescue in (0.0, 0.7):
                        tl = simulate_request(COSTS, Acceptance(alpha, 0.2, rescue),
                                              SpecOptions(mode, k, depth, width), 17, 40,
                                              np.random.default_rng(k * 10 + depth))
                        assert tl.tokens == list(range(17, 17 + 40))
                        c = tl.counts
                        assert c.accepted <= c.verified and c.rescued <= c.fork_misses <= c.forks <= c.tree_runs
                        assert c.rescued <= c.sibling_tries and c.siblings >= c.tree_runs
                        if rescue == 0.0:
                            assert c.rescued == 0
                        if mode == "sync":  # nothing cancelled: every copy runs on every stage
                            assert c.cancelled == 0 and tl.kv_copies == 3 * c.copies
                        total += (c.rescued, c.copies, c.cancelled, min(tl.rolled_back), tl.kv_copies)
    rescued, copies, cancelled, rolled, kv_copies = total
    assert rescued > 0 and copies > 0 and rolled > 0 and 0 < kv_copies <= 3 * copies
    assert (cancelled > 0) == (mode == "pipeinfer")


def test_head_runs_trees_in_rows_of_their_own():
    """Width 2, depth 2 (3 rows): a tree run's sibling gets a free row brought up to date by a copy; a sibling that
    holds the target's first token where the trunk missed it becomes the trunk (its row the main row) while in
    flight; a cancelled run's writes are forgotten up to where it wrote."""
    h = SpecHead((5, 6, 7), 8, 30, "pipeinfer", depth=2, width=2)
    assert len(h.row_tokens) == cache_rows("pipeinfer", 2, 2) == 3
    r0 = h.plain_run()
    ask, chain, _ = h.ask_draft()
    r1 = h.on_draft(ask, [[9, 10], [19, 20]])  # the trunk guesses 9 after 8, its sibling 19
    assert (r1.start, r1.branches, r1.rows, r1.copies) == (4, ((9, 10), (19, 20)), (0, 1), ((0, 1, 0, 4),))
    assert h.row_tokens[1] == [5, 6, 7, 8, 19, 20] and h.counts.copied == 4
    assert h.on_result(r0.id, [19]) == ([19], [])  # the target says 19: the sibling is live, the trunk is not
    c = h.counts
    assert (c.forks, c.fork_misses, c.rescued, c.sibling_tries, c.accepted) == (1, 1, 1, 1, 1)
    assert h.main == 1 and h.chain() == [5, 6, 7, 8, 19, 20]
    ask, _, _ = h.ask_draft()
    r2 = h.on_draft(ask, [[21, 22], [31]])
    assert (r2.start, r2.rows, r2.copies) == (6, (1, 2), ((1, 2, 0, 6),))  # rows 0 and 1 are r1's: busy
    committed, gone = h.on_result(r1.id, [0, 0, 20, 21])  # the sibling's targets: 20 agrees, then the bonus 21
    assert committed == [20, 21] and gone == [] and h.main == 1
    ask, _, _ = h.ask_draft()
    r3 = h.on_draft(ask, [[23, 24], [33, 34]])
    assert (r3.start, r3.rows, r3.copies) == (8, (1, 0), ((1, 0, 4, 8),))  # row 0 agrees with the chain to 4
    committed, gone = h.on_result(r2.id, [22, 99, 0])  # 22 agreed, then 99, not 23: r3 cancelled
    assert committed == [22, 99] and [r.id for r in gone] == [r3.id] and h.counts.cancelled == 1
    assert h.row_tokens[0] == [5, 6, 7, 8] and h.row_tokens[1] == [5, 6, 7, 8, 19, 20, 21, 22]
    r4 = h.plain_run()
    assert (r4.start, r4.tokens, r4.rows) == (8, (99,), (1,))
    assert h.generated == [8, 19, 20, 21, 22, 99]
    # A tree that parts after the committed token: its sibling agrees in full, the trunk does not; the run after it
    # continued the trunk, so it goes, though its first token happens to be the bonus at its position.
    h = SpecHead((1, 2), 3, 20, "pipeinfer", depth=2, width=2)
    ask, _, _ = h.ask_draft()
    r = h.on_draft(ask, [[4, 5], [14, 15]])
    assert (r.start, r.branches, r.rows, r.copies) == (2, ((3, 4, 5), (3, 14, 15)), (0, 1), ((0, 1, 0, 2),))
    ask, _, _ = h.ask_draft()
    r2 = h.on_draft(ask, [16])
    assert (r2.start, r2.tokens) == (5, (16,))
    assert h.on_result(r.id, [14, 0, 0, 14, 15, 16]) == ([14, 15, 16], [r2])
    assert h.main == 1 and h.row_tokens[0] == [1, 2, 3, 4, 5] and h.counts.rescued == 1


def test_baselines_match_their_closed_forms():
    """Plain: a token per round trip (stages and hops). Sync at acceptance 1 with no stops: k + 1 tokens per
    draft, verify round."""
    S, rng = 3, np.random.default_rng(0)
    plain = simulate_request(COSTS, Acceptance(0.0), SpecOptions("plain"), 20, 30, rng)
    itl = sum(COSTS.stage_s(s, 1) for s in range(S)) + S * COSTS.hop_s
    assert np.allclose(np.diff(plain.token_s), itl)
    k = 4
    sync = simulate_request(COSTS, Acceptance(1.0), SpecOptions("sync", k), 20, 1 + 3 * (k + 1), rng)
    rnd = 2 * COSTS.hop_s + COSTS.draft_s + k * COSTS.draft_tok_s + \
        sum(COSTS.stage_s(s, k + 1) for s in range(S)) + S * COSTS.hop_s
    assert np.allclose(np.diff(sync.token_s[::k + 1]), rnd)


def test_pipeinfer_tolerates_low_acceptance_and_gains_at_high():
    """Acceptance 0: PipeInfer stays near plain decoding (its speculation is cancelled, its non-speculative run
    goes on) while synchronous speculation pays its drafts on top; acceptance 0.9: both beat plain."""
    def itl(mode, alpha):
        rng = np.random.default_rng(1)
        ts = [simulate_request(COSTS, Acceptance(alpha, 0.1), SpecOptions(mode, 4, 3), 20, 80, rng).token_s
              for _ in range(3)]
        return np.mean([(t[-1] - t[0]) / (len(t) - 1) for t in ts])

    plain = itl("plain", 0.0)
    assert itl("pipeinfer", 0.0) < 1.1 * plain < 1.1 * itl("sync", 0.0)
    assert itl("pipeinfer", 0.9) < 0.7 * plain and itl("sync", 0.9) < 0.7 * plain


def test_head_cancels_every_run_after_a_rejection():
    h = SpecHead((5, 6, 7), 8, 20, "pipeinfer", depth=3)
    r0 = h.plain_run()
    assert (r0.start, r0.tokens) == (3, (8,)) and h.wants_draft()
    ask, chain, _ = h.ask_draft()
    assert chain == [5, 6, 7, 8]
    r1 = h.on_draft(ask, [9, 10])
    assert (r1.start, r1.tokens) == (4, (9, 10))
    ask, chain, _ = h.ask_draft()
    r2 = h.on_draft(ask, [11, 12])
    assert r2.start == 6 and [r.id for r in h.runs] == [0, 1, 2]
    assert h.on_result(0, [9]) == ([9], [])  # the non-speculative run: 9, which run 1 guessed
    committed, gone = h.on_result(1, [10, 99])  # 10 accepted, then the target says 99, not 11
    assert committed == [10, 99] and [r.id for r in gone] == [2] and not h.runs
    assert h.generated == [8, 9, 10, 99] and h.counts.cancelled == 1
    assert h.on_result(2, [0, 0]) == ([], [])  # a cancelled run's result changes nothing


def test_on_the_simulated_engine_and_json():
    prof = Profile.load(PROFILE)
    w = Workload.truncated_normal(input=(24, 10, 48), output=(16, 8, 40))
    s = PipeInferSchedule("pipeinfer", 2, 3, n_draft=4, cutoff=0.3, depth=2, alpha=0.6, link_delay_s=0.002)
    plan = evaluate_schedule(s, w, profile=prof, devices="3xcpu")
    assert schedule_from_dict(schedule_to_dict(s)) == s and describe(s) == "pipeinfer k=4 c=0.3 d=2 ngram:2 S2"
    tree = dataclasses.replace(s, width=3, rescue=0.4)
    assert schedule_from_dict(schedule_to_dict(tree)) == tree and describe(tree) == \
        "pipeinfer k=4 c=0.3 d=2 w=3 ngram:2 S2"
    assert policy_module("pipeinfer").parse(s.policy, {"width": 2, "n_draft": 3}, 3).width == 2  # the CLI's
    assert evaluate_schedule(tree, w, profile=prof, devices="3xcpu").estimate.memory_bytes > \
        plan.estimate.memory_bytes  # 5 rows of KV a stage, not 1
    rep = run_simulated(plan, prof, num_requests=6, seed=1, log_decisions=True)
    assert rep.num_finished == 6 and rep.decisions == tuple(f"main Speculate(rid={i})" for i in range(6))
    assert all(r.first_token_s >= r.encode_start_s for r in rep.requests)
    assert plan.estimate.decode_step_s > 0 and plan.estimate.throughput_seq_s > 0
    uneven = dataclasses.replace(s, split=(1, 1))
    assert schedule_from_dict(schedule_to_dict(uneven)) == uneven
    assert [st.n_layers for st in evaluate_schedule(uneven, w, profile=prof, devices="3xcpu").stages] == [1, 1]


def test_the_search_decides_when_speculation_pays():
    """On a slow link, a drafter the target never agrees with: plain decoding (PipeInfer at best matches it);
    one it agrees with 9 times in 10: speculation, PipeInfer over sync where hops dominate (tiny's 2 layers: 3
    plain stages do not fit)."""
    prob = problem(Workload.truncated_normal(input=(24, 10, 48), output=(16, 8, 40)), math.inf, model="tiny",
                   devices="3xcpu", profile=Profile.load(PROFILE))
    slow = PipeInferSchedule("pipeinfer", 2, 3, alpha=0.0, link_delay_s=0.01)
    best, tried = best_schedule(prob, slow)
    assert len(tried) == 1 + 4 * 3 * 3 and {s.mode for _, s in tried} == {"plain", "sync", "pipeinfer"}
    assert {s.width for _, s in tried} == {1, 2, 3}
    plain = min(t for t, s in tried if s.mode == "plain")
    assert tried[0][0] >= 0.97 * plain and min(t for t, s in tried if s.mode == "sync") > plain
    best, tried = best_schedule(prob, dataclasses.replace(slow, alpha=0.9))
    assert best.mode == "pipeinfer" and tried[0][0] < 0.5 * plain
    # Siblings that rescue: a tree pays (the first drafted token is wrong 7 times in 10, a sibling right half of
    # those times); siblings that never do: their rows are only cost, a chain is picked.
    best, tried = best_schedule(prob, dataclasses.replace(slow, alpha=0.3, rescue=0.5, link_delay_s=0.0))
    chain = min(t for t, s in tried if s.width == 1 and s.mode != "plain")
    assert best.width > 1 and tried[0][0] < 0.85 * chain
    best, tried = best_schedule(prob, dataclasses.replace(slow, alpha=0.3, rescue=0.0, link_delay_s=0.0))
    assert best.width == 1


@pytest.mark.parametrize("fields,words", [
    (dict(n_draft=0), "draft length n_draft=0"), (dict(cutoff=1.5), "cutoff=1.5"),
    (dict(cutoff=-0.1), "cutoff=-0.1"), (dict(draft="ngrams:2"), "draft='ngrams:2'"),
    (dict(depth=0), "depth=0"), (dict(mode="async"), "mode='async'"), (dict(num_gpus=2), "num_gpus=2"),
    (dict(alpha=2.0), "alpha=2.0"), (dict(split=(3,)), "split=(3,)"), (dict(width=0), "tree width=0"),
    (dict(width=MAX_WIDTH + 1), f"tree width={MAX_WIDTH + 1} must be a whole number of branches in [1, 4]"),
    (dict(width=2.0), "tree width=2.0"), (dict(rescue=-0.5), "rescue=-0.5")])
def test_bad_knobs_get_one_line(fields, words):
    with pytest.raises(ExeGPTError) as e:
        PipeInferSchedule(**{"mode": "pipeinfer", "stages": 2, "num_gpus": 3, **fields})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_tree_that_does_not_fit_the_cache_rows_gets_one_line():
    """Width 4 at depth 100000: 300001 rows of KV a stage, past what a device holds beside the weights."""
    w = Workload.truncated_normal(input=(24, 10, 48), output=(16, 8, 40))
    s = PipeInferSchedule("pipeinfer", 2, 3, width=4, depth=100_000)
    with pytest.raises(ExeGPTError) as e:
        evaluate_schedule(s, w, model="smollm2-135m", devices="3xA40")
    assert "tree width 4 at depth 100000 needs 300001 KV cache rows of 88 positions per stage" in str(e.value)
    assert "narrow the tree" in str(e.value) and "\n" not in str(e.value)
    evaluate_schedule(dataclasses.replace(s, depth=2), w, model="smollm2-135m", devices="3xA40")  # 7 rows fit
