"""Decode attention over the paged KV pool against a contiguous cache, as XLA runs it today.

    python scripts/bench_paged_attention.py --preset qwen3-4b --batch 64 --widths 8 16 --contiguous 272

One query token per row (a plain decode step) over `length` valid positions. The paged path
gathers each row's pages into a [B, K, width * page_size, D] view (`PagedLayerCache.view`) and
attends over all of it; the contiguous path attends over a [B, K, S, D] cache. Prints ms per
layer and per step (every layer of the preset), the median of 20 timed calls after a compile.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.models.attention import cached_attention
from dspark_jax.models.kv_cache import PagedLayerCache
from dspark_jax.models.presets import preset


def median_ms(fn, *args) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16], help="block-table widths in pages")
    p.add_argument("--contiguous", type=int, default=272, help="positions of the contiguous cache")
    p.add_argument("--length", type=int, default=200, help="valid positions per row")
    args = p.parse_args(argv)

    cfg = preset(args.preset)
    b, k, n, d = args.batch, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
    key = jax.random.key(0)
    pool = jax.random.normal(key, (b * max(args.widths) + 1, args.page_size, k, d), jnp.bfloat16)  # [P, ps, K, D]
    q = jax.random.normal(key, (b, 1, n, d), jnp.bfloat16)  # [B, 1, N, D]
    lengths = jnp.full((b,), args.length, jnp.int32)
    positions = lengths[:, None] - 1  # [B, 1]

    def paged(table):
        return cached_attention(q, *PagedLayerCache(pool, pool + 1, table).view(), positions, lengths)

    def contiguous(cache):
        return cached_attention(q, cache, cache + 1, positions, lengths)

    print(f"{jax.devices()[0].device_kind}, {args.preset} layer shape, batch {b}, {args.length} valid positions")
    print("| cache | positions attended | ms per layer | ms per step |\n|---|---|---|---|")
    for w in args.widths:
        table = jnp.arange(1, 1 + b * w, dtype=jnp.int32).reshape(b, w)  # [B, W]
        ms = median_ms(paged, table)
        print(f"| paged, {w} pages | {w * args.page_size} | {ms:.3f} | {ms * cfg.num_layers:.2f} |")
    cache = jax.random.normal(key, (b, k, args.contiguous, d), jnp.bfloat16)  # [B, K, S, D]
    ms = median_ms(contiguous, cache)
    print(f"| contiguous | {args.contiguous} | {ms:.3f} | {ms * cfg.num_layers:.2f} |")


if __name__ == "__main__":
    main()
