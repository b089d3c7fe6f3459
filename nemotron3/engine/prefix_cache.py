"""Automatic prefix caching for the hybrid cache: full K/V blocks shared by content, Mamba states at block ends.

Attention layers can reuse any prefix's K/V, but a Mamba layer's state after a prefix is one running value: it
can be resumed only where it was saved. The cache is therefore a trie of full blocks (block_size tokens per edge,
keyed by the exact token tuple under the parent, so no hash can collide). A node holds its block's K/V block id
and, at a few chosen nodes, a snapshot of every Mamba layer's conv window and SSM state at the block's end (a slot
of the snapshot pool). A new sequence resumes at the deepest matched node that holds a snapshot (any matched node
in a model without Mamba layers): it shares the K/V blocks before that point and copies the state into its own
slot, so it never writes a shared block (its new tokens start a block of their own).

Nodes that no sequence holds stay cached until their block or state is needed: blocks are reclaimed from the
least recently used leaves (a node's children were used no earlier than it was), states from the least recently
used node holding one. A state costs far more than a block (Nano: 47 MiB, against 96 KiB for a block of 16
tokens), so the engine saves few (engine.py, _prompt_snapshots): at the end of a prompt's last full block; where a prompt
leaves the cached blocks of an earlier one (the end of a shared system prompt: the next prompt that shares it
resumes there); and at the latest block end of a decoding sequence.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    """One cached full block: its tokens under the parent node, its K/V block, optionally the state at its end."""

    parent: Node | None
    tokens: tuple[int, ...]
    depth: int  # blocks from the root: the node ends at token depth·block_size
    block: int | None  # K/V block id (None in a model without attention layers)
    state: int | None = None  # snapshot slot with the Mamba state after the node's last token
    refs: int = 0  # sequences whose block tables hold this node
    last_used: int = 0
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)

    @property
    def attached(self) -> bool:
        return self.parent is not None and self.parent.children.get(self.tokens) is self


class PrefixCache:
    """The trie of cached blocks, with LRU reclamation of blocks (`evict_blocks`) and states (`take_state`).

    free_block / free_state return an id to its pool; take_free_state takes a free snapshot slot or returns None."""

    def __init__(
        self, block_size: int, needs_state: bool, free_block: Callable[[int], None],
        free_state: Callable[[int], None], take_free_state: Callable[[], int | None],
    ) -> None:  # fmt: skip
        self.block_size = block_size
        self.needs_state = needs_state  # a Mamba layer exists: resume only where a state was saved
        self._free_block, self._free_state, self._take_free_state = free_block, free_state, take_free_state
        self.root = Node(None, (), 0, None)
        self.evictable_blocks = 0  # blocks of nodes no sequence holds: reclaimable on demand
        self.num_nodes = 0
        self._clock = itertools.count(1)
        self._leaves: list[tuple[int, int, Node]] = []  # (last_used, tiebreak, node): candidates for evict_blocks
        self._states: list[tuple[int, int, Node]] = []  # (last_used, tiebreak, node): nodes holding a state
        self._tiebreak = itertools.count()

    # ------------------------------------------------------------------ lookup and holding
    def match(self, ids: list[int]) -> tuple[list[Node], int]:
        """(nodes, depth): the longest chain of cached blocks that a sequence with tokens `ids` can resume from,
        and how many full blocks of ids[:-1] the trie holds (the last token is always computed, for its logits).
        With Mamba layers the chain is cut back to the deepest node with a state; where depth is larger, another
        sequence shares this one's first depth blocks and diverged there (a shared system prompt, say)."""
        path, node, bs = [], self.root, self.block_size
        for i in range((len(ids) - 1) // bs):
            node = node.children.get(tuple(ids[i * bs : (i + 1) * bs]))
            if node is None:
                break
            path.append(node)
        depth = len(path)
        if self.needs_state:
            while path and path[-1].state is None:
                path.pop()
        return path, depth

    def acquire(self, nodes: list[Node]) -> None:
        """A sequence holds these nodes (their blocks join its block table)."""
        for node in nodes:
            if node.refs == 0 and node.block is not None:
                self.evictable_blocks -= 1
            node.refs += 1
            self._touch(node)

    def release(self, nodes: list[Node]) -> None:
        """A sequence lets go of these nodes; they stay cached until reclaimed."""
        for node in reversed(nodes):  # deepest first: a parent becomes a leaf candidate after its children
            node.refs -= 1
            if node.refs:
                continue
            if node.block is not None:
                self.evictable_blocks += 1
            self._touch(node)
            if node.block is None and node.state is None:
                self._prune(node)
            elif not node.children:
                self._push(self._leaves, node)

    def insert(self, parent: Node, tokens: tuple[int, ...], block: int | None) -> Node:
        """The node for `tokens` under `parent`, held once more by the caller: the existing one if another sequence
        cached the same block first (the caller then reads that node's block instead of its own), else a new
        node owning `block`."""
        node = parent.children.get(tokens)
        if node is not None:
            self.acquire([node])
            return node
        node = Node(parent, tokens, parent.depth + 1, block, refs=1, last_used=next(self._clock))
        parent.children[tokens] = node
        self.num_nodes += 1
        return node

    # ------------------------------------------------------------------ states
    def take_state(self) -> int | None:
        """A snapshot slot for a new state: a free one, else the least recently used node's (None: no pool)."""
        slot = self._take_free_state()
        while slot is None and self._states:
            used, _, node = heapq.heappop(self._states)
            if node.state is not None and node.attached and used == node.last_used:
                slot = self._drop_state(node, free=False)
        return slot

    def attach_state(self, node: Node, slot: int) -> bool:
        """Keep snapshot `slot` as the state at `node`'s end; False (slot untouched) if the node has one."""
        if node.state is not None or not node.attached:
            return False
        node.state = slot
        self._push(self._states, node)
        return True

    def move_state(self, src: Node, dst: Node) -> int | None:
        """Detach src's state slot for reuse at dst (a decoding sequence's moving snapshot); None if src has none
        or dst has one already."""
        if src.state is None or dst.state is not None or not src.attached:
            return None
        return self._drop_state(src, free=False)

    def _drop_state(self, node: Node, free: bool = True) -> int:
        slot, node.state = node.state, None
        if free:
            self._free_state(slot)
        if node.refs == 0 and node.block is None:
            self._prune(node)
        return slot

    # ------------------------------------------------------------------ reclaiming
    def evict_blocks(self, n: int) -> None:
        """Free at least n blocks from nodes no sequence holds, least recently used leaves first."""
        freed = 0
        while freed < n:
            if not self._leaves:
                raise MemoryError(f"prefix cache: asked to free {n} blocks, {freed} were reclaimable")
            used, _, node = heapq.heappop(self._leaves)
            if node.refs or node.children or not node.attached or used != node.last_used:
                continue
            freed += node.block is not None
            self._remove(node)
        self._compact()

    def reset(self) -> bool:
        """Drop every node no sequence holds (vLLM's reset_prefix_cache); True if the cache is now empty."""
        stack = list(self.root.children.values())
        order = []
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):  # children before parents
            if not node.attached:  # pruned with a child
                continue
            if node.state is not None:
                self._free_state(node.state)
                node.state = None
            if node.refs == 0 and not node.children:
                self._remove(node)
        self._leaves, self._states = [], []  # what is left is held by sequences and holds no state
        return self.num_nodes == 0

    def _remove(self, node: Node) -> None:
        """Detach a leaf no sequence holds, returning its block and state to their pools."""
        if node.block is not None:
            self._free_block(node.block)
            self.evictable_blocks -= 1
        if node.state is not None:
            self._free_state(node.state)
            node.state = None
        parent = node.parent
        del parent.children[node.tokens]
        node.parent = None
        self.num_nodes -= 1
        if parent is not self.root and parent.refs == 0 and not parent.children:
            if parent.block is None and parent.state is None:
                self._prune(parent)
            else:
                self._push(self._leaves, parent)

    def _prune(self, node: Node) -> None:
        """Remove a node that holds nothing (no block, no state, no sequence) and has no children."""
        if node.attached and not node.children and node.refs == 0 and node.block is None and node.state is None:
            self._remove(node)

    def _touch(self, node: Node) -> None:
        node.last_used = next(self._clock)
        if node.state is not None:
            self._push(self._states, node)

    def _push(self, heap: list, node: Node) -> None:
        heapq.heappush(heap, (node.last_used, next(self._tiebreak), node))

    def _compact(self) -> None:
        """Drop stale heap entries once they outnumber the live ones (each touch pushes a new entry)."""
        if len(self._leaves) > 2 * self.num_nodes + 64:
            self._leaves = [e for e in self._leaves if e[0] == e[2].last_used and e[2].attached]
            heapq.heapify(self._leaves)
        if len(self._states) > 2 * self.num_nodes + 64:
            self._states = [e for e in self._states if e[2].state is not None and e[2].attached]
            heapq.heapify(self._states)
