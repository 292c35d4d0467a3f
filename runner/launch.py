"""Process launch and failure handling for plan execution.

A run with P ranks uses P processes. Here (CPU) they are started with ``torch.multiprocessing`` (spawn), join
gloo through ``tcp://127.0.0.1:<free port>`` and use one thread each; under ``torchrun`` the same rank function
runs in the already-started processes (``env://``, NCCL when CUDA is available).

Failure handling: the launcher polls its processes; when one raises or dies (SIGKILL included), the others are
terminated and ``RankFailedError`` names the rank. A run that exceeds its wall-clock limit (a message that never
arrives, a rank that hangs) is terminated the same way. While they run, ranks ``publish`` partial results (finished
requests) to the launcher, which hands them to ``launch``'s ``on_partial``: what a run finished survives the rank
that held it.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import pickle
import queue
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from exegpt.errors import ExeGPTError

from .tp import free_port

log = logging.getLogger(__name__)


class RankFailedError(RuntimeError):
    """A rank of a multi-process run raised, died or hung; ``rank`` is its index (-1 when unknown).

    ``reports``: from ``runner.run_plans``, one ``RunReport`` per plan of the failed set of processes (None for
    the others): every request of it finished (as the ranks reported before the failure) or failed with this
    error as its reason."""

    def __init__(self, message: str, rank: int = -1):
        super().__init__(message)
        self.rank = rank
        self.reports: list = []


FAULT_KINDS = ("raise", "kill", "hang")


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault to inject (tests, fault drills): rank ``rank`` fails once it has executed ``after`` commands, by
    ``kind``: 'raise' an exception, 'kill' itself with SIGKILL (no exception, no cleanup, as the OOM killer does),
    or 'hang' (execute and send nothing more, as a lost message or a wedged device does)."""

    rank: int
    after: int
    kind: str = "raise"

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ExeGPTError(f"fault kind {self.kind!r} unknown; expected one of {', '.join(FAULT_KINDS)}")
        if self.rank < 0 or self.after < 0:
            raise ExeGPTError(f"fault rank {self.rank} and after {self.after} must be >= 0")

    def strike(self, rank: int, executed: int) -> None:
        """Fails as ``kind`` says if ``rank`` is the faulty one and has executed ``after`` commands."""
        if rank != self.rank or executed < self.after:
            return
        if self.kind == "kill":
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "hang":
            while True:
                time.sleep(3600)
        raise RuntimeError(f"injected fault on rank {rank} after {executed} commands")


# --- launch ------------------------------------------------------------------------------------


def torchrun_env() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_from_env(timeout_s: float) -> tuple[int, int, torch.device]:
    """Joins the default group from torchrun's environment: NCCL on ``cuda:LOCAL_RANK`` when CUDA exists."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return rank, world, comm_device()


def comm_device() -> torch.device:
    """Where this rank's message and compute tensors live: the current CUDA device under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True, slots=True)
class _Partial:
    payload: Any


@dataclass(frozen=True, slots=True)
class _Exited:
    """A rank's last message: it returned normally (``result``: what it returned, or None)."""

    rank: int
    result: Any


_RESULTS = None
"""The launcher's result queue, in a spawned rank (None in-process and under torchrun)."""
_INBOX = None
"""The launcher's queue of what it shares with the ranks (``RankSetup.shared``), in a spawned rank."""
_TAKEN: list = []
"""What this rank took from ``_INBOX`` (once: a rank that runs several plans reuses it)."""


@dataclass(frozen=True)
class RankSetup:
    """What ``launch`` gives each spawned rank besides its arguments.

    ``env``: per rank, environment variables set first thing in the process, before anything in it can
    initialize CUDA (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` is read when CUDA initializes). ``shared``: an object
    the launcher hands over through a ``torch.multiprocessing`` queue, whose reductions pass tensors as shared
    memory (CPU) or CUDA IPC handles (GPU), not as copies; a rank takes it with ``take_shared()``, after its
    environment is set. The launcher holds ``shared`` until every rank exited: a CUDA tensor's producer must
    outlive its consumers."""

    env: tuple[dict[str, str], ...] = ()
    shared: Any = None
    backend: str | None = None
    """The ranks' process group backend; None: NCCL where there are as many GPUs as ranks, else gloo. Ranks that
    share one GPU take gloo (NCCL refuses two ranks on one device)."""


def take_shared() -> Any:
    """The launcher's ``RankSetup.shared`` (the same object on every call), or None where none was shared."""
    if _INBOX is None:
        return None
    if not _TAKEN:
        _TAKEN.append(_INBOX.get())
    return _TAKEN[0]


def can_publish() -> bool:
    """Whether ``publish`` reaches a launcher (spawned ranks)."""
    return _RESULTS is not None


def publish(payload: Any) -> None:
    """Sends ``payload`` to the launcher (``launch``'s ``on_partial``) without waiting for it to be read; once
    written it survives this rank's death. No-op where no launcher listens."""
    if _RESULTS is not None:
        _RESULTS.put(_Partial(payload))


def _spawn_entry(rank: int, world_size: int, port: int, fn: Callable, args_path: str, results, timeout_s: float,
                 setup: RankSetup, inbox):
    global _RESULTS, _INBOX
    os.environ.update(setup.env[rank] if setup.env else {})  # before anything here initializes CUDA (below)
    _RESULTS, _INBOX = results, inbox
    with open(args_path, "rb") as f:
        args = pickle.load(f)
    if world_size > 1:
        torch.set_num_threads(1)  # P processes share the cores; one thread each avoids oversubscription
    backend = setup.backend or \
        ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        out = fn(rank, world_size, comm_device(), *args)
    except BaseException:
        # Exit at once (no group teardown, which could wait on peers); the launcher names this rank.
        traceback.print_exc()
        raise
    _TAKEN.clear()  # what the launcher shared, freed here: a CUDA IPC producer's count of users drops now, where
    gc.collect()  # exit_rank below would skip it and leave the launcher's copy held until it exits
    results.put(_Exited(rank, out))
    results.close()
    results.join_thread()  # everything this rank put is written before the process ends
    dist.destroy_process_group()
    exit_rank()


def exit_rank() -> NoReturn:
    """Ends a rank process whose work and group teardown are done, without interpreter finalization.

    NOTE: under load, a torch 2.13 rank that used gloo now and then aborts *after* its work, while the
    interpreter finalizes ('terminate called without an active exception', SIGABRT; in about one of three
    runs of the runner tests on two loaded cores without this). Forked children end with
    ``os._exit`` too; spawned ones otherwise run the finalizers.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 600.0,
           on_partial: Callable[[Any], None] | None = None, setup: RankSetup = RankSetup()) -> list:
    """Runs ``fn(rank, world_size, device, *args)`` in ``world_size`` spawned processes and returns the
    non-None results the ranks returned (in rank order). What ranks ``publish`` meanwhile goes to
    ``on_partial`` as it arrives, also when the run then fails. ``setup``: each rank's environment and what the
    launcher shares with the ranks (``RankSetup``).

    Raises:
        RankFailedError: a rank raised or died (the others are terminated), or the run exceeded ``timeout_s``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()  # each rank's feeder thread writes its puts: a rank never waits for the launcher
    port = free_port()
    if setup.env and len(setup.env) != world_size:
        raise ExeGPTError(f"launch: {len(setup.env)} rank environments for {world_size} ranks")
    inbox = None
    if setup.shared is not None:
        inbox = ctx.Queue()  # written by a feeder thread: the launcher never blocks on a rank that died unread
        inbox.cancel_join_thread()  # nor, at its exit, on what a dead rank left unread
        for _ in range(world_size):
            inbox.put(setup.shared)
    # The arguments (a run's requests: hundreds of KB) go through a file. multiprocessing writes each child's
    # startup payload into a pipe that it closes only afterwards, so a payload beyond the pipe's 64 KB blocks the
    # launcher for good when a child dies before reading it (measured: a launch from a script on stdin, whose
    # children cannot re-import their __main__, hung instead of naming the dead rank).
    with tempfile.TemporaryDirectory(prefix="exegpt-launch-") as tmp:
        args_path = os.path.join(tmp, "args.pickle")
        with open(args_path, "wb") as f:
            pickle.dump(args, f, protocol=pickle.HIGHEST_PROTOCOL)
        spawn_args = (world_size, port, fn, args_path, results, timeout_s, dataclasses.replace(setup, shared=None),
                      inbox)  # what is shared goes through the inbox: unpickled here it could initialize CUDA
        pctx = mp.start_processes(_spawn_entry, args=spawn_args, nprocs=world_size, join=False,
                                  start_method="spawn")
        return _supervise(pctx, _Reader(results), world_size, timeout_s, on_partial or (lambda payload: None))


class _Reader:
    """Reads the ranks' queue on a daemon thread, so the launcher never blocks on it: a rank killed in the middle
    of writing a message leaves the queue's pipe holding half of it, and a read would wait for the rest forever.
    The supervisor takes what was read from a local queue, and gives up on the reader once the run has failed."""

    def __init__(self, results):
        import threading

        self.items: queue.Queue = queue.Queue()
        self._results = results
        threading.Thread(target=self._read, name="rank-results", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                self.items.put(self._results.get())
            except (EOFError, OSError):
                return

    def take(self, timeout_s: float = 0.0):
        """The next item read (waiting up to ``timeout_s``), or None."""
        try:
            return self.items.get(timeout=timeout_s) if timeout_s > 0 else self.items.get_nowait()
        except queue.Empty:
            return None


def _supervise(pctx, reader: _Reader, world_size: int, timeout_s: float, on_partial: Callable[[Any], None]
               ) -> list:
    """Collects the ranks' results until every rank exited; raises RankFailedError as ``launch`` says."""
    deadline = time.monotonic() + timeout_s
    exited: dict[int, Any] = {}

    def handle(item) -> None:
        if isinstance(item, _Partial):
            on_partial(item.payload)
        elif isinstance(item, _Exited):
            exited[item.rank] = item.result

    def drain() -> None:
        while (item := reader.take()) is not None:
            handle(item)

    try:
        while True:
            drain()
            try:
                if pctx.join(timeout=0.2):
                    break
            except mp.ProcessRaisedException as e:
                rank, msg = _first_failure(pctx, e.error_index, str(e))
                raise RankFailedError(f"rank {rank} failed: {_last_line(msg)}", rank) from None
            except mp.ProcessExitedException as e:
                raise RankFailedError(f"rank {e.error_index} died (exit code {e.exit_code}"
                                      f"{', ' + e.signal_name if e.signal_name else ''})", e.error_index) from None
            if time.monotonic() > deadline:
                alive = [i for i, p in enumerate(pctx.processes) if p.is_alive()]
                raise RankFailedError(f"run exceeded {timeout_s:.0f} s; ranks {alive} still running were "
                                      f"terminated", alive[0] if alive else -1)
        # Every rank exited normally, each after writing its last message: read up to them.
        wait_until = time.monotonic() + 30.0
        while len(exited) < world_size and (item := reader.take(max(0.0, wait_until - time.monotonic()))):
            handle(item)
        if len(exited) < world_size:
            missing = sorted(set(range(world_size)) - set(exited))
            raise RankFailedError(f"ranks {missing} exited without their results", missing[0])
    finally:
        for p in pctx.processes:
            if p.is_alive():
                p.terminate()
        for p in pctx.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
        time.sleep(0.05)  # what the ranks wrote last reaches the reader
        drain()
    return [exited[r] for r in sorted(exited) if exited[r] is not None]


def _first_failure(pctx, rank: int, msg: str) -> tuple[int, str]:
    """The rank that failed first (its error file is the oldest) and its traceback: when one rank raises, its
    peers then fail on the closed connection, and the launcher may notice one of those first."""
    time.sleep(0.2)  # let a root failure that is still being written land
    best = None
    for i, path in enumerate(pctx.error_files):
        try:
            mtime = os.path.getmtime(path)
            if os.path.getsize(path) == 0:
                continue
            with open(path, "rb") as f:
                text = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError):
            continue
        if best is None or mtime < best[0]:
            best = (mtime, i, str(text))
    return (best[1], best[2]) if best is not None else (rank, msg)


def _last_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else msg
