"""Host-side bookkeeping of KV pages: the allocator and the pool size for a memory budget.

Page 0 is scratch: never handed out, it is where every unused block-table entry points, so a
row that is idle in a step (a free slot, a row still prefilling) writes nowhere that matters.
The target and the draft have one pool each, with the same page ids: a request's page i holds
positions i * page_size.. in both, so one block table serves both caches.
"""

from __future__ import annotations

import jax

SCRATCH_PAGE = 0


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a KV pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.usable - len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` pages, or None (and nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        return [self._free.pop() for _ in range(count)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def page_bytes(layer_configs, page_size: int, dtype, kv_shards: int = 1) -> int:
    """Device bytes of one page id across every pool (keys and values of each layer of each
    given ModelConfig), per device when KV heads are split kv_shards ways."""
    itemsize = jax.numpy.dtype(dtype).itemsize
    total = sum(c.kv_width for c in layer_configs)
    return page_size * total * itemsize // kv_shards


def pages_for_budget(kv_memory: float | int | None, bytes_per_page: int, device) -> int:
    """Pool size for a budget: a fraction in (0, 1] of the device's free memory, or a byte
    count (an int > 1). None: 0.8 of free memory where the backend reports it, else 1 GiB."""
    if kv_memory is None or isinstance(kv_memory, float):
        fraction = 0.8 if kv_memory is None else kv_memory
        if not 0 < fraction <= 1:
            raise ValueError(f"kv_memory must be a fraction in (0, 1] or a byte count, got {kv_memory!r}")
        stats = device.memory_stats()
        if stats and "bytes_limit" in stats:
            budget = int(fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
        elif kv_memory is None:
            budget = 1 << 30
        else:
            raise ValueError(f"kv_memory={kv_memory} is a fraction of free device memory, which {device.platform} "
                             "does not report; give a byte count or num_pages")
    elif isinstance(kv_memory, int) and kv_memory > 1:
        budget = kv_memory
    else:
        raise ValueError(f"kv_memory must be a fraction in (0, 1] or a byte count, got {kv_memory!r}")
    return budget // bytes_per_page
