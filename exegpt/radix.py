"""A radix tree over prompt token ids: the prefix cache both engines keep the same way (SGLang's RadixAttention).

Each edge holds a run of token ids and, per token, the slot of a KV pool that holds its keys and values (a page
of one token). A request whose prompt starts with a cached path reads those slots instead of prefilling them; a
request that finishes its prompt publishes it, so the next one with the same prefix finds it. The nodes a request
reads are locked (a reference count per node) until its prompt is in; eviction takes the least recently used
unlocked leaves first, so it never drops a prefix a running request still reads.

Pure bookkeeping, no tensors: the runner moves KV between its rows and the pool by the slots given here
(``runner.prefix_pool``); the simulated engine prices the cached tokens as not prefilled. Both engines make the
same calls in the same order, so they hold the same tree.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

from .errors import ExeGPTError


class _Node:
    __slots__ = ("key", "slots", "children", "parent", "lock", "used")

    def __init__(self, key: tuple[int, ...], slots: list[int], parent: _Node | None):
        self.key, self.slots, self.parent = key, slots, parent
        self.children: dict[int, _Node] = {}
        self.lock = 0  # requests reading this node (or a node below it)
        self.used = 0  # logical time of the last access (LRU)


class RadixCache:
    """Cached prompt prefixes in ``capacity`` pool slots (one token each)."""

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ExeGPTError(f"prefix cache capacity={capacity!r} must be a whole number of tokens >= 0")
        self.capacity = capacity
        self.root = _Node((), [], None)
        self.root.lock = 1  # never evicted
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # popped from the end: slots 0, 1, ... first
        self.clock = 0
        self.evicted = 0
        """Tokens evicted so far."""

    @property
    def cached_tokens(self) -> int:
        return self.capacity - len(self.free)

    def match_len(self, tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` the tree holds (no side effect)."""
        node, i = self.root, 0
        while i < len(tokens) and (child := node.children.get(tokens[i])) is not None:
            k = _common(child.key, tokens, i)
            i += k
            if k < len(child.key):
                break
            node = child
        return i

    def path(self, tokens: Sequence[int], touch: bool = True) -> list[_Node]:
        """The nodes that hold exactly ``tokens`` (all of them cached: ``match_len(tokens) == len(tokens)``),
        splitting an edge that ends inside; ``touch``: mark them used now (LRU)."""
        node, i, out = self.root, 0, []
        self.clock += touch
        while i < len(tokens):
            child = node.children.get(tokens[i])
            k = 0 if child is None else _common(child.key, tokens, i)
            if k == 0:
                raise ExeGPTError(f"prefix of {len(tokens)} tokens is not cached (only {i})")
            if k < len(child.key):
                child = self._split(child, k)
            if touch:
                child.used = self.clock
            out.append(child)
            node, i = child, i + k
        return out

    def insert(self, tokens: Sequence[int]) -> tuple[list[_Node], list[tuple[int, list[int]]]]:
        """Caches ``tokens`` (or the longest prefix of them the pool makes room for, evicting unlocked LRU leaves).
        Returns the path's nodes and the new segments (start position, slots) whose KV must be saved."""
        have = self.match_len(tokens)
        nodes = self.path(tokens[:have])
        new = len(tokens) - have
        if new > len(self.free):
            self.lock(tokens[:have])  # the path it extends stays
            self.evict(new - len(self.free))
            self.unlock(tokens[:have])
        new = min(new, len(self.free))
        if not new:
            return nodes, []
        slots = [self.free.pop() for _ in range(new)]
        parent = nodes[-1] if nodes else self.root
        leaf = _Node(tuple(tokens[have:have + new]), slots, parent)
        leaf.used = self.clock
        parent.children[leaf.key[0]] = leaf
        return nodes + [leaf], [(have, slots)]

    def lock(self, tokens: Sequence[int]) -> None:
        """One more reader of the cached ``tokens``: none of their nodes is evicted until ``unlock``. (Locks are
        per token: an edge split later keeps its count on both halves.)"""
        for n in self.path(tokens, touch=False):
            n.lock += 1

    def unlock(self, tokens: Sequence[int]) -> None:
        for n in self.path(tokens, touch=False):
            if n.lock <= 0:
                raise ExeGPTError("prefix cache: unlocking a node no request holds")
            n.lock -= 1

    def evict(self, tokens: int) -> int:
        """Frees at least ``tokens`` slots if the unlocked nodes hold them, least recently used leaves first;
        returns the slots freed."""
        heap = [(n.used, id(n), n) for n in self._nodes() if not n.children and n.lock == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < tokens and heap:
            _, _, n = heapq.heappop(heap)
            self.free += reversed(n.slots)
            freed += len(n.slots)
            parent = n.parent
            del parent.children[n.key[0]]
            if parent is not self.root and not parent.children and parent.lock == 0:
                heapq.heappush(heap, (parent.used, id(parent), parent))
        self.evicted += freed
        return freed

    def _split(self, node: _Node, k: int) -> _Node:
        """Cuts ``node``'s edge after ``k`` tokens; returns the new upper node (same locks and use)."""
        top = _Node(node.key[:k], node.slots[:k], node.parent)
        top.lock, top.used = node.lock, node.used
        node.parent.children[top.key[0]] = top
        node.key, node.slots, node.parent = node.key[k:], node.slots[k:], top
        top.children[node.key[0]] = node
        return top

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def check(self) -> None:
        """Raises unless the tree is consistent: every slot either free or held by exactly one node, each node's
        lock at least its children's, edges keyed by their first token."""
        held = [s for n in self._nodes() for s in n.slots]
        if sorted(held + self.free) != list(range(self.capacity)):
            raise ExeGPTError("prefix cache: slots lost or held twice")
        for n in self._nodes():
            if not n.key or len(n.key) != len(n.slots) or n.parent.children.get(n.key[0]) is not n:
                raise ExeGPTError("prefix cache: a malformed edge")
            if any(c.lock > n.lock for c in n.children.values()):
                raise ExeGPTError("prefix cache: a locked node under an unlocked one")


def _common(key: tuple[int, ...], tokens: Sequence[int], i: int) -> int:
    """Length of the common prefix of ``key`` and ``tokens[i:]``."""
    k, n = 0, min(len(key), len(tokens) - i)
    while k < n and key[k] == tokens[i + k]:
        k += 1
    return k


class PrefixCache:
    """What an engine keeps for a run with prefix caching: the tree and the prefix each request holds.

    A request is ``admit``-ted when a prompt chunk first takes a row for it: its row gets the ``cached(rid)``
    tokens the pool holds, and it holds (locks) that prefix while the rest of its prompt is prefilled, maybe over
    several steps; when its last chunk is in it ``publish``-es its prompt (extending the prefix it holds, which
    eviction therefore cannot have dropped) and lets go. A row holds its own copy, so a decoding request reads
    nothing from the pool. ``release``: a request's row was freed (preempted) before its prompt was in."""

    def __init__(self, capacity: int, prompt: Callable[[int], Sequence[int]]):
        """``prompt(rid)``: the prompt token ids of request ``rid``."""
        self.tree = RadixCache(capacity)
        self.prompt = prompt
        self.held: dict[int, int] = {}  # request -> leading prompt tokens it holds locked
        self.hit_tokens = 0
        """Prompt tokens read from the cache instead of prefilled."""

    def cached(self, rid: int) -> int:
        """Leading prompt tokens of ``rid`` the cache holds, at most all but the last (whose logits give the first
        token)."""
        p = self.prompt(rid)
        return min(self.tree.match_len(p), len(p) - 1)

    def admit(self, rid: int, start: int) -> list[int]:
        """``rid`` takes a row holding its first ``start`` prompt tokens from the cache (``start`` must be
        ``cached(rid)``); returns their slots, in position order."""
        if start != self.cached(rid):
            raise ExeGPTError(f"request {rid}: a chunk starts at {start} and the prefix cache holds "
                              f"{self.cached(rid)} of its prompt")
        prefix = self.prompt(rid)[:start]
        nodes = self.tree.path(prefix)
        self.tree.lock(prefix)
        self.held[rid] = start
        self.hit_tokens += start
        return [s for n in nodes for s in n.slots]

    def publish(self, rid: int) -> list[tuple[int, list[int]]]:
        """``rid``'s whole prompt is in its row: cache it; returns the segments (start, slots) to save."""
        _, segments = self.tree.insert(self.prompt(rid))  # all of the prompt, or what the pool has room for
        self.release(rid)  # its row holds its own copy from here on
        return segments

    def release(self, rid: int) -> None:
        n = self.held.pop(rid, 0)
        if n:
            self.tree.unlock(self.prompt(rid)[:n])
