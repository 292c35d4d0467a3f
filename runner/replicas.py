"""Data-parallel replicas on the runner (``exegpt.replicas``): replica j of a plan runs its stages on ranks
``j * P .. (j + 1) * P - 1`` (P the ranks of one copy of the plan's stages) with its share of the requests; the
drivers' records and statistics are gathered to rank 0, which reports the whole run."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from exegpt.replicas import merge_stats, replicas_of
from exegpt.report import RunReport, build_report

from .pipeline import RunContext, make_tp_groups


def replica_of(ctx: RunContext, rank: int, world_size: int) -> tuple[RunContext, tuple[int, int], dict]:
    """This rank's context (its replica's layout), ``(replica, replicas)`` and the process groups of every
    replica (``new_group`` is collective: every rank makes all of them, in the same order)."""
    n = replicas_of(ctx.plan)
    if n == 1:
        return ctx, (0, 1), make_tp_groups(ctx.layout, rank)
    per = world_size // n
    layouts = [tuple(dataclasses.replace(s, ranks=tuple(r + j * per for r in s.ranks)) for s in ctx.layout)
               for j in range(n)]
    groups: dict = {}
    for lay in layouts:
        groups |= make_tp_groups(lay, rank)
    j = rank // per
    return dataclasses.replace(ctx, layout=layouts[j]), (j, n), groups


def gather_report(ctx: RunContext, part, world_size: int) -> RunReport | None:
    """Every rank's share of a replicated run to rank 0, which builds the report: ``part`` is a replica driver's
    (records of its requests, ``DriverStats``, decision log), None on the other ranks."""
    parts = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    records = sorted((r for recs, _, _ in parts for r in recs), key=lambda r: r.id)
    stats = merge_stats([s for _, s, _ in parts])
    plan = ctx.plan
    return build_report(plan.schedule.policy.value, records, plan.estimate.latency_len, list(stats.encode_s),
                        list(stats.decode), world_size, plan.estimate, stats.steady,
                        decisions=tuple(line for _, _, log in parts for line in log))
