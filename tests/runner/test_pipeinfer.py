"""PipeInfer's executor when things go wrong: a dead rank ends the run with its name (the head never waits on
it), and a drafter of another vocabulary is refused before any rank starts. (Its tokens, decisions and
cancellations: ``test_engines_conformance``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exegpt import Profile, Workload, evaluate_schedule
from exegpt.errors import ExeGPTError
from exegpt.policies.pipeinfer import PipeInferSchedule
from exegpt.speculation import Run
from runner.launch import RankFailedError
from runner.run import run_plan

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"
W = Workload.truncated_normal(input=(24, 10, 48), output=(20, 8, 40))


def _plan(s: PipeInferSchedule):
    return evaluate_schedule(s, W, profile=Profile.load(PROFILE), devices=f"{s.num_gpus}xcpu")


def test_a_dead_rank_ends_the_run_and_a_foreign_drafter_is_refused():
    torch.set_num_threads(1)
    plan = _plan(PipeInferSchedule("pipeinfer", 1, 2, n_draft=4, draft="ngram:1"))  # the drafter on rank 1
    with pytest.raises(RankFailedError, match="rank 1"):
        run_plan(plan, "tiny", num_requests=2, seed=3, fault=(1, 3), timeout_s=120)
    foreign = _plan(PipeInferSchedule("pipeinfer", 2, 3, draft="model:small"))
    with pytest.raises(ExeGPTError, match="vocabulary of 2048 tokens, the target 'tiny' 256"):
        run_plan(foreign, "tiny", num_requests=2)


def test_tree_rows_hold_the_chains_kv_on_every_stage():
    """In one process: tiny's two layers as two stages (``runner.pipeinfer._Stage``), a head of tree width 3 and
    depth 2 (5 KV rows a stage), a drafter whose trunk's first token is the target's 4 times in 10 and whose
    siblings rescue half the misses. The second stage lags; a run cancelled before it computes it is skipped,
    stopped at its first layer, or computed and dropped. Whenever the second stage has caught up, every row of
    every stage holds exactly the KV of the tokens the head believes it holds (a fresh prefill's), whatever the
    copies, rollbacks and cancellations did; the tokens are greedy decoding's."""
    import random
    from types import SimpleNamespace

    from exegpt.speculation import SpecHead
    from runner.generate import greedy_reference
    from runner.pipeinfer import Cancelled, _Stage
    from runner.weights import load_model

    torch.set_num_threads(1)
    full, args, _ = load_model("tiny", seed=5)
    parts = [load_model("tiny", layers=(0, 1), head=False, seed=5)[0],
             load_model("tiny", layers=(1, 2), embed=False, seed=5)[0]]
    sched = PipeInferSchedule("pipeinfer", 2, 3, n_draft=3, depth=2, width=3)
    ctx = SimpleNamespace(plan=SimpleNamespace(schedule=sched), fault=None)
    stages = []
    for rank, m in enumerate(parts):
        m.setup_cache(sched.rows, 96)
        stages.append(_Stage(ctx, rank, m, None, 0))
    rng, prompt, out_len = random.Random(1), [3, 14, 15, 92, 65, 35, 89, 79], 40
    truth = prompt + greedy_reference(full, prompt, out_len)
    gid, queue = [0], []
    cancelled = stages[1].cancelled  # what the second stage's cancellation thread would have received
    batch, stopped = {}, set()  # cancelled run -> the cancellation that named it; those the stage acted on

    def launch(run, n_out=None):
        lens, x = [len(b) for b in run.branches], torch.tensor([t for b in run.branches for t in b])
        h = stages[0].compute(gid[0], x, run.start, lens, list(run.rows), run.copies, 0, False)
        queue.append((gid[0], run, h, run.fed if n_out is None else n_out))
        gid[0] += 1

    def second(g, run, h, n_out, check=False):
        return stages[1].compute(g, h, run.start, [len(b) for b in run.branches], list(run.rows), run.copies,
                                 n_out, check).tolist()

    def guess(at, ok):
        return truth[at] if ok and at < len(truth) else rng.randrange(args.vocab_size)

    def draft(chain, k):
        right = chain == truth[:len(chain)]
        trunk_ok = rng.random() < 0.4
        out = [[guess(len(chain), right and trunk_ok)]]
        for _ in range(2):
            ok = right and not trunk_ok and rng.random() < 0.5
            trunk_ok |= ok
            out.append([guess(len(chain), ok) if ok else rng.randrange(args.vocab_size)])
        for b in out:
            while len(b) < rng.randint(1, k):
                b.append(guess(len(chain) + len(b), rng.random() < 0.7))
        return [b for i, b in enumerate(out) if b[0] not in (o[0] for o in out[:i])]

    def check(head):
        for r, toks in enumerate(head.row_tokens):
            if not toks:
                continue
            full.setup_cache(1, 96)
            full.prefill(torch.tensor(toks), [len(toks)], [0])
            for st, layer in ((stages[0], 0), (stages[1], 1)):
                c = st.model.cache
                assert int(c.lengths[r]) >= len(toks)
                assert torch.allclose(c.k[0, r, :, :len(toks)], full.cache.k[layer, 0, :, :len(toks)], atol=1e-4)
                assert torch.allclose(c.v[0, r, :, :len(toks)], full.cache.v[layer, 0, :, :len(toks)], atol=1e-4)

    launch(Run(-1, 0, tuple(prompt), False), n_out=1)
    first = second(*queue.pop())[0]
    head = SpecHead(tuple(prompt), first, out_len, "pipeinfer", depth=2, width=3)
    checks = 0
    while not head.done:
        run = head.plain_run()
        if run is not None:
            launch(run)
        if head.wants_draft():
            ask, chain, room = head.ask_draft()
            run = head.on_draft(ask, draft(chain, min(room, sched.n_draft)))
            if run is not None:
                launch(run)
        for _ in range(rng.randint(1, 2)):
            if not queue:
                break
            g, run, h, n_out = queue.pop(0)
            how = 2  # computed (a cancellation that comes later, or none)
            if g in cancelled:  # once one run of a cancellation is stopped, the stage sees the rest cancelled too
                how = rng.randrange(2 if batch[g] in stopped else 3)
                if how < 2:
                    stopped.add(batch[g])
            if how == 0:
                continue  # skipped
            try:
                targets = second(g, run, h, n_out, check=how == 1)
            except Cancelled:
                continue  # stopped before its first layer: its rows reset to its start
            if g not in cancelled:
                _, gone = head.on_result(run.id, targets)
                ids = {r.id for r in gone}
                for g2, r2, _, _ in queue:
                    if r2.id in ids:
                        cancelled.add(g2)
                        batch[g2] = g
        if not queue:
            check(head)
            checks += 1
    assert head.generated == truth[len(prompt):] and checks > 5
    c = head.counts
    assert c.rescued > 0 and c.cancelled > 0 and c.copies > 0 and c.tree_runs > 0
    assert all(st.stats[3] > 0 for st in stages) and stages[0].stats[11] == c.copies > stages[1].stats[11]
    assert stages[1].stats[2] > 0  # stopped mid-way


def test_prompt_lookup_trees_part_at_the_first_token():
    """The trunk follows the latest occurrence of the last token; a sibling, the latest occurrence followed by
    another token; no third when there is no third continuation; none at all without a trunk."""
    from runner.drafter import NgramDrafter

    ctx = [1, 2, 3, 1, 4, 5, 1, 2, 6, 1]  # 1 is followed by 2, 4, 2
    assert NgramDrafter(1, 0.0).draft_tree(ctx, 2, 3) == [[2, 6], [4, 5]]
    assert NgramDrafter(1, 0.0).draft_tree(ctx, 1, 1) == [[2]]
    assert NgramDrafter(1, 0.9).draft_tree(ctx, 2, 3) == []  # the trunk's 2/3 under the cutoff
