"""Paged KV cache with prefix caching, shared by every engine kind.

Blocks hold ``block_size`` tokens. Full prompt blocks are registered under a chained hash
so a later request with the same prefix reuses them (vLLM's automatic prefix caching,
SGLang's radix cache, TGI v3's prefix cache all behave like this at block granularity).
A cached block nobody uses is still counted free; it is evicted least-recently-used when
an allocation needs the room.
"""

from __future__ import annotations

from collections import OrderedDict


class KVCache:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free = num_blocks  # includes evictable cached blocks
        self._refs: dict[int, int] = {}  # cached blocks in use -> users
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused, LRU order
        self.queries_tokens = 0
        self.hits_tokens = 0

    @property
    def used(self) -> int:
        return self.num_blocks - self.free

    @property
    def usage(self) -> float:
        return self.used / self.num_blocks if self.num_blocks else 0.0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> bool:
        """Take ``count`` blocks, evicting unused cached blocks if needed; False if they do not fit."""
        if count <= 0:
            return True
        if count > self.free:
            return False
        self.free -= count
        uncached_free = self.free - len(self._evictable)
        while uncached_free < 0:
            self._evictable.popitem(last=False)
            uncached_free += 1
        return True

    def release(self, count: int) -> None:
        self.free += count

    def match_prefix(self, hashes: list[int], limit: int | None = None) -> list[int]:
        """Acquire the longest cached prefix of ``hashes`` (at most ``limit`` blocks).

        Acquired blocks stop being evictable; give them back with :meth:`release_shared` if
        the admission they were for does not go ahead.
        """
        if not self.prefix_caching:
            return []
        acquired: list[int] = []
        for h in hashes[:limit]:
            if h in self._refs:
                self._refs[h] += 1
            elif h in self._evictable:
                del self._evictable[h]
                self._refs[h] = 1
                self.free -= 1
            else:
                break
            acquired.append(h)
        return acquired

    def record_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Count one admitted request's prefix lookup (vLLM counts queries and hits in tokens)."""
        if self.prefix_caching:
            self.queries_tokens += prompt_tokens
            self.hits_tokens += hit_tokens

    def register(self, h: int) -> bool:
        """Publish a just-computed full block under ``h``; False if someone else already did."""
        if not self.prefix_caching or h in self._refs or h in self._evictable:
            return False
        self._refs[h] = 1
        return True

    def release_shared(self, hashes: list[int]) -> None:
        for h in hashes:
            users = self._refs[h] - 1
            if users:
                self._refs[h] = users
            else:
                del self._refs[h]
                self._evictable[h] = None
                self.free += 1

    def reset(self) -> bool:
        """Drop every unused cached block (``/reset_prefix_cache``, ``/flush_cache``)."""
        self._evictable.clear()
        return True
