"""Tensor parallelism (gloo, 2 processes) and pipeline splits reproduce the single-process model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from exegpt.errors import ExeGPTError
from runner.generate import greedy_batch, greedy_reference
from runner.launch import exit_rank
from runner.tp import apply_tp, free_port, init_dist
from runner.weights import load_model

PROMPTS = [[5, 17, 42, 7, 99], [3, 1], [250, 8, 8, 8, 8, 8, 8, 13], [64, 65, 66]]
BUDGETS = [6, 9, 4, 7]


NAMES = ("tiny", "tiny-opt")


def _tp_worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    init_dist(rank, world_size, f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        results = {}
        for name in NAMES:
            model, _, _ = load_model(name)
            apply_tp(model, rank, world_size)
            assert model.args.n_heads == model.layers["0"].attention.n_heads
            model.setup_cache(2, 32)  # 2 rows for 4 requests: batch > 1, joins and compaction under TP
            outs = greedy_batch(model, PROMPTS, BUDGETS, max_rows=2)
            logits = model(torch.tensor([PROMPTS[0], PROMPTS[0][::-1]]))  # batch 2 full forward
            results[name] = {"outs": outs, "logits": logits}
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    exit_rank()


def test_tp2_equals_tp1(tmp_path):
    """One 2-process gloo group checks both families (process start-up dominates the test time)."""
    out_path = str(tmp_path / "tp.pt")
    mp.spawn(_tp_worker, args=(2, free_port(), out_path), nprocs=2, join=True)
    got = torch.load(out_path)
    for name in NAMES:
        model, _, _ = load_model(name)
        refs = [greedy_reference(model, p, b) for p, b in zip(PROMPTS, BUDGETS)]
        assert got[name]["outs"] == refs, name
        logits = model(torch.tensor([PROMPTS[0], PROMPTS[0][::-1]]))
        torch.testing.assert_close(got[name]["logits"], logits, atol=1e-4, rtol=1e-4)


def test_pipeline_split_equals_full():
    full, _, _ = load_model("tiny")
    stage0, _, _ = load_model("tiny", layers=(0, 1), head=False)
    stage1, _, _ = load_model("tiny", layers=(1, 2), embed=False)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    for m in (full, stage0, stage1):
        m.setup_cache(2, 16)
    ids, lens = torch.tensor([t for p in prompts for t in p]), [5, 3]
    want = full.prefill(ids, lens, [0, 1])
    hidden = stage0.prefill(ids, lens, [0, 1])  # [T, dim]
    assert hidden.shape == (8, full.args.dim)
    torch.testing.assert_close(stage1.prefill(hidden, lens, [0, 1]), want, atol=1e-5, rtol=1e-5)
    tok = want.argmax(-1)
    for _ in range(4):
        want = full.decode(tok, [0, 1])
        got = stage1.decode(stage0.decode(tok, [0, 1]), [0, 1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        tok = want.argmax(-1)


def test_tp_degree_must_divide_heads():
    model, _, _ = load_model("tiny")  # 4 heads, 2 KV heads
    with pytest.raises(ExeGPTError, match="must divide") as e:
        apply_tp(model, 0, 3)
    assert "\n" not in str(e.value)


def _command_worker(rank: int, world_size: int, port: int, out_path: str, prepost: bool) -> None:
    """Rank 0 sends commands of every size class to rank 1, which receives them through a CommandInbox (its
    receives posted ahead as on gloo, or when needed as on NCCL)."""
    from runner.dist import Comm
    from runner.pipeline import DECODE, INLINE_ROWS, PREFILL, STOP, Command, CommandInbox, _i64, inline_bytes, \
        send_command

    torch.set_num_threads(1)
    init_dist(rank, world_size, f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        comm, dim, dtype = Comm(torch.device("cpu")), 8, torch.float32
        comm.prepost = prepost
        g = torch.Generator().manual_seed(0)
        big = INLINE_ROWS + 5  # hidden beyond the first message: its rest follows on TAG_BULK
        sent = [(Command(DECODE, _i64([4, 2, 9]), batch=3, time_ns=123), torch.randn(3, dim, generator=g)),
                (Command(PREFILL, _i64([0, 1]), seq_lens=_i64([big - 2, 2]), req=_i64([7, 8]), batch=1),
                 torch.randn(big, dim, generator=g)),
                (Command(PREFILL, _i64([5]), seq_lens=_i64([3]), ids=_i64([11, 12, 13]), req=_i64([9])), None),
                (Command(STOP, _i64([])), None)]
        if rank == 0:
            for cmd, hidden in sent:
                send_command(comm, cmd, hidden, 1, inline_bytes(dim, dtype))
            comm.flush()
        else:
            inbox = CommandInbox(comm, 0, dim, dtype)
            got = [inbox.next() for _ in sent]

            def plain(cmd, hidden):  # views of one byte buffer as several dtypes do not pickle: clone
                fields = {f: getattr(cmd, f) for f in ("op", "batch", "time_ns", "rows", "seq_lens", "ids", "req")}
                return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fields.items()} | \
                    {"hidden": None if hidden is None else hidden.clone()}

            torch.save({"sent": [plain(*c) for c in sent], "got": [plain(*c) for c in got],
                        "posted_after_stop": inbox._posted is not None}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_rank()


@pytest.mark.parametrize("prepost", [True, False])
def test_commands_arrive_whole_in_one_or_two_messages(tmp_path, prepost):
    """send_command / CommandInbox: a decode command within the first message, a prefill whose hidden states
    overflow it, one with token ids and no hidden states, STOP; every field arrives equal, and nothing stays posted
    after STOP."""
    out_path = str(tmp_path / "cmd.pt")
    mp.spawn(_command_worker, args=(2, free_port(), out_path, prepost), nprocs=2, join=True)
    res = torch.load(out_path)
    assert not res["posted_after_stop"]
    assert len(res["got"]) == 4
    for want, got in zip(res["sent"], res["got"]):
        for f, a in want.items():
            b = got[f]
            assert (a is None) == (b is None), f
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f
