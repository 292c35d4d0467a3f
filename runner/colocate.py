"""Processes that share one device (Splitwiser): one copy of the weights in every process, and each process's
share of the device.

Weights, two ways (``RunOptions.weights``):
  * ``"file"`` (the CPU's default): the launching process builds the model once and writes its state to a file in
    shared memory (``/dev/shm``); each rank maps that file (``torch.load(mmap=True)``), so the pages of the weights
    exist once in memory whatever the number of processes (``weight_residency`` reads what each process holds).
  * ``"ipc"`` (a GPU's only way, and an option on a CPU): the launching process builds the model on the device and
    hands its tensors to the ranks through a ``torch.multiprocessing`` queue, as CUDA IPC handles on a GPU and as
    shared-memory segments on a CPU (``runner.colocate_ipc``), together with the slots of the KV hand-off
    (``runner.handoff_ring``).
The model code never writes a weight; derived copies a process builds for speed (a oneDNN-prepacked copy of large
fp32 Linear weights at prefill, the decode kernels' panels) are its own.

Shares: on a CPU a process runs ``threads(share, cores)`` threads; on a GPU its share is its
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, which CUDA reads when it initializes in the process: the launcher puts it
in each rank's environment before anything there touches CUDA (``rank_env``, ``runner.launch.RankSetup``), and
``enter_process`` refuses a process whose CUDA started without it. The percentage acts only where an MPS control
daemon runs (``mps_status``); without one the two processes time-slice the GPU, which a run reports in one line.
This module never starts or stops a daemon nor changes a GPU setting.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from exegpt.errors import ExeGPTError

from .device import resolve_device
from .launch import RankSetup

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
MPS_VAR = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
WEIGHTS = ("file", "ipc")


def device_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def colocated_device(name: str | None) -> torch.device:
    """The device both processes compute on: ``name`` ('cpu', 'cuda' or 'cuda:N'), by default the first GPU
    where CUDA is available, else the CPU; one line for a device this host does not have."""
    dev = resolve_device(name, "colocated_device")
    return torch.device("cuda", dev.index or 0) if dev.type == "cuda" else dev


def weights_mode(weights: str | None, device: torch.device) -> str:
    """How the processes share the weights on ``device`` (``WEIGHTS``): by default a mapped file on a CPU and
    CUDA IPC on a GPU, where a host file cannot hold them."""
    if weights is None:
        return "file" if device.type == "cpu" else "ipc"
    if weights not in WEIGHTS:
        raise ExeGPTError(f"weights={weights!r} unknown; expected one of {', '.join(WEIGHTS)}")
    if weights == "file" and device.type != "cpu":
        raise ExeGPTError(f"weights='file' maps a host file, but the processes compute on {device}; a GPU's "
                          f"weights are shared by CUDA IPC (weights='ipc')")
    return weights


def check_device(device: torch.device, schedule) -> None:
    """One line for a share the device cannot honour: on a GPU, an MPS percentage that leaves a process less than
    one of its multiprocessors (a CPU process gets at least one thread whatever its share)."""
    if device.type != "cuda":
        return
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for name in ("prefill_share", "decode_share"):
        share = getattr(schedule, name)
        if share * sms < 100:
            raise ExeGPTError(f"splitwiser: {name}={share}% of {device}'s {sms} multiprocessors is less than one; "
                              f"at least {-(-100 // sms)}% needed")


def rank_env(schedule) -> tuple[dict[str, str], ...]:
    """Each rank's environment (rank 0 the prefill process, rank 1 the decode process): its share as
    ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, set before its CUDA initializes (inert on a CPU)."""
    return ({MPS_VAR: str(schedule.prefill_share)}, {MPS_VAR: str(schedule.decode_share)})


def mps_status(device: torch.device) -> str | None:
    """One line: whether an MPS control daemon is reachable from here (its pipe directory,
    ``CUDA_MPS_PIPE_DIRECTORY``, default ``/tmp/nvidia-mps``, holds its ``control`` socket; a plain file left
    behind does not count), so whether the shares act; None on a CPU. Reads only: never starts a daemon."""
    if device.type != "cuda":
        return None
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps")
    try:
        mode = (pipe / "control").stat().st_mode
    except OSError:
        mode = 0
    if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
        return f"MPS active: a control daemon's socket is at {pipe}; each process's share is its {MPS_VAR}"
    return (f"MPS not active: no control daemon at {pipe} (CUDA_MPS_PIPE_DIRECTORY); the two processes "
            f"time-slice {device} and their shares are not enforced")


def enter_process(schedule, group: str) -> int:
    """Gives this process its share of the device: its thread count on a CPU (returned; the host threads of a GPU
    process); on a GPU the MPS percentage, which must be in the environment before CUDA initializes here."""
    from exegpt.policies.splitwiser import threads

    share = schedule.share(group)
    if os.environ.get(MPS_VAR) != str(share):
        if torch.cuda.is_initialized():
            raise ExeGPTError(f"the {group} process's {MPS_VAR}={share} must be set before CUDA initializes in "
                              f"it (runner.launch.RankSetup.env), but CUDA already runs with "
                              f"{os.environ.get(MPS_VAR)!r}")
        os.environ[MPS_VAR] = str(share)  # read when CUDA initializes; inert on a CPU
    n = threads(share, device_cores())
    torch.set_num_threads(n)
    return n


@contextmanager
def colocated(ctxs: dict, args, dtype: torch.dtype, opts):
    """The launcher's side of runs whose processes share one device, around them. ``ctxs``: the plans' contexts
    by index (one model, ``args`` its ``ModelArgs``); ``opts``: the ``RunOptions`` (``weights``,
    ``colocated_device``). Yields the contexts with their shared weights, each plan's ``RankSetup`` (its ranks'
    MPS shares, gloo, what is shared by IPC) and the lines the reports carry (``mps_status``). The caller runs
    the ranks inside the block: a shared file is removed at its end, and the launcher's tensors must outlive
    every rank."""
    from .colocate_ipc import build_shared, check_fits

    device = colocated_device(opts.colocated_device)
    mode = weights_mode(opts.weights, device)
    first = next(iter(ctxs.values()))
    for ctx in ctxs.values():
        check_device(device, ctx.plan.schedule)
    notes = tuple(line for line in [mps_status(device)] if line)
    for line in notes:
        (log.info if line.startswith("MPS active") else log.warning)("splitwiser: %s", line)
    path, shared = None, None
    if mode == "file":
        path = share_weights(first.model, dtype, first.seed)
        out = {i: dataclasses.replace(c, shared_weights=path) for i, c in ctxs.items()}
    else:
        check_fits(list(ctxs.values()), args, dtype, device)
        shared = build_shared(first.model, dtype, device, first.seed, ctxs)
        out = {i: dataclasses.replace(c, shared_ipc=i) for i, c in ctxs.items()}
    setups = {i: RankSetup(env=rank_env(c.plan.schedule), shared=shared, backend="gloo") for i, c in ctxs.items()}
    try:
        yield out, setups, notes
    finally:
        if path is not None:
            Path(path).unlink(missing_ok=True)


def share_weights(spec: str, dtype: torch.dtype, seed: int) -> str:
    """Builds model ``spec`` once and writes its weights (and arguments and tokenizer) to a file in shared memory;
    returns its path (the caller removes it when the run is over)."""
    from .weights import load_model

    model, args, tok = load_model(spec, dtype, "cpu", seed=seed)
    fd, path = tempfile.mkstemp(prefix="exegpt-weights-", suffix=".pt", dir=SHM if SHM.is_dir() else None)
    os.close(fd)
    state = {k: v for k, v in model.state_dict().items() if not (k == "output.weight" and args.tied_embeddings)}
    torch.save({"state": state, "args": args, "tokenizer": tok}, path)
    return path


def load_shared(path: str):
    """The whole model with its weights mapped from ``path`` (``share_weights``), not copied; (model, tokenizer)."""
    from .weights import _build, _finish

    blob = torch.load(path, mmap=True, weights_only=False)
    args = blob["args"]
    model = _build(args, None, True, True)
    missing, unexpected = model.load_state_dict(blob["state"], strict=False, assign=True)
    missing = [k for k in missing if not (k == "output.weight" and args.tied_embeddings)]
    if missing or unexpected:
        raise ExeGPTError(f"shared weights {path} do not match the model: missing={missing[:4]} "
                          f"unexpected={unexpected[:4]}")
    return _finish(model), blob["tokenizer"]


def warm_up(model, max_rows: int, max_len: int) -> None:
    """One prefill of 8 positions and one decode of every cache row, then an empty cache: the weight pages mapped
    in and the derived copies the CPU kernels build on first use (``runner.linear``) built before the run's
    clock starts, as a process that served before holds them."""
    n = min(8, max_len - 1)
    device = next(model.parameters()).device
    with torch.inference_mode():
        model.prefill(torch.zeros(n, dtype=torch.long, device=device), torch.tensor([n]), torch.tensor([0]))
        model.decode(torch.zeros(max_rows, dtype=torch.long, device=device), torch.arange(max_rows))
    model.cache.lengths.zero_()


def weight_residency(where) -> dict:
    """What this process holds of the shared weights (``/proc/self/smaps``): ``where`` is the shared weight file's
    path (``weights="file"``), or the weight tensors a process took from the launcher (``weights="ipc"`` on a
    CPU: every mapping that holds one of their storages). ``rss_bytes`` mapped and resident, ``pss_bytes`` its
    proportional share (rss over the processes mapping each page), ``private_bytes`` the pages only it holds;
    and ``process_rss_bytes``, its whole resident memory."""
    if isinstance(where, (str, Path)):
        real = os.path.realpath(where)

        def holds(lo: int, hi: int, path: str) -> bool:
            return path == real
    else:
        spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
                 for t in where if t.device.type == "cpu"]

        def holds(lo: int, hi: int, path: str) -> bool:
            return any(a < hi and lo < b for a, b in spans)
    out = {"rss_bytes": 0, "pss_bytes": 0, "private_bytes": 0, "process_rss_bytes": 0}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if not head[0].endswith(":"):  # a mapping's header line: range, perms, offset, dev, inode[, path]
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = holds(lo, hi, head[5] if len(head) >= 6 else "")
                continue
            if not inside:
                continue
            key, kb = head[0], int(head[1]) * 1024 if head[1].isdigit() else 0
            if key == "Rss:":
                out["rss_bytes"] += kb
            elif key == "Pss:":
                out["pss_bytes"] += kb
            elif key in ("Private_Clean:", "Private_Dirty:"):
                out["private_bytes"] += kb
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["process_rss_bytes"] = int(line.split()[1]) * 1024
    return out
