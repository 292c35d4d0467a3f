"""Facts about the device a profile was measured on: name, memory, clocks, driver, cores, threads.

NVIDIA GPUs are described through NVML (``nvidia-ml-py``, imported as ``pynvml``) when it is installed and
working, with ``torch.cuda`` as the fallback; CPUs through ``/proc/cpuinfo``, ``/proc/meminfo`` and
``os.sysconf``. A machine without a GPU is not an error: it is a CPU device.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from dataclasses import asdict, dataclass, field

import torch

from exegpt.devices import DEVICES
from runner.device import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One profiled device."""

    name: str
    """Short name used as the profile's ``device`` (``cpu``, or an ``exegpt.devices.DEVICES`` key such as
    ``H100`` when the GPU matches one)."""
    kind: str
    """'cpu' or 'cuda'."""
    model: str
    """Full product name (``NVIDIA H100 80GB HBM3``, ``AMD EPYC 7B13 ...``)."""
    memory_bytes: float
    """Total device memory (RAM for a CPU)."""
    available_bytes: float
    """Memory free for weights, KV cache and activations now (MemAvailable for a CPU)."""
    facts: dict = field(default_factory=dict)
    """Everything else: clocks, driver, cores, threads, compute capability."""

    def to_dict(self) -> dict:
        return asdict(self)


def describe_device(device: str | torch.device | None = None) -> DeviceInfo:
    """Describe the device ``device`` (see ``resolve_device``)."""
    dev = resolve_device(device)
    return _describe_cuda(dev) if dev.type == "cuda" else _describe_cpu()


# --- CPU ------------------------------------------------------------------------------------------


def _describe_cpu() -> DeviceInfo:
    total, available = _cpu_memory()
    facts = {"cpu_model": _cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": _usable_cores(),
             "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
             "torch_version": torch.__version__}
    return DeviceInfo(name="cpu", kind="cpu", model=facts["cpu_model"], memory_bytes=total,
                      available_bytes=available, facts=facts)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_memory() -> tuple[float, float]:
    """(total, available) bytes: MemTotal / MemAvailable, or ``os.sysconf`` pages where /proc is missing."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if parts and parts[0].isdigit():
                    info[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    page = _sysconf("SC_PAGE_SIZE")
    total = info.get("MemTotal") or page * _sysconf("SC_PHYS_PAGES")
    available = info.get("MemAvailable") or page * _sysconf("SC_AVPHYS_PAGES") or total
    return float(total), float(available)


def _sysconf(name: str) -> int:
    try:
        return max(int(os.sysconf(name)), 0)
    except (ValueError, OSError, AttributeError):
        return 0


# --- CUDA -----------------------------------------------------------------------------------------


def _describe_cuda(dev: torch.device) -> DeviceInfo:
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    facts = {"compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
             "device_count": torch.cuda.device_count(), "cuda_version": torch.version.cuda,
             "torch_version": torch.__version__, "cpu_model": _cpu_model()}
    facts.update(_nvml_facts(index))
    model = facts.get("nvml_name") or props.name
    return DeviceInfo(name=gpu_short_name(model), kind="cuda", model=model, memory_bytes=float(total),
                      available_bytes=float(free), facts=facts)


def _nvml_facts(index: int) -> dict:
    """Name, memory, clocks and driver from NVML; empty when NVML is missing or fails (not an error)."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError has many subclasses; any failure only loses facts.
        log.info("NVML unavailable (%s); device facts come from torch.cuda only", e)
        return {}
    facts = {}
    try:
        # NOTE: NVML enumerates all GPUs while CUDA_VISIBLE_DEVICES may renumber them; with a mask we only
        # trust NVML when it maps the index through the visible list.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        nvml_index = index
        if visible:
            ids = [v.strip() for v in visible.split(",")]
            if index < len(ids) and ids[index].isdigit():
                nvml_index = int(ids[index])
        h = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        name = pynvml.nvmlDeviceGetName(h)
        facts["nvml_name"] = name.decode() if isinstance(name, bytes) else name
        driver = pynvml.nvmlSystemGetDriverVersion()
        facts["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        facts["memory_total_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
        for label, clock in (("sm", pynvml.NVML_CLOCK_SM), ("mem", pynvml.NVML_CLOCK_MEM)):
            facts[f"{label}_clock_mhz"] = int(pynvml.nvmlDeviceGetClockInfo(h, clock))
            facts[f"{label}_clock_max_mhz"] = int(pynvml.nvmlDeviceGetMaxClockInfo(h, clock))
        try:
            facts["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1e3
        except Exception:  # not supported on every board
            pass
    except Exception as e:
        log.info("NVML query failed (%s); keeping the facts gathered so far", e)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return facts


def gpu_short_name(model: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100`` (a ``DEVICES`` key when one matches), else a sanitized name."""
    for key in sorted(DEVICES, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![0-9])", model, flags=re.IGNORECASE):
            return key
    cleaned = re.sub(r"^NVIDIA\s+", "", model.strip())
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", cleaned).strip("-") or "gpu"
