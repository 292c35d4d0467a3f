"""Which of a plan's costs come from extrapolated profile cells, not measured ones.

A budgeted profile (``python -m profiler --budget``) measures the cheap points of each table and fills the rest
from least-squares fits of the known form, recording each fit's held-out error (``Profile.fit_error``); every
profile extends some tables linearly beyond their grid. ``extrapolation_note`` re-evaluates a plan with the
profile's lookups watched (``Profile.extrapolated_reads``) and says, in one line, which tables it read outside
what was measured, so that a user knows how far to trust its estimate.
"""

from __future__ import annotations

from .plan import Plan
from .profile import ExtrapolatedReads, Kernel, Profile
from .search.optimize import evaluate_schedule


def plan_reads(plan: Plan, profile: Profile) -> dict[tuple[Kernel, int], ExtrapolatedReads]:
    """The lookups of ``plan``'s estimate on ``profile`` that read fitted cells or lie beyond a grid, per
    (kernel, tp); empty when it read measured cells only."""
    with profile.extrapolated_reads() as seen:
        evaluate_schedule(plan.schedule, plan.workload, plan.bound, devices=plan.devices, profile=profile)
    return dict(seen)


def extrapolation_note(plan: Plan, profile: Profile) -> str | None:
    """One line naming the tables ``plan``'s estimate read outside the measured cells of ``profile`` (with each
    fit's held-out error where recorded), or None when it read measured cells only."""
    reads = plan_reads(plan, profile)
    if not reads and not profile.partial:
        return None
    parts = []
    for (kernel, tp), r in sorted(reads.items(), key=lambda kv: (kv[0][0].value, kv[0][1])):
        what = []
        if r.fitted:
            err = profile.fit_error(kernel, tp)
            what.append("fitted cells" + ("" if err is None else f" (held-out error {100 * err:.1f}%)"))
        if r.beyond:
            what.append("beyond its grid")
        parts.append(f"{kernel.value} tp={tp} {' and '.join(what)}")
    where = "; ".join(parts) if parts else "measured cells only"
    partial = " (the profile is partial: its run was interrupted)" if profile.partial else ""
    return f"this plan's estimate reads extrapolated profile cells: {where}{partial}"
