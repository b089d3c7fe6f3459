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
from dataclasses import dataclass, field

import torch

from nemotron3.config import ATTENTION, MAMBA, ModelConfig
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
    """Sizes of the preallocated pools. `memory_bytes` bounds K/V blocks + state slots together."""

    memory_bytes: int = 2 << 30
    block_size: int = 16
    max_num_seqs: int = 64

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.memory_bytes <= 0:
            raise ValueError(f"cache memory_bytes must be > 0, got {self.memory_bytes}")


class FreeList:
    """Integer ids handed out lowest-first (keeps a lone sequence's blocks consecutive)."""

    def __init__(self, n: int) -> None:
        self.capacity = n
        self._free = list(range(n))

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
        slots = cache_config.max_num_seqs
        left = cache_config.memory_bytes - slots * slot_bytes
        if left < 0:
            raise ValueError(
                f"cache memory {cache_config.memory_bytes / 2**20:.1f} MiB cannot hold {slots} Mamba state slots "
                f"({slot_bytes / 2**20:.2f} MiB each): raise the memory budget or lower max_num_seqs"
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
        self.free_slots = FreeList(slots)
        self.has_attention = n_planes > 0

    # ------------------------------------------------------------------ accounting
    def blocks_needed(self, seq: SeqCache | None, new_tokens: int) -> int:
        """Extra blocks a sequence needs to hold `new_tokens` more tokens."""
        if not self.has_attention:
            return 0
        have = len(seq.blocks) if seq else 0
        total = (seq.num_tokens if seq else 0) + new_tokens
        return max(0, -(-total // self.block_size) - have)

    def can_grow(self, seq: SeqCache | None, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= len(self.free_blocks)

    def open(self) -> SeqCache:
        """A fresh sequence: one state slot, zeroed (the recurrence starts from S = 0, empty conv window)."""
        slot = self.free_slots.take(1)[0]
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()
        return SeqCache(slot=slot)

    def grow(self, seq: SeqCache, new_tokens: int) -> None:
        """Reserve blocks so the sequence can hold `new_tokens` more tokens."""
        seq.add_blocks(self.free_blocks.take(self.blocks_needed(seq, new_tokens)))

    def can_fork(self, parent: SeqCache) -> bool:
        """Whether a free slot and enough free blocks remain to copy `parent` (fork)."""
        return bool(len(self.free_slots)) and self.blocks_needed(None, parent.num_tokens) <= len(self.free_blocks)

    def fork(self, parent: SeqCache) -> SeqCache:
        """A new sequence holding a copy of `parent`'s cache: a slot of its own with the parent's conv window and SSM
        state, and blocks of its own with the parent's K/V. The n samples of a prompt prefill it once and fork
        (engine.py); a copy costs the state and K/V bytes (~2 MB for nemo50 at 2,048 tokens), a prefill the model."""
        if not self.can_fork(parent):
            raise MemoryError("no free slot or blocks to fork a sequence into")
        slot = self.free_slots.take(1)[0]
        self.conv[:, slot] = self.conv[:, parent.slot]
        self.ssm[:, slot] = self.ssm[:, parent.slot]
        child = SeqCache(slot=slot)
        self.grow(child, parent.num_tokens)
        child.num_tokens = parent.num_tokens
        if child.blocks:
            dst, src = (self.token_positions(s, 0, parent.num_tokens) for s in (child, parent))
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]
        return child

    def close(self, seq: SeqCache) -> None:
        """Return a sequence's slot and blocks to the pools."""
        self.free_blocks.give(seq.clear())
        self.free_slots.give([seq.slot])
        seq.slot = -1

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
