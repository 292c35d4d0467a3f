"""BlendServe's resource-aware prefix tree: request densities, the layer-wise sort, the conditional split, and the
request orders the policy compares (``exegpt.policies.blendserve``).

A request of prompt p and output d costs ``Comp = kappa (p + d)`` (GEMM work: 2 x params FLOPs a token, in units
of the time one KV token takes to read) and ``Mem = p d + d^2 / 2`` (the KV tokens its decode steps read), its
compute density ``rho = Comp / Mem``: above 1 it is compute-bound, below 1 memory-bound (BlendServe §4.1, the
prompt's quadratic attention term dropped as in the paper). ``kappa = 2 P bw / (flops kv_bytes)`` is the model on
the device: P parameters, KV bytes a token adds over all layers, device FLOP/s and memory bandwidth.

The tree is a radix tree over the prompts' token ids: a node is a shared segment, a request sits at the node its
prompt ends in. A subtree's density counts its distinct prompt tokens once (a shared prefix is prefilled once), so
sharing lowers it, as ``(1 - s) Comp`` in the paper. Orders (every request exactly once):
  * ``fcfs``: arrival order;
  * ``dfs``: depth first, children in order of first appearance (SGLang's order: prefix sharing only);
  * ``density``: requests by their own density, highest first (NanoFlow-Balance: no sharing);
  * ``blend``: at every node children sorted by density (Alg. 1); a node's children are split apart (placed by
    their own densities, the node's prefix computed once more for each extra part) while the recomputed tokens
    stay within the budget ``split_t``, what is left divided among the children on the way down (Alg. 2); the
    units left are sorted by density, each kept depth first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .devices import get_device
from .errors import ExeGPTError
from .models import get_model

ORDERS = ("blend", "dfs", "density", "fcfs")
CPU_FLOP_PER_BYTE = 10.0
"""FLOP/s over memory bytes/s of a device the catalogue lacks (a CPU socket: tens of GFLOP/s per core, a few
GB/s per core of bandwidth)."""


def machine_kappa(model: str, devices: str) -> float:
    """``kappa`` of ``model`` on the devices of cluster label ``devices`` (``2xA100``; ``1xcpu``: a CPU's
    FLOP per byte, ``CPU_FLOP_PER_BYTE``)."""
    m = get_model(model)
    name = devices.split("x", 1)[-1] if "x" in devices else devices
    try:
        dev = get_device(name)
        flop_per_byte = dev.peak_flops / dev.mem_bw_bytes_s
    except ExeGPTError:
        flop_per_byte = CPU_FLOP_PER_BYTE
    return 2.0 * m.params() / (flop_per_byte * m.kv_bytes_per_token() * m.n_layers)


def profile_kappa(profile, tp: int = 1) -> float:
    """``kappa`` as a profile prices it: a prompt token's GEMM seconds (a prefill of 2048 tokens, per token) over
    one KV token's decode-attention seconds (64 rows at a context of 1024, per KV token), per layer: the device's
    real efficiencies instead of its peaks."""
    tokens, batch, ctx = 2048.0, 64.0, 1024.0
    gemm = float(profile.seconds("dense_encode", tp, tokens)) / tokens
    read = float(profile.seconds("attn_decode", tp, batch, ctx)) / (batch * ctx)
    return gemm / read


def request_costs(p, d, kappa: float) -> tuple[np.ndarray, np.ndarray]:
    """(Comp, Mem) of requests with prompts ``p`` and outputs ``d`` (arrays or numbers)."""
    p, d = np.asarray(p, dtype=float), np.asarray(d, dtype=float)
    return kappa * (p + d), p * d + d * d / 2.0


def pool_density(prompts: Sequence[Sequence[int]], outputs, kappa: float) -> float:
    """The density of a whole pool, its distinct prompt tokens counted once (the root's density)."""
    tree = PromptTree(prompts)
    _, mem = request_costs([len(q) for q in prompts], outputs, kappa)
    return float((kappa * (tree.distinct_tokens + np.sum(outputs))) / mem.sum()) if mem.sum() else 0.0


def sharing_ratio(prompts: Sequence[Sequence[int]]) -> float:
    """The optimal prefix-sharing ratio: the share of prompt tokens a perfect prefix cache skips."""
    total = sum(len(q) for q in prompts)
    return 1.0 - PromptTree(prompts).distinct_tokens / total if total else 0.0


class _Node:
    __slots__ = ("key", "depth", "children", "rids", "parent", "distinct", "out_sum", "mem", "samples")

    def __init__(self, key: tuple[int, ...], parent: _Node | None):
        self.key, self.parent = key, parent
        self.depth = (parent.depth if parent else 0) + len(key)  # prompt tokens from the root to its end
        self.children: dict[int, _Node] = {}  # first token -> child, in order of first appearance
        self.rids: list[int] = []  # requests whose prompt ends here
        self.distinct = self.out_sum = self.mem = 0.0
        self.samples = (0.0, 0)  # sampled output lengths in the subtree: sum, count


class PromptTree:
    """The radix tree of a pool's prompts; ``rids[i]`` names prompt ``i`` (default ``0..n-1``)."""

    def __init__(self, prompts: Sequence[Sequence[int]], rids: Sequence[int] | None = None):
        self.root = _Node((), None)
        self.leaf: dict[int, _Node] = {}
        for rid, q in zip(range(len(prompts)) if rids is None else rids, prompts):
            node = self._insert(tuple(q))
            node.rids.append(int(rid))
            self.leaf[int(rid)] = node
        self.distinct_tokens = sum(len(n.key) for n in self.nodes())

    def _insert(self, q: tuple[int, ...]) -> _Node:
        node, i = self.root, 0
        while i < len(q):
            child = node.children.get(q[i])
            if child is None:
                child = _Node(q[i:], node)
                node.children[q[i]] = child
                return child
            k = 0
            while k < len(child.key) and i + k < len(q) and child.key[k] == q[i + k]:
                k += 1
            if k < len(child.key):  # split the edge after k tokens
                top = _Node(child.key[:k], node)
                node.children[q[i]] = top
                child.key, child.parent = child.key[k:], top
                top.children[child.key[0]] = child
                _redepth(child)
                child = top
            node, i = child, i + k
        return node

    def nodes(self) -> list[_Node]:
        """Every node but the root, parents before children."""
        out, stack = [], list(reversed(self.root.children.values()))
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(reversed(n.children.values()))
        return out

    def dfs(self, node: _Node | None = None) -> list[int]:
        """The requests depth first (a node's own requests, then its children in order)."""
        out, stack = [], [node or self.root]
        while stack:
            n = stack.pop()
            out += n.rids
            stack.extend(reversed(n.children.values()))
        return out

    def estimate_outputs(self, sampled: dict[int, int]) -> dict[int, float]:
        """Each request's output estimate: the mean sampled output of the smallest subtree around it holding a
        sample (BlendServe §5: a subtree without one borrows its siblings'), the pool's mean at worst."""
        for n in reversed(self.nodes()):  # children first
            s = (float(sum(sampled[r] for r in n.rids if r in sampled)), sum(r in sampled for r in n.rids))
            for c in n.children.values():
                s = (s[0] + c.samples[0], s[1] + c.samples[1])
            n.samples = s
        total = (float(sum(sampled.values())), len(sampled))
        if not total[1]:
            raise ExeGPTError("BlendServe needs at least one sampled output length")
        out = {}
        for rid, n in self.leaf.items():
            if rid in sampled:
                out[rid] = float(sampled[rid])
                continue
            while n is not None and n is not self.root and not n.samples[1]:
                n = n.parent
            s = total if n is None or n is self.root else n.samples
            out[rid] = s[0] / s[1]
        return out

    def aggregate(self, est: dict[int, float], prompt_len: dict[int, int], kappa: float) -> None:
        """Each node's subtree totals: distinct prompt tokens (the path from the root counted once), estimated
        outputs, and Mem."""
        for n in reversed(self.nodes()):
            n.distinct = float(len(n.key)) + sum(c.distinct for c in n.children.values())
            n.out_sum = sum(est[r] for r in n.rids) + sum(c.out_sum for c in n.children.values())
            n.mem = float(np.sum(request_costs([prompt_len[r] for r in n.rids], [est[r] for r in n.rids],
                                               kappa)[1])) + sum(c.mem for c in n.children.values())
        self.kappa = kappa

    def density(self, n: _Node) -> float:
        """The subtree's density: its prompt path counted once, its outputs, over its Mem."""
        above = n.depth - len(n.key)
        return self.kappa * (above + n.distinct + n.out_sum) / n.mem if n.mem else 0.0


def _redepth(node: _Node) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        n.depth = n.parent.depth + len(n.key)
        stack.extend(n.children.values())


@dataclass(frozen=True, slots=True)
class Order:
    """Requests in admission order, each with the density of the unit it was placed by and its estimated
    footprint (KV tokens on average over its life, ``p + d / 2``) and its costs."""

    rids: tuple[int, ...]
    density: tuple[float, ...]
    footprint: tuple[float, ...]
    comp: tuple[float, ...]
    mem: tuple[float, ...]
    splits: int = 0
    """Nodes whose children were split apart (``blend``)."""


def make_order(kind: str, prompts: dict[int, tuple[int, ...]], est: dict[int, float], kappa: float,
               split_t: float = 0.0) -> Order:
    """The admission order ``kind`` (``ORDERS``) of requests ``prompts`` (request -> prompt tokens, in arrival
    order) with estimated outputs ``est``."""
    if kind not in ORDERS:
        raise ExeGPTError(f"order {kind!r} unknown; expected one of {', '.join(ORDERS)}")
    rids = list(prompts)
    plen = {r: len(q) for r, q in prompts.items()}
    tree = PromptTree([prompts[r] for r in rids], rids)
    own = {r: float(c / m) if m else 0.0
           for r, c, m in zip(rids, *request_costs([plen[r] for r in rids], [est[r] for r in rids], kappa))}
    splits = 0
    if kind == "fcfs":
        seq, dens = rids, [own[r] for r in rids]
    elif kind == "density":
        seq = sorted(rids, key=lambda r: -own[r])  # stable: ties keep arrival order
        dens = [own[r] for r in seq]
    elif kind == "dfs":
        seq = tree.dfs()
        dens = [own[r] for r in seq]
    else:
        tree.aggregate(est, plen, kappa)
        units: list[tuple[float, list[int]]] = []
        splits = _units(tree, tree.root, float(split_t), units)
        units.sort(key=lambda u: -u[0])
        seq = [r for _, u in units for r in u]
        dens = [d for d, u in units for _ in u]
    # Comp counts a prompt's tokens shared with the requests before it in this order once.
    comp, prev = [], ()
    for r in seq:
        q = prompts[r]
        k = 0
        while k < min(len(q), len(prev)) and q[k] == prev[k]:
            k += 1
        comp.append(kappa * (len(q) - k + est[r]))
        prev = q
    mem = [float(request_costs(plen[r], est[r], kappa)[1]) for r in seq]
    return Order(tuple(seq), tuple(dens), tuple(plen[r] + est[r] / 2.0 for r in seq), tuple(comp), tuple(mem),
                 splits)


def _units(tree: PromptTree, node: _Node, budget: float, out: list) -> int:
    """Alg. 1 and 2 from ``node`` down: its requests and children sorted by density; while splitting the children
    apart costs no more than ``budget`` recomputed tokens (the node's prefix once more per extra child), each
    child becomes its own unit(s) with an equal share of what is left; else the subtree is one unit. Returns the
    splits made."""
    kids = sorted(node.children.values(), key=lambda c: -tree.density(c))
    cost = node.depth * (len(kids) + bool(node.rids) - 1)
    if node is tree.root or (len(kids) > 1 and cost <= budget):
        share = (budget - cost) / max(len(kids), 1)
        if node.rids:
            out.append((tree.density(node), list(node.rids)))
        return (node is not tree.root) + sum(_units(tree, c, share, out) for c in kids)
    out.append((tree.density(node), _sorted_dfs(tree, node)))
    return 0


def _sorted_dfs(tree: PromptTree, node: _Node) -> list[int]:
    """Depth first with every node's children by density, highest first (Alg. 1)."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out += n.rids
        stack.extend(sorted(n.children.values(), key=lambda c: tree.density(c)))  # popped highest first
    return out


def dual_shares(rho_left: float, rho_right: float, rho_pool: float) -> tuple[float, float]:
    """BlendServe's Alg. 3: the shares (f_L, f_R) of KV memory for the compute-heavy left scan and the
    memory-heavy right scan so that ``f_L + f_R = 1`` and ``rho_L f_L + rho_R f_R = rho_pool``; all to the left
    when the pool's density is not between the two ends."""
    if not rho_right < rho_pool < rho_left:
        return (1.0, 0.0) if rho_pool >= rho_left or rho_left <= rho_right else (0.0, 1.0)
    f_left = (rho_pool - rho_right) / (rho_left - rho_right)
    return f_left, 1.0 - f_left
