"""The engine's hybrid cache: paged K/V blocks for attention layers, state slots for Mamba layers.

Both pools are allocated once, up front, from the memory budget (research/serving.md: vLLM and SGLang
manage hybrid models the same way). A sequence owns one state slot (conv window + float32 SSM state
per Mamba layer, constant size) and a list of K/V blocks (grows by one block every `block_size`
tokens). K/V are stored per layer as [nkv, num_blocks·block_size, d]: a sequence whose blocks are
consecutive (the allocator hands out the lowest free ids first, so a request running alone always is)
reads its keys as a view; otherwise they are gathered through its block table.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nemotron3.config import ATTENTION, MAMBA, ModelConfig
from nemotron3.engine.prefix_cache import Node, PrefixCache
from nemotron3.model.nemotron import SSM_DTYPES


def pool_bytes(
    config: ModelConfig, dtype: torch.dtype, kv_dtype: torch.dtype | None = None, block_size: int = 16,
    mtp_attention_layers: int = 0,
) -> tuple[int, int]:  # fmt: skip
    """(bytes of one sequence's state slot, bytes of one K/V block) in HybridCache's pools: a slot holds every
    Mamba layer's conv window (in dtype, the activations') and SSM state (in mamba_ssm_cache_dtype); a block
    holds K and V of block_size tokens for every attention layer and MTP attention layer, in kv_dtype
    (default dtype)."""
    kinds = config.layers_block_type
    n_attn, n_mamba = kinds.count(ATTENTION) + mtp_attention_layers, kinds.count(MAMBA)
    ssm = SSM_DTYPES[config.mamba_ssm_cache_dtype]
    slot = n_mamba * (
        config.mamba_conv_dim * (config.conv_kernel - 1) * dtype.itemsize
        + config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * ssm.itemsize
    )
    block = n_attn * 2 * config.num_key_value_heads * block_size * config.head_dim * (kv_dtype or dtype).itemsize
    return slot, block


@dataclass
class CacheConfig:
    """Sizes of the preallocated pools. `memory_bytes` bounds K/V blocks + state slots together.

    enable_prefix_caching keeps full K/V blocks after their sequences finish, for later prompts that start with the
    same tokens (prefix_cache.py); prefix_cache_states is the number of Mamba state snapshots it keeps beside them
    (default max_num_seqs; each costs one state slot of the memory)."""

    memory_bytes: int = 2 << 30
    block_size: int = 16
    max_num_seqs: int = 64
    enable_prefix_caching: bool = False
    prefix_cache_states: int | None = None

    @property
    def num_snapshots(self) -> int:
        if not self.enable_prefix_caching:
            return 0
        return self.max_num_seqs if self.prefix_cache_states is None else self.prefix_cache_states

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.memory_bytes <= 0:
            raise ValueError(f"cache memory_bytes must be > 0, got {self.memory_bytes}")
        if self.prefix_cache_states is not None and self.prefix_cache_states < 0:
            raise ValueError(f"prefix_cache_states must be >= 0, got {self.prefix_cache_states}")


class FreeList:
    """Integer ids handed out lowest-first (keeps a lone sequence's blocks consecutive): first … first+n−1."""

    def __init__(self, n: int, first: int = 0) -> None:
        self.capacity = n
        self._free = list(range(first, first + n))

    def __len__(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} ids, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def give(self, ids: list[int]) -> None:
        for i in ids:
            heapq.heappush(self._free, i)


@dataclass
class SeqCache:
    """What one sequence holds in the cache.

    `blocks` is the block table. It changes only through add_blocks / truncate / clear, which keep an int64
    tensor mirror in step, so a decode step at 32k context reads its 2,048-entry table without rebuilding it
    from the list (~0.3 ms per step)."""

    slot: int
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens whose K/V and state are in the cache
    # prefix caching: the cached nodes of the first len(nodes) full blocks (blocks[i] is nodes[i].block), and the
    # node holding this sequence's moving state snapshot while it decodes (HybridCache.save_state)
    nodes: list[Node] = field(default_factory=list, repr=False)
    tail: Node | None = field(default=None, repr=False)
    _mirror: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False, compare=False)
    _synced: int = field(default=0, repr=False, compare=False)  # leading entries of _mirror equal to blocks

    def add_blocks(self, ids: list[int]) -> None:
        self.blocks.extend(ids)

    def truncate(self, n: int) -> list[int]:
        """Keep the first n blocks; returns the ones dropped."""
        dropped = self.blocks[n:]
        del self.blocks[n:]
        self._synced = min(self._synced, n)
        return dropped

    def clear(self) -> list[int]:
        return self.truncate(0)

    def replace_block(self, i: int, block: int) -> None:
        """Point table entry i at another block (one holding the same tokens' K/V)."""
        self.blocks[i] = block
        self._synced = min(self._synced, i)

    def table(self, n: int | None = None) -> torch.Tensor:
        """The first n (default all) block ids as an int64 tensor: a view of the mirror, extended on demand."""
        have = len(self.blocks)
        if self._synced < have:
            if self._mirror.numel() < have:  # grow geometrically: appends cost O(1) amortised
                bigger = torch.empty(max(have, 2 * self._mirror.numel(), 16), dtype=torch.long)
                bigger[: self._synced] = self._mirror[: self._synced]
                self._mirror = bigger
            self._mirror[self._synced : have] = torch.tensor(self.blocks[self._synced :], dtype=torch.long)
            self._synced = have
        return self._mirror[: have if n is None else n]


class HybridCache:
    """Preallocated pools for every attention and Mamba layer of one model."""

    def __init__(
        self, config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
        mtp_attention_layers: int = 0, kv_dtype: torch.dtype | None = None,
    ):  # fmt: skip
        """dtype: the activations' (conv windows); kv_dtype: the K/V pools' (default dtype; bfloat16 halves them,
        K and V are rounded as they are written). mtp_attention_layers: extra K/V planes for the MTP block's
        attention layers (speculative decoding); they share each sequence's block table, MTP position i living
        where main position i does."""
        self.config = config
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        kinds = config.layers_block_type
        self.attn_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k == ATTENTION)}
        self.mamba_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k == MAMBA)}
        n_attn, n_mamba = len(self.attn_index), len(self.mamba_index)
        self.mtp_planes = [n_attn + j for j in range(mtp_attention_layers)]
        n_planes = n_attn + mtp_attention_layers
        ssm_dtype = SSM_DTYPES[config.mamba_ssm_cache_dtype]
        kv_dtype = kv_dtype or dtype
        slot_bytes, block_bytes = pool_bytes(config, dtype, kv_dtype, self.block_size, mtp_attention_layers)
        snapshots = cache_config.num_snapshots if n_mamba else 0  # a model without Mamba layers resumes anywhere
        slots = cache_config.max_num_seqs + snapshots
        left = cache_config.memory_bytes - slots * slot_bytes
        if left < 0:
            raise ValueError(
                f"cache memory {cache_config.memory_bytes / 2**20:.1f} MiB cannot hold {slots} Mamba state slots "
                f"({slot_bytes / 2**20:.2f} MiB each{f'; {snapshots} of them prefix-cache snapshots' if snapshots else ''})"
                ": raise the memory budget, or lower max_num_seqs or prefix_cache_states"
            )
        num_blocks = left // block_bytes if block_bytes else 0
        if n_planes and num_blocks < 1:
            raise ValueError(f"cache memory leaves no room for a single K/V block ({block_bytes} bytes)")
        self.num_blocks = int(num_blocks)
        self.slot_bytes, self.block_bytes = slot_bytes, block_bytes
        tokens = self.num_blocks * self.block_size
        nkv, d = config.num_key_value_heads, config.head_dim
        self.k = torch.zeros(n_planes, nkv, tokens, d, dtype=kv_dtype, device=device)
        self.v = torch.zeros(n_planes, nkv, tokens, d, dtype=kv_dtype, device=device)
        self.conv = torch.zeros(n_mamba, slots, config.mamba_conv_dim, config.conv_kernel - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(
            n_mamba, slots, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size,
            dtype=ssm_dtype, device=device,
        )  # fmt: skip
        self.free_blocks = FreeList(self.num_blocks)
        # Blocks that several sequences hold, block id -> holders (>= 2): a fork shares its parent's full blocks
        # (a full block is never written again) when no prefix cache does; the last holder frees it.
        self.block_holders: dict[int, int] = {}
        self.free_slots = FreeList(cache_config.max_num_seqs)  # running sequences' slots
        self.free_snapshots = FreeList(snapshots, first=cache_config.max_num_seqs)  # prefix-cache states
        self.has_attention = n_planes > 0
        self.prefix: PrefixCache | None = None
        if cache_config.enable_prefix_caching:
            self.prefix = PrefixCache(
                self.block_size, n_mamba > 0, lambda b: self.free_blocks.give([b]),
                lambda s: self.free_snapshots.give([s]), lambda: self.free_snapshots.take(1)[0] if self.free_snapshots else None,
            )  # fmt: skip

    # ------------------------------------------------------------------ accounting
    def blocks_needed(self, seq: SeqCache | None, new_tokens: int) -> int:
        """Extra blocks a sequence needs to hold `new_tokens` more tokens."""
        if not self.has_attention:
            return 0
        have = len(seq.blocks) if seq else 0
        total = (seq.num_tokens if seq else 0) + new_tokens
        return max(0, -(-total // self.block_size) - have)

    def available_blocks(self, holding: list[Node] = ()) -> int:
        """Blocks a sequence can still get: the free ones and the cached ones no sequence holds (reclaimed on
        demand), less those among `holding` (cached nodes about to be held)."""
        if self.prefix is None:
            return len(self.free_blocks)
        held = sum(1 for n in holding if n.refs == 0 and n.block is not None)
        return len(self.free_blocks) + self.prefix.evictable_blocks - held

    def can_grow(self, seq: SeqCache | None, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= self.available_blocks()

    def open(self, cached: list[Node] = (), state_from: int | None = None) -> SeqCache:
        """A new sequence with one state slot: zeroed (the recurrence starts from S = 0, empty conv window), or
        resuming after the cached prefix `cached` (PrefixCache.match): its blocks shared, the state at its end
        copied into the slot (from slot `state_from` instead, where given)."""
        slot = self.free_slots.take(1)[0]
        seq = SeqCache(slot=slot)
        if state_from is None and cached and cached[-1].state is not None:
            state_from = cached[-1].state
        if state_from is not None:
            self.copy_state(state_from, slot)
        else:
            self.conv[:, slot].zero_()
            self.ssm[:, slot].zero_()
        if cached:
            self.prefix.acquire(cached)
            seq.nodes = list(cached)
            seq.num_tokens = len(cached) * self.block_size
            if self.has_attention:
                seq.add_blocks([n.block for n in cached])
        return seq

    def copy_state(self, src: int, dst: int) -> None:
        """Copy every Mamba layer's conv window and SSM state from slot src to slot dst."""
        self.conv[:, dst] = self.conv[:, src]
        self.ssm[:, dst] = self.ssm[:, src]

    def grow(self, seq: SeqCache, new_tokens: int) -> None:
        """Reserve blocks so the sequence can hold `new_tokens` more tokens."""
        seq.add_blocks(self._take_blocks(self.blocks_needed(seq, new_tokens)))

    def _take_blocks(self, n: int) -> list[int]:
        """n free blocks, reclaiming cached ones no sequence holds when the free list runs short."""
        if n > len(self.free_blocks) and self.prefix is not None:
            self.prefix.evict_blocks(n - len(self.free_blocks))
        return self.free_blocks.take(n)

    def _shared_tokens(self, parent: SeqCache) -> int:
        """Tokens of `parent` a fork shares rather than copies: its cached blocks', or without a prefix cache
        all its full blocks'."""
        if self.prefix is not None or not self.has_attention:
            return len(parent.nodes) * self.block_size
        return parent.num_tokens // self.block_size * self.block_size

    def can_fork(self, parent: SeqCache) -> bool:
        """Whether a free slot and enough free blocks remain to fork `parent` (its unshared blocks copied)."""
        need = self.blocks_needed(None, parent.num_tokens - self._shared_tokens(parent))
        return bool(len(self.free_slots)) and need <= self.available_blocks()

    def fork(self, parent: SeqCache) -> SeqCache:
        """A new sequence holding `parent`'s cache: a slot of its own with the parent's conv window and SSM state;
        the parent's full K/V blocks shared (through the prefix cache's nodes where it runs, else counted in
        block_holders) and its partial last block copied into one of its own. The n samples of a prompt
        prefill it once and fork (engine.py): a fork costs one state and at most one block, not the prompt's
        K/V again."""
        if not self.can_fork(parent):
            raise MemoryError("no free slot or blocks to fork a sequence into")
        child = self.open(parent.nodes, state_from=parent.slot)
        shared = self._shared_tokens(parent)
        if shared > child.num_tokens:  # no prefix cache: hold the parent's full blocks too
            blocks = parent.blocks[: shared // self.block_size]
            for b in blocks:
                self.block_holders[b] = self.block_holders.get(b, 1) + 1
            child.add_blocks(blocks)
            child.num_tokens = shared
        self.grow(child, parent.num_tokens - shared)
        child.num_tokens = parent.num_tokens
        if self.has_attention and parent.num_tokens > shared:
            dst, src = (self.token_positions(s, shared, parent.num_tokens - shared) for s in (child, parent))
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]
        return child

    def release_blocks(self, blocks: list[int]) -> None:
        """Let go of blocks a sequence held: back to the free list, or one holder fewer where shared."""
        free = []
        for b in blocks:
            holders = self.block_holders.get(b)
            if holders is None:
                free.append(b)
            elif holders == 2:
                del self.block_holders[b]
            else:
                self.block_holders[b] = holders - 1
        self.free_blocks.give(free)

    def close(self, seq: SeqCache) -> None:
        """Return a sequence's slot and own blocks to the pools; its cached blocks stay cached."""
        private = seq.clear()[len(seq.nodes) :] if self.has_attention else []
        if seq.nodes:
            self.prefix.release(seq.nodes)
            seq.nodes, seq.tail = [], None
        self.release_blocks(private)
        self.free_slots.give([seq.slot])
        seq.slot = -1

    # ------------------------------------------------------------------ prefix caching
    def commit(self, seq: SeqCache, ids: Callable[[int, int], list[int]]) -> None:
        """Cache the sequence's full blocks that are not cached yet; ids(a, b) gives its tokens a … b−1. A block
        whose tokens (after the same prefix) another sequence cached first is swapped for that one, and freed."""
        bs = self.block_size
        for i in range(len(seq.nodes), seq.num_tokens // bs):
            parent = seq.nodes[-1] if seq.nodes else self.prefix.root
            block = seq.blocks[i] if self.has_attention else None
            node = self.prefix.insert(parent, tuple(ids(i * bs, (i + 1) * bs)), block)
            if node.block != block:
                seq.replace_block(i, node.block)
                self.free_blocks.give([block])
            seq.nodes.append(node)

    def take_snapshot_slot(self) -> int | None:
        """A prefix-cache snapshot slot (reclaiming the least recently used state), or None without a pool."""
        return self.prefix.take_state() if self.prefix is not None and self.free_snapshots.capacity else None

    def keep_snapshot(self, seq: SeqCache, depth: int, slot: int) -> None:
        """Keep snapshot `slot` (the state after `depth` full blocks of `seq`, which commit cached) in the prefix
        cache, or return it to the pool where that node has a state already."""
        if not self.prefix.attach_state(seq.nodes[depth - 1], slot):
            self.free_snapshots.give([slot])

    def save_state(self, seq: SeqCache) -> None:
        """Snapshot a sequence's state at its current block end (num_tokens a multiple of block_size, committed):
        the slot of its previous such snapshot moves here, so one sequence holds one (HybridCache's others belong
        to prompts: PrefixCache.attach_state)."""
        node = seq.nodes[seq.num_tokens // self.block_size - 1]
        if node.state is not None:
            return
        slot = self.prefix.move_state(seq.tail, node) if seq.tail is not None else None
        if slot is None:
            slot = self.take_snapshot_slot()
            if slot is None:
                return
        self.copy_state(seq.slot, slot)
        self.prefix.attach_state(node, slot)
        seq.tail = node

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block and state no sequence holds; True if nothing cached is left."""
        return self.prefix.reset() if self.prefix is not None else True

    # ------------------------------------------------------------------ addressing
    def token_positions(self, seq: SeqCache, start: int, n: int) -> torch.Tensor:
        """Pool token indices of positions start … start+n−1 of a sequence (through its block table)."""
        bs = self.block_size
        if n <= 16:  # decode: a few positions, without turning the whole block table into a tensor
            return torch.tensor([seq.blocks[p // bs] * bs + p % bs for p in range(start, start + n)], dtype=torch.long)
        pos = torch.arange(start, start + n)
        blocks = seq.table()[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def write(self, j: int, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V [nkv, n, d] of plane j at pool token indices idx [n], in the pool's dtype."""
        self.k[j].index_copy_(1, idx, k.to(self.k.dtype))
        self.v[j].index_copy_(1, idx, v.to(self.v.dtype))

    def kv_view(self, layer: int, seq: SeqCache, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first `length` tokens of a sequence: [nkv, length, d] (a view when blocks are consecutive)."""
        return self.plane_view(self.attn_index[layer], seq, length)

    def is_contiguous(self, seq: SeqCache, length: int) -> bool:
        """Whether the blocks holding the first `length` tokens are consecutive ids (then K/V are a view)."""
        n_blocks = -(-length // self.block_size)
        first = seq.blocks[0]
        return seq.blocks[n_blocks - 1] - first == n_blocks - 1 and seq.blocks[:n_blocks] == list(
            range(first, first + n_blocks)
        )

    def plane_view(self, j: int, seq: SeqCache, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_view by K/V plane index (main attention layers first, then the MTP planes)."""
        if self.is_contiguous(seq, length):
            start = seq.blocks[0] * self.block_size
            return self.k[j, :, start : start + length], self.v[j, :, start : start + length]
        idx = self.token_positions(seq, 0, length).to(self.k.device)
        return self.k[j].index_select(1, idx), self.v[j].index_select(1, idx)
