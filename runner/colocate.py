"""Processes that share one device (Splitwiser): one copy of the weights mapped into every process, and each
process's share of the device.

Weights: the launching process builds the model once and writes its state to a file in shared memory
(``/dev/shm``); each rank maps that file (``torch.load(mmap=True)``), so the pages of the weights exist once in
memory whatever the number of processes (``weight_residency`` reads what each process holds of them). The model
code never writes a weight; derived copies a process builds for speed (a oneDNN-prepacked copy of large fp32
Linear weights at prefill, the decode kernels' panels) are its own.

Shares: on a CPU a process runs ``threads(share, cores)`` threads; on a GPU it would set
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` before creating its CUDA context, and needs an MPS daemon. The runner's
ranks on one GPU would then have to hand the KV off over host memory (gloo takes CPU tensors only), which the
pipeline does not do: ``check_device`` refuses a GPU run with one line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from exegpt.errors import ExeGPTError

SHM = Path("/dev/shm")


def device_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_device() -> None:
    """Refuses a GPU: two ranks on one GPU are not built (see the module's docstring)."""
    if torch.cuda.is_available():
        raise ExeGPTError("splitwiser on a GPU needs its two processes under MPS with a host-memory KV hand-off, "
                          "which the runner does not build; run it on the CPU (CUDA_VISIBLE_DEVICES='')")


def enter_process(schedule, group: str) -> int:
    """Gives this process its share of the device: its thread count on a CPU (returned); on a GPU the MPS
    percentage, set before any CUDA context exists."""
    from exegpt.policies.splitwiser import threads

    share = schedule.share(group)
    os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(share)  # read at context creation; inert on a CPU
    n = threads(share, device_cores())
    torch.set_num_threads(n)
    return n


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
    with torch.inference_mode():
        model.prefill(torch.zeros(n, dtype=torch.long), torch.tensor([n]), torch.tensor([0]))
        model.decode(torch.zeros(max_rows, dtype=torch.long), torch.arange(max_rows))
    model.cache.lengths.zero_()


def weight_residency(path: str) -> dict:
    """What this process holds of the shared weight file's pages (``/proc/self/smaps``): ``rss_bytes`` mapped
    and resident, ``pss_bytes`` its proportional share (rss over the processes mapping each page),
    ``private_bytes`` the pages only it holds; and ``process_rss_bytes``, its whole resident memory."""
    out = {"rss_bytes": 0, "pss_bytes": 0, "private_bytes": 0, "process_rss_bytes": 0}
    inside = False
    real = os.path.realpath(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if not head[0].endswith(":"):  # a mapping's header line: range, perms, offset, dev, inode[, path]
                inside = len(head) >= 6 and head[5] == real
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
