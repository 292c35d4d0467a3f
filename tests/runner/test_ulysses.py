"""Shift Parallelism's two modes over one KV cache (gloo ranks): whichever mode each step runs in, the logits are
the single-process model's and the greedy tokens identical; a shift model sharded in plain rank order is not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from exegpt.errors import ExeGPTError
from runner.launch import exit_rank
from runner.tp import free_port, init_dist
from runner.ulysses import ShiftGroups, ShiftModel, check_degrees, grid_shares, make_groups, shift_order
from runner.weights import _build, _finish, load_model

PROMPTS = [[5, 17, 42, 7, 99], [3, 1], [250, 8, 8, 8, 8, 8, 8, 13]]
LONG = [64, 65, 66, 67, 68, 69, 70]  # prefilled in two chunks
STEPS = 4


def script(model, modes: list[bool], call) -> list[torch.Tensor]:
    """Prefill, two chunks of a fourth prompt, then decode steps, each call in the next of ``modes``; every
    call's logits. ``call(fn, *args, sp=...)`` runs one model call."""
    vocab = model.args.vocab_size
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    long = [t % vocab for t in LONG]
    model.setup_cache(4, 40)
    modes = iter(modes)
    out = [call(model.prefill, torch.tensor([t for p in prompts for t in p]), [len(p) for p in prompts], [0, 1, 2],
                sp=next(modes))]
    out.append(call(model.prefill, torch.tensor(long[:3]), [3], [3], sp=next(modes)))
    out.append(call(model.prefill, torch.tensor(long[3:]), [len(long) - 3], [3], [3], sp=next(modes)))
    tok = torch.cat([out[0].argmax(-1), out[-1].argmax(-1)])
    for _ in range(STEPS):
        out.append(call(model.decode, tok, [0, 1, 2, 3], sp=next(modes)))
        tok = out[-1].argmax(-1)
    return out


PATTERNS = {"alternate": [i % 2 == 0 for i in range(3 + STEPS)], "reverse": [i % 2 == 1 for i in range(3 + STEPS)]}


def _load(name: str) -> torch.nn.Module:
    """A preset by name, or a model saved by the test as (args, state dict): the parent's SmolLM2, so that the
    ranks do not each parse the GGUF file (4 of its 7 s)."""
    if not name.endswith(".pt"):
        return load_model(name)[0]
    args, state = torch.load(name, mmap=True, weights_only=False)
    model = _build(args, None, True, True)
    model.load_state_dict(state, assign=True)
    return _finish(model)


class _NaiveGroups(ShiftGroups):
    """The head-order trap: shift shards in grid order instead of the transposed grid's."""

    shift_index = property(lambda self: self.index)


def _worker(rank: int, world: int, port: int, cases: list, out_path: str) -> None:
    torch.set_num_threads(1)
    init_dist(rank, world, f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        results = {}
        for name, sp, tp, naive, patterns in cases:
            groups = make_groups(sp, tp, 0, rank)
            if naive:
                groups = _NaiveGroups(**{f.name: getattr(groups, f.name) for f in dataclasses.fields(groups)})
            model = ShiftModel(_load(name), groups)
            for pattern in patterns:
                results[(name, sp, tp, naive, pattern)] = script(model, PATTERNS[pattern],
                                                                 lambda f, *a, sp: f(*a, sp=sp))
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_rank()


def _run(world: int, cases: list, tmp_path) -> dict:
    out = str(tmp_path / f"shift{world}.pt")
    mp.spawn(_worker, args=(world, free_port(), cases, out), nprocs=world, join=True)
    return torch.load(out)


def _reference(name: str) -> list[torch.Tensor]:
    model = load_model(name)[0]
    return script(model, [False] * (3 + STEPS), lambda f, *a, sp: f(*a))


def _check(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)  # fp32 sums in another order
        assert g.argmax(-1).tolist() == w.argmax(-1).tolist()


def test_modes_switch_per_step_on_two_and_four_ranks(tmp_path):
    """tiny: (SP 2, TP 1) on 2 ranks; small: (SP 2, TP 2) on 4 ranks, mixed grid, and the naive head order."""
    got = _run(2, [("tiny", 2, 1, False, PATTERNS)], tmp_path)
    want = _reference("tiny")
    for pattern in PATTERNS:
        _check(got[("tiny", 2, 1, False, pattern)], want)
    got = _run(4, [("small", 2, 2, False, ["reverse"]), ("small", 2, 2, True, ["alternate"])], tmp_path)
    want = _reference("small")
    _check(got[("small", 2, 2, False, "reverse")], want)
    naive = got[("small", 2, 2, True, "alternate")]
    with pytest.raises(AssertionError):  # prefilled in base mode, read in shift mode with other heads
        _check(naive, want)


def test_smollm2_two_ranks_uneven_heads(tmp_path, smollm2):
    """SmolLM2-135M's 9 query and 3 KV heads on two ranks: whole GQA groups, 6 + 3 query and 2 + 1 KV heads a
    rank, in SP 2 (uneven all-to-alls, modes alternating both ways) and in TP 2 (uneven shards)."""
    saved = str(tmp_path / "smollm2.pt")
    torch.save((smollm2[1], smollm2[0].state_dict()), saved)
    got = _run(2, [(saved, 2, 1, False, PATTERNS), (saved, 1, 2, False, ["alternate"])], tmp_path)
    want = script(smollm2[0], [False] * (3 + STEPS), lambda f, *a, sp: f(*a))
    for key in [(saved, 2, 1, False, p) for p in PATTERNS] + [(saved, 1, 2, False, "alternate")]:
        _check(got[key], want)


def test_degrees_and_order():
    assert shift_order(2, 2) == [0, 2, 1, 3] and shift_order(4, 1) == [0, 1, 2, 3]
    with pytest.raises(ExeGPTError, match=r"do not split smollm2-135m's 9 query and 3 KV heads into whole GQA "
                                          r"groups; SP x TP must be one of \[1, 2, 3\]"):
        check_degrees(2, 2, 9, 3, "smollm2-135m")
    check_degrees(2, 1, 9, 3, "smollm2-135m")  # 2 + 1 KV heads
    assert grid_shares(2, 1, 3) == ((2, 1),) and grid_shares(1, 2, 3) == ((2,), (1,))
    assert grid_shares(2, 2, 4) == ((1, 1), (1, 1))
    with pytest.raises(ExeGPTError, match="sp=0 must be a whole number >= 1"):
        check_degrees(0, 1, 4, 2)
