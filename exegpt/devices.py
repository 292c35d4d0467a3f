"""Devices and clusters: memory, peak rates and links of the accelerators a plan runs on."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .checks import MAX_DEVICES, whole
from .errors import ExeGPTError

GiB = 1024 ** 3


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One accelerator (or a CPU socket standing in for one)."""

    name: str
    memory_bytes: float
    """Device memory available to weights, KV cache and activations."""
    peak_flops: float
    """Dense fp16/bf16 tensor FLOP/s (fp32 for CPUs)."""
    mem_bw_bytes_s: float
    """Device memory bandwidth."""
    link_bw_bytes_s: float
    """Point-to-point bandwidth between two devices of one node (one direction)."""
    host_bw_bytes_s: float
    """Device <-> host copy bandwidth (WAA's KV hand-off goes through host memory)."""
    node_size: int = 8
    """Devices per node; links between nodes use ``internode_bw_bytes_s``."""
    internode_bw_bytes_s: float = 12.5e9
    """Per-device bandwidth between nodes."""
    fp8_flops: float = 0.0
    """Dense FP8 tensor FLOP/s (Hopper's e4m3, twice its fp16 rate); 0: the device has no FP8 tensor cores."""

    def __post_init__(self):
        for f in ("memory_bytes", "peak_flops", "mem_bw_bytes_s", "link_bw_bytes_s", "host_bw_bytes_s",
                  "internode_bw_bytes_s"):
            if not getattr(self, f) > 0:
                raise ExeGPTError(f"device {self.name}: {f}={getattr(self, f)!r} must be > 0")


# Datasheet numbers (dense fp16 tensor-core FLOP/s, HBM/GDDR bandwidth). A40 nodes of the paper's
# cluster talk over PCIe 4.0 (about 25 GB/s one way in practice) and 100 Gb/s InfiniBand between nodes.
DEVICES: dict[str, DeviceSpec] = {d.name: d for d in (
    DeviceSpec("A40", 48 * GiB, 149.7e12, 696e9, 25e9, 25e9, 8, 12.5e9),
    DeviceSpec("A100", 80 * GiB, 312e12, 2039e9, 300e9, 25e9, 8, 25e9),
    DeviceSpec("H100", 80 * GiB, 989e12, 3350e9, 450e9, 50e9, 8, 50e9, fp8_flops=1979e12),
    DeviceSpec("H200", 141 * GiB, 989e12, 4800e9, 450e9, 50e9, 8, 50e9, fp8_flops=1979e12),
    DeviceSpec("L4", 24 * GiB, 121e12, 300e9, 25e9, 25e9, 8, 12.5e9),
    DeviceSpec("A10G", 24 * GiB, 125e12, 600e9, 25e9, 25e9, 8, 12.5e9),
)}


@dataclass(frozen=True, slots=True)
class Cluster:
    """``count`` identical devices."""

    device: DeviceSpec
    count: int

    def __post_init__(self):
        whole(self.count, "device count", 1, MAX_DEVICES)

    @property
    def label(self) -> str:
        return f"{self.count}x{self.device.name}"


def get_device(name: str | DeviceSpec) -> DeviceSpec:
    if isinstance(name, DeviceSpec):
        return name
    for key, spec in DEVICES.items():
        if key.lower() == str(name).lower():
            return spec
    raise ExeGPTError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)} (or a DeviceSpec)")


def parse_cluster(devices: str | Cluster, known: dict[str, DeviceSpec] | None = None) -> Cluster:
    """'4xA40' -> Cluster(A40, 4). ``known`` adds devices (e.g. a profiled CPU) to the built-in ones."""
    if isinstance(devices, Cluster):
        return devices
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*([A-Za-z0-9_.\-]+)\s*", str(devices))
    if not m:
        raise ExeGPTError(f"devices {devices!r} not understood; expected COUNTxNAME such as 4xA40")
    count, name = int(m.group(1)), m.group(2)
    if not 1 <= count <= MAX_DEVICES:
        raise ExeGPTError(f"device count in {devices!r} must be in [1, {MAX_DEVICES:,}]")
    for key, spec in (known or {}).items():
        if key.lower() == name.lower():
            return Cluster(spec, count)
    return Cluster(get_device(name), count)
