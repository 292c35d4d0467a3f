"""Workload: the input- and output-length distributions of the queries a service receives.

The simulator follows the paper and treats input and output lengths as **independent**
(``input_len`` x ``output_len``). When a workload comes from a trace, the joint sample
``pairs`` (and the arrival times, when the trace has them) is kept as well, so that the
runner can replay real (input, output) pairs and later policies can use arrivals.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from . import traces
from .distribution import Distribution
from .errors import ExeGPTError
from .jsonfile import known_fields

# The paper's Table 3: input (mean, std, max) and output (mean, std, max) in tokens.
TASKS: dict[str, tuple[tuple[float, float, int], tuple[float, float, int]]] = {
    "S": ((256, 252, 512), (32, 13, 80)),     # summarization
    "T": ((128, 81, 256), (128, 68, 320)),    # translation
    "G": ((64, 23, 128), (192, 93, 480)),     # code generation
    "C1": ((256, 115, 512), (64, 30, 160)),   # conversational QA
    "C2": ((512, 252, 1024), (256, 134, 640)),  # conversational QA, long
}

# Real request-length traces shipped in exegpt/data/traces (see exegpt/data/ATTRIBUTION.md).
TRACES: dict[str, str] = {
    "arxiv": "arxiv.csv.gz",            # arXiv summarization, Llama-2 tokenizer (Vidur, MIT)
    "azure_conv": "azure_conv.csv.gz",  # Azure LLM inference trace 2023, conversation (CC-BY-4.0)
    "azure_code": "azure_code.csv.gz",  # Azure LLM inference trace 2023, code (CC-BY-4.0)
}

@dataclass(frozen=True, slots=True)
class Workload:
    """Input and output length distributions, assumed independent by the simulator."""

    input_len: Distribution
    """Prompt lengths (tokens)."""
    output_len: Distribution
    """Generated lengths (tokens), the first token included."""
    name: str = "custom"
    """A label for reports."""
    pairs: tuple[tuple[int, int], ...] | None = field(default=None, compare=False, repr=False)
    """The joint (input, output) sample of a trace, in trace order; None for synthetic workloads."""
    arrivals_s: tuple[float, ...] | None = field(default=None, compare=False, repr=False)
    """Arrival times of ``pairs`` (seconds from the first request), when the trace has them."""

    def __post_init__(self):
        if self.arrivals_s is not None and (self.pairs is None or len(self.arrivals_s) != len(self.pairs)):
            raise ExeGPTError("arrival times need a joint sample of the same size")

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def truncated_normal(cls, input: tuple[float, float, int], output: tuple[float, float, int],
                         name: str = "truncated_normal") -> Workload:
        """From (mean, std, max) in tokens for input and output, as in the paper's Table 3."""
        return cls(_normal(input, "input"), _normal(output, "output"), name=name)

    @classmethod
    def task(cls, name: str) -> Workload:
        """One of the paper's five tasks: S, T, G, C1, C2 (Table 3)."""
        if name not in TASKS:
            raise ExeGPTError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
        inp, out = TASKS[name]
        return cls.truncated_normal(inp, out, name=name)

    @classmethod
    def trace(cls, name: str) -> Workload:
        """A built-in real trace: arxiv, azure_conv or azure_code."""
        if name not in TRACES:
            raise ExeGPTError(f"unknown trace {name!r}; expected one of {', '.join(TRACES)}")
        data = resources.files("exegpt").joinpath("data", "traces", TRACES[name]).read_bytes()
        text = gzip.decompress(data).decode()
        return cls._from_trace_text(text, source=f"trace {name}", name=name)

    @classmethod
    def from_trace(cls, path: str | Path, name: str | None = None) -> Workload:
        """From a trace file (gzipped or not): Vidur/Splitwise, Azure or BurstGPT CSV, Mooncake JSON lines, or
        ShareGPT JSON (``exegpt.traces``). Keeps the joint sample and the arrival times."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ExeGPTError(f"cannot read trace file {str(path)!r}: {e.strerror}") from None
        text = gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode(errors="replace")
        return cls._from_trace_text(text, source=str(path), name=name or path.stem.split(".")[0])

    @classmethod
    def from_pairs(cls, pairs, arrivals_s=None, name: str = "pairs") -> Workload:
        """From a joint sample of (input, output) lengths."""
        arr = np.asarray(pairs)
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
            raise ExeGPTError(f"pairs must be a non-empty list of (input, output) lengths, got shape {arr.shape}")
        arrivals = None
        if arrivals_s is not None:
            a = np.asarray(arrivals_s, dtype=float)
            a = a - a.min()
            arrivals = tuple(float(x) for x in a)
        return cls(Distribution.from_samples(arr[:, 0]), Distribution.from_samples(arr[:, 1]), name=name,
                   pairs=tuple((int(i), int(o)) for i, o in arr), arrivals_s=arrivals)

    @classmethod
    def _from_trace_text(cls, text: str, source: str, name: str) -> Workload:
        pairs, times, skipped = traces.parse(text, source)
        return cls.from_pairs(pairs, times, name=name if not skipped else f"{name} ({skipped} skipped)")

    # --- derived ------------------------------------------------------------------------------

    @property
    def max_total_len(self) -> int:
        """Longest context a query can reach: longest prompt plus longest output."""
        return self.input_len.max + self.output_len.max

    def scaled(self, input_factor: float, output_factor: float, name: str | None = None) -> Workload:
        """Lengths scaled (e.g. a real trace shrunk to CPU-sized lengths); the joint sample follows."""
        pairs = None
        if self.pairs is not None:
            arr = np.maximum(np.round(np.asarray(self.pairs) * [input_factor, output_factor]), 1).astype(int)
            pairs = tuple((int(i), int(o)) for i, o in arr)
        return Workload(self.input_len.scaled(input_factor), self.output_len.scaled(output_factor),
                        name=name or f"{self.name}x({input_factor:g},{output_factor:g})",
                        pairs=pairs, arrivals_s=self.arrivals_s)

    def within_context(self, max_tokens: int, how: str = "drop") -> tuple[Workload, int, tuple[int, int]]:
        """This trace fitted to a model's context of ``max_tokens`` (its longest prompt plus its longest output, what
        a plan reserves per sequence, at most that): the prompt and output caps that keep the most requests whole,
        then the requests over them dropped (``how="drop"``) or clipped to them (``"clip"``: the prompt's last
        tokens, the output's first). Returns the workload, how many requests were dropped or clipped, and the caps
        (prompt, output)."""
        if how not in ("drop", "clip"):
            raise ExeGPTError(f"how={how!r} must be 'drop' or 'clip'")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 2:
            raise ExeGPTError(f"max_tokens={max_tokens!r} must be a whole number >= 2")
        if self.max_total_len <= max_tokens:
            return self, 0, (self.input_len.max, self.output_len.max)
        if self.pairs is None:
            raise ExeGPTError(f"workload {self.name!r} reaches {self.max_total_len} tokens and has no joint sample "
                              f"to drop or clip requests from; give lengths within {max_tokens} tokens")
        pairs = np.asarray(self.pairs)
        inp, out = pairs[:, 0], pairs[:, 1]
        caps = np.unique(np.minimum(out, max_tokens - 1))
        if len(caps) > 2000:
            caps = np.unique(np.quantile(caps, np.linspace(0, 1, 2000)).astype(int))
        kept = [int(np.count_nonzero((out <= c) & (inp <= max_tokens - c))) for c in caps]
        out_cap = int(caps[int(np.argmax(kept))])
        in_cap = max_tokens - out_cap
        whole = (out <= out_cap) & (inp <= in_cap)
        if how == "drop":
            arr = None if self.arrivals_s is None else np.asarray(self.arrivals_s)[whole]
            fitted = Workload.from_pairs(pairs[whole], arr, name=f"{self.name} (<= {max_tokens} tokens)")
        else:
            clipped = np.stack([np.minimum(inp, in_cap), np.minimum(out, out_cap)], axis=1)
            fitted = Workload.from_pairs(clipped, self.arrivals_s, name=f"{self.name} (clipped to {max_tokens})")
        return fitted, int(np.count_nonzero(~whole)), (in_cap, out_cap)

    def correlation(self) -> float | None:
        """Pearson correlation of input and output length in the joint sample (None if synthetic)."""
        if self.pairs is None or len(self.pairs) < 2:
            return None
        arr = np.asarray(self.pairs, dtype=float)
        if arr[:, 0].std() == 0 or arr[:, 1].std() == 0:
            return 0.0
        return float(np.corrcoef(arr[:, 0], arr[:, 1])[0, 1])

    def sample(self, n: int, rng: np.random.Generator, joint: bool = True) -> np.ndarray:
        """``n`` (input, output) pairs: resampled from the joint sample when there is one and
        ``joint`` is set, else independent draws from the two marginals (the paper's model)."""
        if joint and self.pairs is not None:
            idx = rng.integers(0, len(self.pairs), size=n)
            return np.asarray(self.pairs, dtype=np.int64)[idx]
        return np.stack([self.input_len.sample(n, rng), self.output_len.sample(n, rng)], axis=1)

    def to_dict(self) -> dict:
        """JSON fields; a trace keeps its joint sample (``pairs``) and timestamps, so that a saved plan draws its
        requests as the trace pairs them."""
        d = {"name": self.name, "input_len": self.input_len.to_dict(), "output_len": self.output_len.to_dict()}
        if self.pairs is not None:
            d["pairs"] = [list(p) for p in self.pairs]
        if self.arrivals_s is not None:
            d["arrivals_s"] = list(self.arrivals_s)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Workload:
        known_fields(d, ("name", "input_len", "output_len", "pairs", "arrivals_s"), "a workload")
        try:
            pairs = d.get("pairs")
            return cls(Distribution.from_dict(d["input_len"]), Distribution.from_dict(d["output_len"]),
                       name=d.get("name", "custom"),
                       pairs=None if pairs is None else tuple((int(i), int(o)) for i, o in pairs),
                       arrivals_s=None if d.get("arrivals_s") is None else tuple(float(t) for t in d["arrivals_s"]))
        except KeyError as e:
            raise ExeGPTError(f"a workload needs 'input_len' and 'output_len', missing {e}") from None
        except ExeGPTError:
            raise
        except (TypeError, ValueError) as e:
            raise ExeGPTError(f"a workload's pairs must be [input, output] lengths: {e}") from None


def _normal(t, what: str) -> Distribution:
    try:
        mean, std, max_len = t
    except (TypeError, ValueError):
        raise ExeGPTError(f"{what} must be (mean, std, max) tokens, got {t!r}") from None
    try:
        return Distribution.truncated_normal(mean, std, max_len)
    except ExeGPTError as e:
        raise ExeGPTError(f"{what}: {e}") from None
