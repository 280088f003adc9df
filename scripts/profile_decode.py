"""Where a decode step's GPU time goes: per-kernel totals of a random-weight target.

    python scripts/profile_decode.py --preset qwen3-4b --batch 1

Needs torch beside jax on a CUDA machine: torch's profiler reads CUPTI's kernel records,
which cover every kernel in the process, XLA's included. Kernels are grouped by name with
the per-instance number stripped (gemm_fusion_dot.17 -> gemm_fusion_dot).
"""

from __future__ import annotations

import argparse
import collections
import functools
import re

import jax
import jax.numpy as jnp
import torch
from torch.profiler import ProfilerActivity, profile

from dspark_jax import Target
from dspark_jax.models.presets import preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-4b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    config = preset(args.preset)
    target = Target.random(config, dtype="bfloat16")
    cache = target.init_cache(args.batch, args.context + 128)
    cache = cache.replace(lengths=jnp.full((args.batch,), args.context, jnp.int32))

    @functools.partial(jax.jit, donate_argnums=1)
    def decode(params, cache, tokens):
        logits, _, _, new = target.extend(params, cache, tokens, jnp.ones(tokens.shape[:1], jnp.int32))
        return jnp.argmax(logits[:, 0], axis=-1)[:, None].astype(jnp.int32), new.rollback(cache.lengths)

    tokens = jnp.zeros((args.batch, 1), jnp.int32)
    for _ in range(3):
        tokens, cache = decode(target.params, cache, tokens)
    tokens.block_until_ready()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            tokens, cache = decode(target.params, cache, tokens)
        tokens.block_until_ready()
        torch.cuda.synchronize()

    totals = collections.defaultdict(lambda: [0.0, 0.0])  # name -> [ms per step, launches per step]
    for event in prof.key_averages():
        if event.device_time_total:
            name = re.sub(r"[_.]\d+$", "", event.key)
            totals[name][0] += event.device_time_total / args.steps / 1e3
            totals[name][1] += event.count / args.steps
    ms = sum(t for t, _ in totals.values())
    launches = sum(c for _, c in totals.values())
    print(f"{args.preset} batch {args.batch} context {args.context}: {ms:.3f} ms of kernel time and "
          f"{launches:.0f} kernels per decode step")
    for name, (t, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{t:8.3f} ms {count:6.0f}x  {name[:100]}")


if __name__ == "__main__":
    main()
