"""Splitwiser on the runner: two processes on one device with one copy of the weights, the KV of each prefilled
batch handed from the prefill process to the decode process; greedy tokens, conservation, a dying process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from exegpt import Profile, Workload, evaluate_schedule
from exegpt.policies.cb import CBSchedule
from exegpt.errors import ExeGPTError
from exegpt.policies.splitwiser import SplitwiserSchedule
from exegpt.report import FINISHED
from runner.launch import Fault, RankFailedError
from runner.generate import greedy_reference
from runner.requests import make_requests
from runner.run import run_plan, run_plans
from runner.weights import load_model

PROFILE = Path(__file__).resolve().parents[1] / "data" / "tiny-cpu.json"
W = Workload.truncated_normal(input=(24, 10, 48), output=(16, 8, 40))


def test_two_processes_give_greedy_tokens_and_account_for_every_request():
    """Splitwiser (one thread a process) beside one process alternating the phases (continuous batching): the
    same requests, every one finished with single-request greedy decoding's tokens."""
    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    reqs = make_requests(W, 16, vocab_size=256, seed=4)
    plans = [evaluate_schedule(s, W, profile=prof, devices="1xcpu") for s in
             (SplitwiserSchedule(6, 96, 50, 50, block_size=8), CBSchedule(6, 96, 1, 0, 1, block_size=8))]
    reps = run_plans(plans, "tiny", requests=reqs, keep_tokens=True, log_decisions=True, timeout_s=120,
                     colocated_device="cpu")
    model, _, _ = load_model("tiny")
    ref = {r.id: greedy_reference(model, list(r.prompt), r.output_len) for r in reqs}
    for rep in reps:
        assert sorted(r.id for r in rep.requests) == list(range(len(reqs)))
        assert all(r.status == FINISHED and list(r.tokens) == ref[r.id] for r in rep.requests)
    for rep in reps[:1]:
        assert rep.num_ranks == 2
        merged = [rid for d in rep.decisions if d.startswith("decode Merge") for rid in eval(d.split("-> ")[1])]
        assert sorted(merged) == list(range(len(reqs)))  # every request's KV came through the hand-off


def _map_and_measure(path: str, barrier, results) -> None:
    from runner.colocate import load_shared, weight_residency

    torch.set_num_threads(1)
    model, _ = load_shared(path)
    with torch.inference_mode():
        model.setup_cache(2, 16)
        model.prefill(torch.arange(8), torch.tensor([4, 4]), torch.arange(2))
        sum(float(p.sum()) for p in model.parameters())  # every page of every weight read (the embedding's too)
    barrier.wait()  # both have mapped and read every page
    results.put(weight_residency(path))
    barrier.wait()  # neither unmaps before the other measured


def test_the_weights_exist_once_in_memory():
    """Two processes map the shared weight file: each holds all its pages resident, none of them privately, and
    their proportional shares add up to one copy."""
    from runner.colocate import share_weights

    path = share_weights("tiny", torch.float32, 0)
    try:
        size = Path(path).stat().st_size
        ctx = mp.get_context("fork")  # the children map the file afresh; fork only spares their start-up
        barrier, results = ctx.Barrier(2), ctx.SimpleQueue()
        procs = [ctx.Process(target=_map_and_measure, args=(path, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        got = [results.get() for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        Path(path).unlink(missing_ok=True)
    weights = sum(p.numel() * p.element_size() for p in load_model("tiny")[0].parameters())
    for g in got:
        assert g["rss_bytes"] >= weights and g["private_bytes"] == 0, (weights, got)
    pss = sum(g["pss_bytes"] for g in got)
    assert weights <= pss <= size + 8192, (weights, size, got)  # one copy, shared: not two


def test_a_process_that_dies_is_reported():
    """The prefill process SIGKILLed mid-run: the run ends naming it, and its report holds every request, finished
    or failed with the reason."""
    prof = Profile.load(PROFILE)
    plan = evaluate_schedule(SplitwiserSchedule(6, 96, block_size=8), W, profile=prof, devices="1xcpu")
    reqs = make_requests(W, 12, vocab_size=256, seed=4)
    t = time.monotonic()
    with pytest.raises(RankFailedError, match=r"rank 0 died \(exit code -9, SIGKILL\)") as e:
        run_plan(plan, "tiny", requests=reqs, fault=Fault(0, 3, "kill"), timeout_s=60, colocated_device="cpu")
    assert e.value.rank == 0 and time.monotonic() - t < 70
    [report] = e.value.reports
    assert sorted(r.id for r in report.requests) == list(range(len(reqs)))
    assert report.num_finished + report.num_failed == len(reqs) and report.num_failed >= 1
    assert all(r.reason for r in report.requests if r.status != FINISHED)


def test_weights_and_handoff_slots_shared_by_ipc_give_greedy_tokens():
    """weights='ipc' on the CPU: the launcher's tensors in shared memory and the KV through shared hand-off slots
    (the protocol a GPU runs by CUDA IPC); every request finished with single-request greedy decoding's tokens,
    its KV merged from a slot."""
    torch.set_num_threads(1)
    plan = evaluate_schedule(SplitwiserSchedule(6, 96, 50, 50, block_size=8), W, profile=Profile.load(PROFILE),
                             devices="1xcpu")
    reqs = make_requests(W, 16, vocab_size=256, seed=5)
    rep = run_plan(plan, "tiny", requests=reqs, keep_tokens=True, log_decisions=True, timeout_s=120, weights="ipc",
                   colocated_device="cpu")
    model, _, _ = load_model("tiny")
    assert sorted(r.id for r in rep.requests) == list(range(len(reqs)))
    for r in rep.requests:
        assert r.status == FINISHED and list(r.tokens) == greedy_reference(model, list(reqs[r.id].prompt),
                                                                           reqs[r.id].output_len), r.id
    merged = [rid for d in rep.decisions if d.startswith("decode Merge") for rid in eval(d.split("-> ")[1])]
    assert sorted(merged) == list(range(len(reqs))) and rep.num_ranks == 2 and rep.notes == ()


def _take_and_measure(rank: int, world_size: int, device, expected_env: tuple) -> dict:
    import os

    import torch.distributed as dist

    from runner.colocate import MPS_VAR, weight_residency
    from runner.colocate_ipc import model_from_shared
    from runner.launch import take_shared

    assert os.environ[MPS_VAR] == expected_env[rank][MPS_VAR]  # set before anything in the rank
    model, _ = model_from_shared(take_shared())
    with torch.inference_mode():
        model.setup_cache(2, 16)
        model.prefill(torch.arange(8), torch.tensor([4, 4]), torch.arange(2))
        sum(float(p.sum()) for p in model.parameters())  # every page of every weight read
    dist.barrier()  # both have mapped and read every page
    got = weight_residency(list(model.parameters()))
    dist.barrier()  # neither unmaps before the other measured
    return got


def test_ipc_weights_exist_once_in_memory():
    """The launcher hands the weights to two ranks (runner.launch.RankSetup): each rank holds every page of them
    resident, none privately, and the ranks' proportional shares add up to less than one copy (the launcher, which
    wrote them, maps them too): one copy, not one a process."""
    from runner.colocate import rank_env
    from runner.colocate_ipc import build_shared
    from runner.launch import RankSetup, launch

    plan = evaluate_schedule(SplitwiserSchedule(6, 96, 30, 70, block_size=8), W, profile=Profile.load(PROFILE),
                             devices="1xcpu")
    ctx = type("Ctx", (), {"plan": plan, "requests": make_requests(W, 2, vocab_size=256, seed=1)})()
    shared = build_shared("tiny", torch.float32, torch.device("cpu"), 0, {0: ctx})
    env = rank_env(plan.schedule)
    got = launch(_take_and_measure, 2, (env,), 60, setup=RankSetup(env=env, shared=shared, backend="gloo"))
    weights = sum(t.numel() * t.element_size() for t in shared.state.values())
    assert len(got) == 2 and [e[next(iter(e))] for e in env] == ["30", "70"]
    for g in got:
        assert g["rss_bytes"] >= weights and g["private_bytes"] == 0, (weights, got)
    assert sum(g["pss_bytes"] for g in got) <= weights + 8192 * len(shared.state), (weights, got)


def test_colocation_options_refused_in_one_line():
    plan = evaluate_schedule(SplitwiserSchedule(6, 96, block_size=8), W, profile=Profile.load(PROFILE),
                             devices="1xcpu")
    reqs = make_requests(W, 2, vocab_size=256, seed=4)
    with pytest.raises(ExeGPTError, match="weights='shm' unknown; expected one of file, ipc"):
        run_plan(plan, "tiny", requests=reqs, weights="shm", colocated_device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ExeGPTError, match="'cuda:0' requested but CUDA is not available"):
            run_plan(plan, "tiny", requests=reqs, colocated_device="cuda:0")
    with pytest.raises(ExeGPTError, match="colocated_device='tpu' is not a device"):
        run_plan(plan, "tiny", requests=reqs, colocated_device="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_two_processes_give_greedy_tokens():
    """Both processes on cuda:0 (gloo between them, the weights and the hand-off slots by CUDA IPC, each its MPS
    share): every request finished with the tokens of single-request greedy decoding on the same GPU; the report
    says whether MPS enforced the shares."""
    plan = evaluate_schedule(SplitwiserSchedule(6, 96, 40, 60, block_size=8), W, profile=Profile.load(PROFILE),
                             devices="1xcpu")
    reqs = make_requests(W, 16, vocab_size=256, seed=6)
    rep = run_plan(plan, "tiny", requests=reqs, keep_tokens=True, log_decisions=True, timeout_s=300)
    model, _, _ = load_model("tiny", device="cuda:0")
    assert sorted(r.id for r in rep.requests) == list(range(len(reqs)))
    for r in rep.requests:
        assert r.status == FINISHED and list(r.tokens) == greedy_reference(model, list(reqs[r.id].prompt),
                                                                           reqs[r.id].output_len), r.id
    merged = [rid for d in rep.decisions if d.startswith("decode Merge") for rid in eval(d.split("-> ")[1])]
    assert sorted(merged) == list(range(len(reqs)))
    assert len(rep.notes) == 1 and rep.notes[0].startswith("MPS "), rep.notes
    print(rep.notes[0])


def test_mps_status_reads_the_control_daemons_socket(tmp_path, monkeypatch):
    """Whether MPS acts, from the daemon's socket in CUDA_MPS_PIPE_DIRECTORY (read only; nothing touches CUDA)."""
    import socket

    from runner.colocate import mps_status

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    gpu = torch.device("cuda", 0)
    assert mps_status(torch.device("cpu")) is None
    assert mps_status(gpu).startswith(f"MPS not active: no control daemon at {tmp_path}")
    (tmp_path / "control").write_text("")  # a file left behind is no daemon
    assert mps_status(gpu).startswith("MPS not active")
    (tmp_path / "control").unlink()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "control"))
        assert mps_status(gpu).startswith(f"MPS active: a control daemon's socket is at {tmp_path}")


class _Recorder:
    """A rank's messages, recorded instead of sent (``runner.dist.Comm``'s interface)."""

    device, equal_counts, prepost = torch.device("cpu"), False, True

    def __init__(self, events: list):
        self.events = events

    def send(self, tensors, dst, tag) -> None:
        self.events.append(("send", tag, [t.clone() for t in tensors]))


def test_handoff_slots_are_filled_and_settled_before_the_metadata(monkeypatch):
    """The slot protocol in one process: the prefill side writes a batch's KV into slot batch % 2 and waits for its
    device before it sends the metadata; the decode side copies the slot into its rows and waits before returning
    (the engine's credit follows); the KV arrives exactly."""
    from runner import handoff_ring
    from runner.colocate_ipc import slot_shape
    from runner.dist import TAG_META, layout
    from runner.handoff_ring import RingDecodeStage, RingEncodeStage
    from runner.pipeline import IMPORT, PREFILL, Command
    from runner.run import remap_stages

    plan = evaluate_schedule(SplitwiserSchedule(6, 96, block_size=8), W, profile=Profile.load(PROFILE),
                             devices="1xcpu")
    enc_sr, dec_sr = layout(remap_stages(plan.stages, 2))
    events: list = []
    monkeypatch.setattr(handoff_ring, "_settle", lambda device: events.append(("settle", device.type)))
    enc_model, dec_model = load_model("tiny")[0], load_model("tiny")[0]
    ring = tuple(torch.zeros(slot_shape(enc_model.args, 4, 10)) for _ in range(2))  # batches of 4 rows, 10 tokens
    enc_model.setup_cache(4, 16)
    dec_model.setup_cache(6, 32)
    enc = RingEncodeStage(enc_model, enc_sr, None, None, 0, _Recorder(events), 1, decode_stages=[dec_sr],
                          encode_batch=4, prompt_len=10, ring=ring)
    dec = RingDecodeStage(dec_model, dec_sr, None, None, 1, _Recorder([]), 1, encode_stages=[enc_sr], encode_batch=4,
                          prompt_len=10, ring=ring)
    lens = torch.tensor([7, 10, 3])
    cmd = Command(PREFILL, torch.arange(3), seq_lens=lens, ids=torch.randint(0, 256, (20,)), req=torch.arange(3),
                  batch=3)
    enc.process(cmd, None)
    assert [e[0] for e in events] == ["settle", "send"] and events[1][1] == TAG_META  # the slot, then the metadata
    dec.process(Command(IMPORT, torch.tensor([4, 1, 5]), seq_lens=lens, req=torch.arange(3), batch=3), None)
    assert events[-1] == ("settle", "cpu") and ring[0].abs().sum() == 0 and ring[1].abs().sum() > 0  # slot 3 % 2
    for i, (src, dst) in enumerate(zip(range(3), (4, 1, 5))):
        L = int(lens[i])
        assert torch.equal(dec_model.cache.k[:, dst, :, :L], enc_model.cache.k[:, src, :, :L])
        assert torch.equal(dec_model.cache.v[:, dst, :, :L], enc_model.cache.v[:, src, :, :L])
        assert int(dec_model.cache.lengths[dst]) == L
