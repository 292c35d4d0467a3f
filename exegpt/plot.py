"""Figures of plans, workloads and runs: functions that take library objects and return a matplotlib Figure
(``exegpt plot`` draws them to files). matplotlib is imported on first use (``pip install -e '.[plot]'``).

  * ``frontier_figure``: the best throughput under each latency bound, every policy, and the optimizer's pick
    (``frontier_plot`` draws such curves from plans already found);
  * ``lengths_figure``: a workload's input and output length distributions, the bound's quantile marked;
  * ``timeline_figure``: a run's requests over time (queued, prefilling, decoding), from a ``RunReport``;
  * ``profile_figure``: a ``Profile``'s curves, per TP degree: attention against context, the rest of a layer
    against tokens, and the collectives against message size;
  * ``fidelity_figure``: predicted against measured values, with the parity line and an error band.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ExeGPTError, InfeasibleBoundError
from .workload import Workload

POLICY_GROUPS = (("RRA", ("rra",)), ("WAA", ("waa_c", "waa_m")), ("continuous batching", ("cb",)),
                 ("chunked prefill", ("chunked",)), ("disaggregation", ("disagg",)),
                 ("Shift Parallelism", ("shift",)))


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExeGPTError("figures need matplotlib: pip install -e '.[plot]'") from None
    return plt


def _best(fn) -> float:
    try:
        return fn().estimate.throughput_seq_s
    except (InfeasibleBoundError, ExeGPTError):
        return math.nan


def frontier_figure(dist: Workload, bounds_s, ax=None, groups=POLICY_GROUPS, **target):
    """Throughput (estimated) against the latency bound for each group of policies alone (``groups``: (label,
    policy names) pairs), static batching, and the optimizer's pick over all of them (the thick line: at each
    bound the best of the groups, which is what ``find_schedule`` over their union returns). ``target``:
    ``model``, ``devices``, ``profile``; ``ax``: draw into these axes (of a larger figure) instead of a new
    figure."""
    from .search.optimize import find_schedule, static_schedule

    bounds = np.asarray(list(bounds_s), dtype=float)
    curves = {name: [_best(lambda: find_schedule(dist, b, policies=list(policies), **target)) for b in bounds]
              for name, policies in groups}
    pick = np.fmax.reduce(np.array(list(curves.values())), axis=0) if curves else None
    curves["static batching (longest output)"] = [_best(lambda: static_schedule(dist, b, **target)) for b in bounds]
    where = " on ".join(str(target[k]) for k in ("model", "devices") if target.get(k))
    return frontier_plot(bounds, curves, pick, ax=ax,
                         title=f"{where + ', ' if where else ''}{dist.name}: best throughput under each bound "
                               "(estimates)")


def frontier_plot(bounds_s, curves: dict, pick=None, ax=None, title: str = ""):
    """Draw throughput against the latency bound from values already computed: ``curves`` maps a label to one
    value per bound (a ``Plan``, a throughput in seq/s, or None / NaN where nothing meets the bound); ``pick`` the
    optimizer's choice, drawn as the thick line. Curves with no value at any bound are left out."""
    plt = _plt()
    bounds = np.asarray(list(bounds_s), dtype=float)

    def values(seq):
        ys = [math.nan if v is None else getattr(getattr(v, "estimate", None), "throughput_seq_s", v) for v in seq]
        if len(ys) != len(bounds):
            raise ExeGPTError(f"a curve has {len(ys)} values for {len(bounds)} bounds")
        return np.asarray(ys, dtype=float)

    fig, ax = plt.subplots(figsize=(7, 4.4)) if ax is None else (ax.figure, ax)
    styles = iter(("o-", "s-", "^--", "x--", "D--", "P-.", "v:", "*-", "h--"))
    for label, seq in curves.items():
        ys = values(seq)
        if not np.all(np.isnan(ys)):
            ax.plot(bounds, ys, "v:" if label.startswith("static") else next(styles), ms=4, label=label)
    if pick is not None:
        ax.plot(bounds, values(pick), "-", color="black", lw=4, alpha=0.2, label="find_schedule (the pick)")
    ax.set(xscale="log", xlabel="latency bound on the quantile-length output (s)", ylabel="throughput (seq/s)",
           title=title)
    _plain_log_ticks(ax)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lengths_figure(dist: Workload, quantile: float = 0.99):
    """The PMF (bars) and CDF of input and output lengths, with the output's ``quantile`` (the length a bound
    applies to) marked."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (what, d) in zip(axes, (("input (prompt)", dist.input_len), ("output", dist.output_len))):
        n, p = d.lengths_array, d.probs_array
        handles = [ax.bar(n, p, width=max(1.0, (n.max() - n.min()) / 200), color="C0", alpha=0.6, label="PMF")]
        twin = ax.twinx()
        handles += twin.plot(n, np.cumsum(p), color="C1", label="CDF")
        twin.set(ylim=(0, 1.02), ylabel="cumulative share")
        ax.set(xlabel=f"{what} length (tokens)", ylabel="share of requests",
               title=f"{what}: mean {d.mean():.0f}, max {d.max}")
        ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
        if what == "output":
            q = d.quantile(quantile)
            handles.append(ax.axvline(q, color="C3", ls="--", label=f"p{quantile * 100:g} = {q} tokens"))
        twin.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle(dist.name)
    fig.tight_layout()
    return fig


def timeline_figure(report, max_requests: int = 80):
    """Each of the first ``max_requests`` requests as a row over the run's time: queued (arrival to prefill
    start), prefilling (to its first token), decoding (to its last)."""
    plt = _plt()
    reqs = sorted(report.requests, key=lambda r: r.id)[:max_requests]
    if not reqs:
        raise ExeGPTError("the report has no requests to draw")
    fig, ax = plt.subplots(figsize=(9, 0.12 * len(reqs) + 1.8))
    for i, r in enumerate(reqs):
        if r.first_token_s is None or r.finish_s is None:
            continue
        ax.barh(i, r.encode_start_s - r.arrival_s, left=r.arrival_s, color="0.8", height=0.8)
        ax.barh(i, r.first_token_s - r.encode_start_s, left=r.encode_start_s, color="C1", height=0.8)
        ax.barh(i, r.finish_s - r.first_token_s, left=r.first_token_s, color="C0", height=0.8)
    from matplotlib.patches import Patch

    ax.invert_yaxis()
    ax.set(xlabel="time since the run's start (s)", ylabel="request",
           title=f"{report.policy}: {len(reqs)} of {len(report.requests)} requests ({report.engine} engine)")
    fig.legend(handles=[Patch(color="0.8", label="queued"), Patch(color="C1", label="prefill (to the first token)"),
                        Patch(color="C0", label="decode")], loc="upper center", ncol=3, fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout()
    return fig


def profile_figure(profile, batches=(1, 8, 64), tp_degrees=None):
    """Three panels of one profile, a line per TP degree (and per batch for attention): decode attention against
    the context, the rest of a layer (``dense_encode``) against its tokens, and the collectives against the
    message size (log-log)."""
    from .profile import Kernel

    plt = _plt()
    tps = tuple(tp_degrees or profile.tp_degrees())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    def top(kernel, tp, axis):  # the table's last measured size (its range, not its extrapolation)
        return next(t for t in profile.tables if t.kernel is kernel and t.tp == tp).grid()[axis][-1]

    ctx = np.unique(np.geomspace(1, top(Kernel.ATTN_DECODE, 1, 1), 40).round())
    for i, tp in enumerate(tps):
        for j, b in enumerate(batches):
            if profile.has(Kernel.ATTN_DECODE, tp):
                t, ok = profile.lookup(Kernel.ATTN_DECODE, tp, np.full(ctx.shape, float(b)), ctx)
                axes[0].plot(ctx[ok], t[ok] * 1e3, color=f"C{i}", ls=("-", "--", ":")[j % 3],
                             label=f"TP{tp}, batch {b}")
        if profile.has(Kernel.DENSE_ENCODE, tp):
            tok = np.unique(np.geomspace(1, top(Kernel.DENSE_ENCODE, tp, 0), 50).round())
            axes[1].plot(tok, profile.lookup(Kernel.DENSE_ENCODE, tp, tok)[0] * 1e3, color=f"C{i}", label=f"TP{tp}")
    sizes = np.geomspace(64, 64 << 20, 40)
    for i, (kernel, tp) in enumerate(sorted({(t.kernel, t.tp) for t in profile.tables if t.kernel in (
            Kernel.ALLREDUCE, Kernel.ALLTOALL, Kernel.ALLGATHER, Kernel.SEND_RECV)}, key=lambda x: (x[0].value, x[1]))):
        axes[2].plot(sizes, profile.lookup(kernel, tp, sizes)[0] * 1e3, color=f"C{i}",
                     label=kernel.value + (f" {tp} ranks" if kernel is not Kernel.SEND_RECV else ""))
    axes[0].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per layer",
                title="decode attention, one step")
    axes[1].set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per layer",
                title="rest of a prefill layer (dense)")
    axes[2].set(xscale="log", yscale="log", xlabel="message (bytes)", ylabel="ms", title="collectives")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"profile {profile.id} ({profile.source}, {profile.dtype})", fontsize=10)
    fig.tight_layout()
    return fig


def fidelity_figure(predicted, measured, labels=None, band: float | None = None, what: str = "throughput (seq/s)"):
    """Measured against predicted values, one point each (``labels`` annotate them), the parity line and, with
    ``band`` (a fraction, e.g. the machine's noise floor), the band of +- that error around it."""
    plt = _plt()
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if p.shape != m.shape or p.ndim != 1 or not len(p):
        raise ExeGPTError(f"predicted and measured must be equal-length lists of numbers, got {p.shape} and {m.shape}")
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    lo, hi = min(p.min(), m.min()) * 0.8, max(p.max(), m.max()) * 1.2
    line = np.array([lo, hi])
    ax.plot(line, line, color="black", lw=1, label="measured = predicted")
    if band:
        ax.fill_between(line, line * (1 - band), line * (1 + band), color="0.85",
                        label=f"+-{band * 100:.0f} % (noise floor)")
    ax.scatter(p, m, color="C0", zorder=3)
    for x, y, text in zip(p, m, labels or ()):
        ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    err = np.abs(m - p) / p
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"predicted {what}", ylabel=f"measured {what}",
           title=f"mean error {err.mean() * 100:.1f} %, max {err.max() * 100:.1f} % ({len(p)} runs)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def _plain_log_ticks(ax) -> None:
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
