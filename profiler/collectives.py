"""Collective and point-to-point costs, measured with real multi-process ``torch.distributed`` groups.

vidur profiles collectives apart from the layers (``profiling/collectives/``); so do we. Each group size is one
launch of that many fresh interpreters (``python -m profiler.collectives RANK CONFIG``), rendezvousing through a
file store in a temporary folder:
gloo on CPU, NCCL (plus gloo for host tensors) on GPUs, one GPU per rank. Kernels (all seconds):

- ``allreduce(bytes)`` at ``tp = group size``: an in-place SUM all-reduce of a ``bytes`` message; the slowest
  rank's median (every rank must finish before the layer goes on). On a CPU, the slowest rank's mean with
  every rank computing between all-reduces, as a TP layer does (``_time_loaded_collective``).
- ``alltoall(bytes)`` and ``allgather(bytes)`` at ``tp = group size``: Ulysses sequence parallelism's collectives
  (``runner.ulysses``): ``all_to_all_single`` of a ``bytes`` send buffer split equally over the ranks, and
  ``all_gather_single`` of ``bytes`` from each rank; measured like the all-reduce.
- ``send_recv(bytes)`` (tp=1): a pipeline hand-off of ``bytes`` between two ranks, sent as the runner sends it
  (``runner.pipeline.send_command``: a command and its hidden states). On a CPU, the mean one-way time with the
  sender computing on after the send, as a pipeline stage does (``_time_loaded_hop``); on GPUs half of a
  ping-pong round trip.
- ``kv_handoff(bytes)`` (tp=1): WAA's KV-cache copy encode rank -> host -> decode rank: the sender copies the
  KV tensors out (device -> host on a GPU; a contiguous copy on a CPU, as ``KVCache.export_rows`` does), sends
  them over the host channel, and the receiver copies them into its cache. On a CPU, the mean one-way time of
  the batch's metadata and KV with the sender computing on after the send (``_time_loaded_hop``); on GPUs
  half of a symmetric round trip.

All three grow linearly with the message at large sizes (bandwidth-bound), so their tables extrapolate.

On a CPU each group also measures the **rank slowdown** (``Profile.rank_slowdown``): how much slower a rank
computes a fixed piece of the model's decode work (``profiler.layer.probe_regions``) as a rank of a multi-rank run
does, every rank at once and in bursts between blocking waits, than as the kernel tables are timed, alone and
back to back (``_time_slowdown``). A run's ranks share the host's cores, caches and memory bandwidth (and a
virtual machine's share of its host), and a core that idled in a wait computes its next burst slower.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from exegpt.errors import ExeGPTError
from exegpt.profile import Kernel, ProfileTable

from .timer import QUICK_REPEAT, REPEAT, WARMUP, TimingStats, time_region

log = logging.getLogger(__name__)

TIMEOUT_S = 600.0
"""Longest a group may take before its processes are killed."""
GROUP_TIMEOUT_S = 120.0
"""torch.distributed timeout of one collective (a peer that died fails the rest this fast)."""
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class CollectiveResult:
    """The tables one call of ``measure_collectives`` produced, and what it could not measure (and why)."""

    tables: tuple[ProfileTable, ...]
    skipped: dict = field(default_factory=dict)
    """``"allreduce tp=4": "needs 4 CUDA devices, found 1"``-style notes."""
    facts: dict = field(default_factory=dict)
    rank_slowdown: dict = field(default_factory=dict)
    """Group size -> ``{"factor": rank slowdown, "concurrent": rank concurrency, ...}`` (CPU groups measured with a
    ``probe_model``)."""


def measure_collectives(tp_degrees: tuple[int, ...], sizes_bytes: tuple[int, ...], *, device: str = "cpu",
                        dtype: str = "fp32", quick: bool = False, point_to_point: bool = True,
                        progress=None, probe_model: str | None = None) -> CollectiveResult:
    """All-reduce tables for every degree > 1 in ``tp_degrees``, and (``point_to_point``) send_recv and
    kv_handoff tables, over the message sizes ``sizes_bytes``.

    Args:
        tp_degrees: TP degrees of the profile; each degree > 1 is one all-reduce group size.
        sizes_bytes: message sizes (bytes), strictly increasing.
        device: 'cpu' (gloo) or 'cuda' (NCCL, one GPU per rank; sizes needing more GPUs than present are
            skipped with a note, not an error).
        dtype: element type of the messages (fp32, fp16, bf16).
        quick: fewer repetitions.
        progress: optional callable ``progress(n)`` told of every finished group (for a progress bar).
        probe_model: on a CPU, the model (preset, folder or smollm2) whose decode work measures each group's rank
            slowdown; None: not measured.

    Returns:
        ``CollectiveResult``; times are seconds.
    """
    device_type = torch.device(device).type
    groups = sorted({tp for tp in tp_degrees if tp > 1} | ({2} if point_to_point else set()))
    skipped, tables, facts, slowdown = {}, [], {}, {}
    available = torch.cuda.device_count() if device_type == "cuda" else None
    for world in groups:
        want_ar = world in tp_degrees
        want_p2p = point_to_point and world == 2
        if available is not None and available < world:
            note = f"needs {world} CUDA devices, found {available}"
            if want_ar:
                skipped[f"allreduce tp={world}"] = note
            if want_p2p:
                skipped["send_recv"] = skipped["kv_handoff"] = note
            log.warning("collectives in a group of %d not measured: %s", world, note)
            if progress:
                progress(1)
            continue
        results = run_group(world, sizes_bytes, device_type=device_type, dtype=dtype, quick=quick,
                            allreduce=want_ar, point_to_point=want_p2p,
                            probe_model=probe_model if device_type == "cpu" else None)
        facts[f"group{world}_backend"] = results.pop("backend")
        if "rank_slowdown" in results:
            slowdown[world] = results.pop("rank_slowdown")
        for name, per_size in results.items():
            kernel = Kernel(name)
            tables.append(ProfileTable(kernel=kernel, tp=world if kernel in GROUP_KERNELS else 1,
                                       xs=tuple(float(b) for b in sizes_bytes),
                                       ys=(), seconds=tuple(s["seconds_s"] for s in per_size),
                                       spread_s=tuple(s["spread_s"] for s in per_size), extrapolate=True))
        if progress:
            progress(1)
    return CollectiveResult(tables=tuple(tables), skipped=skipped, facts=facts, rank_slowdown=slowdown)


def run_group(world: int, sizes_bytes: tuple[int, ...], *, device_type: str = "cpu", dtype: str = "fp32",
              quick: bool = False, allreduce: bool = True, point_to_point: bool = False,
              probe_model: str | None = None) -> dict:
    """Spawn ``world`` processes and time the asked-for collectives; returns
    ``{"allreduce": [stats per size], "send_recv": [...], "kv_handoff": [...], "backend": str}`` with stats as
    dicts of ``TimingStats`` fields plus ``spread_s`` (seconds), and ``"rank_slowdown": {"factor": f, ...}``
    with a ``probe_model``."""
    if world < 2:
        raise ExeGPTError(f"a collective group needs at least 2 processes, got {world}")
    if dtype not in TORCH_DTYPES:
        raise ExeGPTError(f"dtype {dtype!r} unknown; expected one of {', '.join(TORCH_DTYPES)}")
    repeat = QUICK_REPEAT if quick else REPEAT
    with tempfile.TemporaryDirectory(prefix="exegpt-coll-") as tmp:
        out = Path(tmp) / "result.json"
        config = {"world": world, "store": str(Path(tmp) / "store"), "out": str(out), "device_type": device_type,
                  "dtype": dtype, "sizes_bytes": list(sizes_bytes), "repeat": repeat, "allreduce": allreduce,
                  "point_to_point": point_to_point, "probe_model": probe_model}
        _launch(config, Path(tmp))
        return json.loads(out.read_text())


def _launch(config: dict, tmp: Path, module: str = "profiler.collectives") -> None:
    """Start ``world`` fresh interpreters running ``module``'s ``main`` (this module's by default; not
    ``multiprocessing.spawn``, which re-imports the caller's ``__main__`` and so breaks unguarded scripts and
    notebooks); wait for all of them."""
    world = config["world"]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # so that children import this checkout
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs, logs = [], []
    for rank in range(world):
        log_path = tmp / f"rank{rank}.log"
        logs.append(log_path)
        with open(log_path, "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-m", module, str(rank),
                                           json.dumps(config)], stdout=f, stderr=subprocess.STDOUT, env=env))
    failed = None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # Poll every rank: one that dies leaves the others blocked in a collective, so do not wait in order.
        while failed is None and any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                failed = (-1, f"timed out after {TIMEOUT_S:.0f} s")
            time.sleep(0.05)
            for rank, p in enumerate(procs):
                if p.poll() not in (None, 0) and failed is None:
                    failed = (rank, f"exit code {p.returncode}")
        if failed is None:
            failed = next(((r, f"exit code {p.returncode}") for r, p in enumerate(procs) if p.returncode), None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed is not None:
        rank, rc = failed
        lines = [ln.strip() for i in range(world) for ln in logs[i].read_text(errors="replace").splitlines()
                 if ln.strip()] if rank < 0 else \
            [ln.strip() for ln in logs[rank].read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {rc}"
        raise ExeGPTError(f"collective measurement in a group of {world} failed (rank {rank}, {rc}): {last}")


def main(argv: list[str] | None = None) -> None:
    """Entry of one spawned rank: ``python -m profiler.collectives RANK CONFIG_JSON``."""
    argv = sys.argv[1:] if argv is None else argv
    rank, c = int(argv[0]), json.loads(argv[1])
    _worker(rank, c["world"], c["store"], c["out"], c["device_type"], c["dtype"], tuple(c["sizes_bytes"]),
            c["repeat"], c["allreduce"], c["point_to_point"], c.get("probe_model"))


def _worker(rank: int, world: int, store: str, out: str, device_type: str, dtype: str,
            sizes_bytes: tuple[int, ...], repeat: int, allreduce: bool, point_to_point: bool,
            probe_model: str | None = None) -> None:
    """One rank of a launched group: join the group, time, and (rank 0) write the results as JSON."""
    # One compute thread per rank: ranks share the machine's cores, and the message copies are memory-bound.
    torch.set_num_threads(1)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        tdtype = TORCH_DTYPES[dtype]
        result: dict = {"backend": backend}
        # Group warm-up: the first collectives of a fresh group pay for connection setup.
        w = torch.ones(1024, dtype=tdtype, device=device)
        for _ in range(20):
            dist.all_reduce(w)
            dist.barrier()
        if allreduce:  # and the sequence-parallel collectives of the same group
            for kernel in GROUP_KERNELS:
                op = kernel.value
                if device.type == "cpu":
                    result[op] = _pool_tail(_sweep_sizes(
                        lambda b: _reduce_max(_time_loaded_collective(b, tdtype, device, repeat, op), device,
                                              mean=True), sizes_bytes, device))
                else:
                    result[op] = _sweep_sizes(
                        lambda b: _reduce_max(_time_collective(b, tdtype, device, repeat, op), device), sizes_bytes,
                        device)
        if point_to_point:
            # Only ranks 0 and 1 talk; rank 0's clock is the one reported (and shared, so all ranks agree).
            for name, host_copy in (("send_recv", False), ("kv_handoff", True)):
                if device.type == "cpu":
                    time_one = lambda b: _from_rank(  # noqa: E731
                        _time_loaded_hop(rank, b, tdtype, device, repeat, kv=host_copy), device, 1)
                else:
                    time_one = lambda b: _from_rank(  # noqa: E731
                        _time_ping_pong(rank, b, tdtype, device, repeat, host_copy), device)
                result[name] = _sweep_sizes(time_one, sizes_bytes, device)
                if device.type == "cpu":
                    result[name] = _pool_tail(result[name])
        if probe_model is not None and device.type == "cpu":
            result["rank_slowdown"] = _time_slowdown(rank, world, probe_model, tdtype, repeat)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


SPIKE = 1.3
"""A size whose median exceeds this factor times the next larger size's is background noise: re-timed."""


def _sweep_sizes(time_one, sizes_bytes: tuple[int, ...], device: torch.device, passes: int = 3) -> list[dict]:
    """``time_one(b)`` for every size, then sizes slower than the next larger one re-timed (lower median kept).
    ``time_one`` returns the same numbers on every rank, so every rank re-times the same sizes (collectives)."""
    res = [time_one(b) for b in sizes_bytes]
    for _ in range(passes):
        bad = [i for i in range(len(res) - 1) if res[i]["median_s"] > SPIKE * res[i + 1]["median_s"]]
        if not bad:
            break
        for i in bad:
            again = time_one(sizes_bytes[i])
            if again["median_s"] < res[i]["median_s"]:
                res[i] = again
    return res


def _pool_tail(per_size: list[dict]) -> list[dict]:
    """Loaded hand-offs: each size's median plus the tail (mean - median) pooled over all sizes.

    The tail is the rare multi-millisecond stall of gloo's background writes, which does not depend on the
    message size; a few of them in one size's sample would swing that size's mean by tens of percent, so
    the excess is averaged over every size (equal sample counts) instead.
    """
    excess = sum(d["seconds_s"] - d["median_s"] for d in per_size) / len(per_size)
    return [d | {"seconds_s": d["median_s"] + max(excess, 0.0)} for d in per_size]


def _from_rank(stats: dict | None, device: torch.device, src: int = 0) -> dict:
    """Rank ``src``'s numbers on every rank (what the other ranks pass, None included, is overwritten)."""
    keys = ("median_s", "p10_s", "p90_s", "seconds_s", "repeat")
    v = torch.tensor([float(stats[k]) for k in keys] if stats is not None else [0.0] * len(keys),
                     dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(v, src=src)
    d = dict(zip(keys, v.tolist()))
    return d | {"spread_s": d["p90_s"] - d["p10_s"], "repeat": int(d["repeat"])}


def _elements(nbytes: int, dtype: torch.dtype) -> int:
    return max(1, int(nbytes) // torch.tensor([], dtype=dtype).element_size())


def _stats_dict(s: TimingStats, seconds_s: float | None = None) -> dict:
    """``s`` as a dict; ``seconds_s`` (default: the median) is the statistic the profile table keeps."""
    return {"median_s": s.median_s, "p10_s": s.p10_s, "p90_s": s.p90_s, "spread_s": s.spread_s,
            "seconds_s": s.median_s if seconds_s is None else seconds_s, "repeat": s.repeat}


GROUP_KERNELS = (Kernel.ALLREDUCE, Kernel.ALLTOALL, Kernel.ALLGATHER)
"""Collectives of a whole group, tabled at ``tp`` = the group size."""


def _collective(op: str, nbytes: int, dtype: torch.dtype, device: torch.device):
    """A call of collective ``op`` on a ``nbytes`` message (all-to-all: the send buffer, padded to a multiple of
    the group size; all-gather: each rank's part)."""
    world = dist.get_world_size()
    n = _elements(nbytes, dtype)
    if op == "allreduce":
        t = torch.ones(n, dtype=dtype, device=device)
        return lambda: dist.all_reduce(t)
    if op == "alltoall":
        n = -(-n // world) * world
        src, dst = torch.ones(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device)
        return lambda: dist.all_to_all_single(dst, src)
    src, dst = torch.ones(n, dtype=dtype, device=device), torch.empty(n * world, dtype=dtype, device=device)
    return lambda: dist.all_gather_single(dst, src)


def _time_collective(nbytes: int, dtype: torch.dtype, device: torch.device, repeat: int, op: str = "allreduce"
                     ) -> TimingStats:
    call = _collective(op, nbytes, dtype, device)
    # Ranks enter every repetition together, so that a rank's time is the collective, not its wait for others.
    return time_region(call, warmup=WARMUP, repeat=repeat, device=device, setup=dist.barrier)


def _time_loaded_collective(nbytes: int, dtype: torch.dtype, device: torch.device, repeat: int,
                            op: str = "allreduce") -> TimingStats:
    """A collective ``op`` (``_collective``) as a TP or SP layer on a shared CPU makes it: every rank computes
    ``TP_BUSY_S``, then calls it, with no barrier between repetitions. This rank's statistics; the table keeps the
    slowest rank's **mean** (``_reduce_max(..., mean=True)``).

    NOTE: on the 2-core development VM two TP ranks' all-reduces inside a decode run took 0.6-0.9 ms median and
    1.6-1.8 ms mean (p90 ~4 ms) against ~0.3 ms back to back between barriers: gloo runs each collective on
    its worker thread and moves the bytes on its device thread, and each wake-up waits for a core that the
    ranks' compute holds. A TP step pays the mean, so that is what the profile keeps (``_time_collective``, the
    idle measurement, is what GPUs get).
    """
    call = _collective(op, nbytes, dtype, device)
    samples = []
    dist.barrier()
    for i in range(WARMUP + max(LOADED_HOPS, 10 * repeat)):
        _busy(TP_BUSY_S)
        t0 = time.perf_counter()
        call()
        if i >= WARMUP:
            samples.append(time.perf_counter() - t0)
    return TimingStats.from_samples(samples)


def _reduce_max(stats: TimingStats, device: torch.device, mean: bool = False) -> dict:
    """The slowest rank's numbers (a layer waits for the last rank to finish its all-reduce); the table keeps
    the median, or the mean with ``mean``."""
    v = torch.tensor([stats.median_s, stats.p10_s, stats.p90_s, stats.mean_s], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    med, p10, p90, avg = v.tolist()
    return {"median_s": med, "p10_s": p10, "p90_s": p90, "spread_s": p90 - p10, "seconds_s": avg if mean else med,
            "repeat": stats.repeat}


LOADED_BUSY_S = 1e-3
"""How long the sending stage computes after each timed hand-off (``_time_loaded_hop``)."""

TP_BUSY_S = 2e-4
"""How long each rank computes between timed all-reduces (``_time_loaded_collective``): about one half-layer of
a small model's decode step on a CPU."""

LOADED_HOPS = 200
"""Timed hand-offs per size in ``_time_loaded_hop`` (at least; 10 x the kernels' repeat count)."""


SLOWDOWN_ROUNDS = 5
"""Rounds of (every rank at once in bursts, every rank at once back to back, then each rank alone) in
``_time_slowdown``."""
SLOWDOWN_WAIT_S = 1e-3
"""The idle wait before every timed call of the together condition: a rank of a multi-rank run computes in bursts
between blocking waits for its messages."""


def _time_slowdown(rank: int, world: int, model: str, dtype: torch.dtype, repeat: int) -> dict:
    """The group's rank slowdown: per rank, the median over ``SLOWDOWN_ROUNDS`` of its probe time (the summed
    medians of ``probe_regions``) as a rank of a multi-rank run computes, over the median of its probe as the kernel
    tables are timed; the factor is the mean over ranks (pipeline stages and TP shards all run at once).

    - together: every rank at once, each call after a ``SLOWDOWN_WAIT_S`` sleep (a burst after a blocking wait);
    - concurrent: every rank at once, calls back to back: ``concurrent`` (``Profile.rank_concurrency``), the
      sharing alone, as a one-rank WAA group computes beside the other group;
    - alone: one rank, the others waiting in a barrier, calls back to back.

    NOTE (2-core KVM development VM): both matter and both vary by the hour. A stage's decode layer computed
    after a 1 ms sleep took 0.73-1.0 ms against 0.61-0.65 back to back, and with the other core busy too
    1.0-1.1 ms in some hours and 0.63 in others; two pipeline stages of ``tiny`` computed each micro-batch in
    1.29 / 1.35 ms (median, traced) against 0.63 / 0.71 ms alone. Rounds interleave the three conditions, so that
    all three see the same background load."""
    import statistics

    from .layer import probe_regions
    from .timer import time_interleaved

    fns = [fn for fn, _ in probe_regions(model, dtype)]
    n = max(10, repeat // 2)

    def back_to_back() -> float:
        return sum(s.median_s for s in time_interleaved(fns, warmup=3, repeat=n))

    def in_bursts() -> float:
        return sum(s.median_s for s in time_interleaved(fns, warmup=0, repeat=n, idle_s=SLOWDOWN_WAIT_S))

    back_to_back()  # warm: caches, the kernels' first calls
    together, concurrent, solo = [], [], []
    for _ in range(SLOWDOWN_ROUNDS):
        dist.barrier()
        together.append(in_bursts())
        dist.barrier()
        concurrent.append(back_to_back())
        for r in range(world):
            dist.barrier()
            if r == rank:
                solo.append(back_to_back())
    ratio = torch.tensor([statistics.median(together) / statistics.median(solo),
                          statistics.median(concurrent) / statistics.median(solo)], dtype=torch.float64)
    ratios = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(ratios, ratio)
    per_rank = [float(x[0]) for x in ratios]
    per_rank_concurrent = [float(x[1]) for x in ratios]
    return {"factor": statistics.mean(per_rank), "per_rank": per_rank,
            "concurrent": statistics.mean(per_rank_concurrent), "per_rank_concurrent": per_rank_concurrent,
            "model": model}


def _busy(seconds: float) -> None:
    """Occupies this rank's core for ``seconds`` (a stage computing its next micro-batch)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _time_loaded_hop(rank: int, nbytes: int, dtype: torch.dtype, device: torch.device, repeat: int,
                     kv: bool = False) -> dict | None:
    """One-way time of a hand-off as the runner makes it on a CPU, with the sender computing on at once after
    sending; rank 1 notes when it has the data. Returns rank 1's statistics (None on the other ranks); the
    table keeps the **mean**.

    - pipeline hand-off (``kv`` False): a DECODE command with ``nbytes`` of hidden states (``send_command``);
    - WAA's KV hand-off (``kv`` True): the batch's metadata, then ``nbytes`` of KV copied out of the encode
      rank's cache into a receive the decode rank posted beforehand; it takes the metadata, waits for the KV
      and copies it into its cache (``runner.handoff``).

    NOTE: on a shared CPU host gloo writes all but the first message of a burst from its own background thread,
    which must wait for a core while both ranks compute: on the 2-core development VM most hops take ~0.1 ms
    and about one in twenty takes 4-15 ms (scheduler ticks). An idle ping-pong sees only the fast hops; the
    pipeline's throughput pays the mean, so that is what the profile keeps. Both ranks share CLOCK_MONOTONIC
    (one host), so the send time travels with the message.
    """
    from runner.dist import TAG_KV, TAG_META, Comm
    from runner.pipeline import DECODE, STOP, Command, CommandInbox, _i64, inline_bytes, send_command

    comm, width, n = Comm(device), 64, _elements(nbytes, dtype)
    rows = max(1, n // width)
    hidden = torch.ones(rows, width, dtype=dtype, device=device)
    cache = torch.ones(n, dtype=dtype, device=device)
    inline = inline_bytes(width, dtype)
    # A pipeline stage keeps its next command's receive posted (runner.pipeline.CommandInbox)
    inbox = CommandInbox(comm, 0, width, dtype) if rank == 1 and not kv else None

    def send() -> None:
        if kv:
            comm.send([_i64([time.perf_counter_ns()])], 1, TAG_META)
            comm.send([cache.clone()], 1, TAG_KV)  # export: a copy out of the cache
        else:
            send_command(comm, Command(DECODE, _i64(range(rows)), time_ns=time.perf_counter_ns()), hidden, 1,
                         inline)

    landing = torch.empty(n, dtype=dtype, device=device)

    def recv(posted) -> int:
        """The send time (ns) of what arrived."""
        if kv:
            sent = int(comm.recv((1,), torch.long, 0, TAG_META)[0])
            posted.wait()
            cache.copy_(landing)  # import into the cache
            return sent
        return inbox.next()[0].time_ns

    samples = []
    for i in range(WARMUP + max(LOADED_HOPS, 10 * repeat)):  # the mean is set by a rare tail: many hops
        # WAA's decode ranks post the KV receive before the batch is sent (runner.handoff.DecodeStage)
        posted = dist.irecv(landing, 0, tag=TAG_KV) if kv and rank == 1 else None
        dist.barrier()
        if rank == 0:
            send()
            _busy(LOADED_BUSY_S)
            comm.flush()
        elif rank == 1:
            sent = recv(posted)
            if i >= WARMUP:
                samples.append((time.perf_counter_ns() - sent) / 1e9)
    if not kv:  # ends the inbox without a receive left posted
        if rank == 0:
            send_command(comm, Command(STOP, _i64([])), None, 1, inline)
            comm.flush()
        elif rank == 1:
            inbox.next()
    if rank != 1:
        return None
    s = TimingStats.from_samples(samples)
    return _stats_dict(s, seconds_s=s.mean_s)


def _time_ping_pong(rank: int, nbytes: int, dtype: torch.dtype, device: torch.device, repeat: int,
                    host_copy: bool) -> dict:
    """Half of a round trip 0 -> 1 -> 0 of ``nbytes``. With ``host_copy`` each leg is the KV hand-off path:
    copy out of the cache (to host on a GPU), send over the host channel, copy into the receiver's cache."""
    n = _elements(nbytes, dtype)
    cache = torch.ones(n, dtype=dtype, device=device)      # the KV rows being handed off (sender's cache)
    peer = 1 - rank if rank < 2 else None

    # A pipeline hand-off is what the runner sends between stages: a DECODE command (header, rows) and the
    # hidden states, through runner.pipeline's send_command into the receiver's CommandInbox.
    from runner.dist import Comm
    from runner.pipeline import DECODE, STOP, Command, CommandInbox, _i64, inline_bytes, send_command

    comm, width = Comm(device), 64
    rows = max(1, n // width)
    hidden = torch.ones(rows, width, dtype=dtype, device=device)
    cmd = Command(DECODE, _i64(range(rows)))
    inline = inline_bytes(width, dtype)
    inbox = CommandInbox(comm, peer, width, dtype) if peer is not None and not host_copy else None

    def leg_send():
        if host_copy:
            dist.send(cache.to("cpu", copy=True), peer)     # export (device -> host, or a contiguous copy)
        else:
            send_command(comm, cmd, hidden, peer, inline)
            comm.flush()

    def leg_recv():
        if host_copy:
            host = torch.empty(n, dtype=dtype)
            dist.recv(host, peer)
            cache.copy_(host)                               # import into the receiver's cache
        else:
            inbox.next()

    def round_trip():
        if rank == 0:
            leg_send()
            leg_recv()
        elif rank == 1:
            leg_recv()
            leg_send()

    stats = time_region(round_trip, warmup=WARMUP, repeat=repeat, device=device, setup=dist.barrier)
    if inbox is not None:  # end both inboxes without a receive left posted
        send_command(comm, Command(STOP, _i64([])), None, peer, inline)
        inbox.next()
        comm.flush()
    d = _stats_dict(stats)
    return {k: (v / 2 if k != "repeat" else v) for k, v in d.items()}



if __name__ == "__main__":
    from runner.launch import exit_rank

    main()
    exit_rank()  # skip finalization, which can abort after a gloo group (see exit_rank)
