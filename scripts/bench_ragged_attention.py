"""Ragged paged attention: the Pallas kernel against XLA and cuDNN, as a fraction of bandwidth.

    python scripts/bench_ragged_attention.py --preset qwen3-4b --batch 1 16 64 256 --context 1024 8192 --queries 8

For each batch and context: every row holds `context` positions in pages of `--page-size`
(the last `--queries` of them are the new tokens that attend: a verify block of 1 + gamma), and
one layer's attention runs as

- `pallas`: `pallas_kernels.ragged_paged_attention` (the tuned blocks, and with `--sweep` the
  other block sizes too);
- `xla-paged`: what the engine ran before the kernel, every page of the block table gathered,
  then attention over the gathered view;
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` over a contiguous
  [B, S, K, D] cache with `key_value_seq_lengths` (no paging, and no causal mask inside the
  block, so it does a little less than the others).

Each program runs the layer over enough distinct pools to read well past the L2 cache, and
prints the median time per layer, the KV bytes it must read over that time, and that rate as
a fraction of a device copy's (read + write) bandwidth measured in the same run. The kernel's
output is checked against the jnp reference first.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchlib import announce_bandwidth, median_seconds
from dspark_jax.models.presets import preset
from pallas_kernels.ragged_paged_attention import gpu, ragged_paged_attention, reference
from pallas_kernels.ragged_paged_attention.tuning import pick_blocks

READ_BYTES = 1 << 29  # read at least this much per timed program (an H200's L2 is 60 MB)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--context", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--queries", type=int, default=8, help="query tokens per row (1 + gamma)")
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--sweep", action="store_true", help="time other block sizes of the kernel too")
    p.add_argument("--no-baselines", action="store_true", help="time the kernel alone")
    args = p.parse_args(argv)

    cfg = preset(args.preset)
    kv_heads, n, d, ps, t = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, args.page_size, args.queries
    dtype = jnp.bfloat16
    bandwidth = announce_bandwidth(f"{args.preset} layer shape (K={kv_heads}, N={n}, D={d}), pages of {ps}, "
                                   f"{t} queries per row")
    print("| batch | context | implementation | blocks | us per layer | KV GB/s | of copy bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for context in args.context:
        for b in args.batch:
            columns = -(-context // ps)
            kv_bytes = 2 * b * context * kv_heads * d * jnp.dtype(dtype).itemsize
            layers = int(np.clip(-(-READ_BYTES // kv_bytes), 1, 64))
            key = jax.random.key(b * 100003 + context)
            keys = jax.random.split(key, 2 * layers + 1)
            pool_shape = (b * columns + 1, ps, kv_heads, d)  # page 0 unused
            ks = [jax.random.normal(keys[2 * i], pool_shape, dtype) for i in range(layers)]
            vs = [jax.random.normal(keys[2 * i + 1], pool_shape, dtype) for i in range(layers)]
            q = jax.random.normal(keys[-1], (b, t, n, d), dtype)
            table = (1 + jax.random.permutation(key, b * columns)).reshape(b, columns).astype(jnp.int32)
            lengths = jnp.full((b,), context, jnp.int32)
            positions = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None]

            def over_layers(attend):
                return jax.jit(lambda q, ks, vs: sum(attend(q, k, v).astype(jnp.float32) for k, v in zip(ks, vs)))

            def row(name, blocks_text, fn, *fn_args):
                seconds = median_seconds(fn, *fn_args) / layers
                rate = kv_bytes / seconds
                print(f"| {b} | {context} | {name} | {blocks_text} | {1e6 * seconds:.1f} | {rate / 1e9:.0f} | "
                      f"{rate / bandwidth:.0%} |", flush=True)

            tuned = pick_blocks(batch=b, kv_heads=kv_heads, query_rows=t * (n // kv_heads), head_dim=d, page_size=ps,
                                table_columns=columns)
            got = ragged_paged_attention(q, ks[0], vs[0], table, positions, lengths, blocks=tuned)
            want = reference.ragged_paged_attention(q, ks[0], vs[0], table, positions, lengths)
            err = float(jnp.linalg.norm((got - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))
            if not err < 1e-2:
                raise SystemExit(f"the kernel is wrong at batch {b}, context {context}: relative error {err:.3g}")
            variants = [tuned]
            if args.sweep:  # other keys per step, warps and stages; and no splits, where the tuning splits
                variants += [gpu.Blocks(tuned.block_q, pages, tuned.splits, warps, stages)
                             for pages in (1, 2, 4) for warps in (4, 8) for stages in (2, 3)]
                variants += [dataclasses.replace(tuned, splits=1)]
                variants = list(dict.fromkeys(variants))
            for v in variants:
                fn = over_layers(lambda q, k, v_, v=v: ragged_paged_attention(q, k, v_, table, positions, lengths,
                                                                                blocks=v))
                label = (f"q{v.block_q} p{v.pages} s{v.splits} w{v.num_warps} st{v.num_stages}"
                         + (" (tuned)" if v == tuned else ""))
                row("pallas", label, fn, q, ks, vs)
            if args.no_baselines:
                continue
            fn = over_layers(lambda q, k, v: reference.ragged_paged_attention(q, k, v, table, positions, lengths))
            row("xla-paged", "", fn, q, ks, vs)
            try:
                contiguous = [k[1:].reshape(b, columns * ps, kv_heads, d) for k in ks]  # [B, S, K, D]
                values = [v[1:].reshape(b, columns * ps, kv_heads, d) for v in vs]
                fn = jax.jit(lambda q, ks, vs: sum(jax.nn.dot_product_attention(
                    q, k, v, key_value_seq_lengths=lengths, implementation="cudnn").astype(jnp.float32)
                    for k, v in zip(ks, vs)))
                row("cudnn", "contiguous", fn, q, contiguous, values)
                del contiguous, values
            except Exception as error:  # cuDNN refuses some shapes
                print(f"| {b} | {context} | cudnn | contiguous | n/a: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:120]} | | |", flush=True)
            del ks, vs


if __name__ == "__main__":
    main()
