"""Where a decode step's GPU time goes: per-kernel totals of a random-weight target.

    python scripts/profile_decode.py --preset qwen3-4b --batch 1

Needs torch beside jax on a CUDA machine (benchlib.kernel_times). Kernels are grouped by name
with the per-instance number stripped (gemm_fusion_dot.17 -> gemm_fusion_dot).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from dspark_jax import Target
from dspark_jax.models.presets import preset

from benchlib import kernel_times, print_kernel_times


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

    state = [jnp.zeros((args.batch, 1), jnp.int32), cache]  # (tokens, cache), carried from step to step

    def run():
        state[:] = decode(target.params, state[1], state[0])
        state[0].block_until_ready()

    print_kernel_times(kernel_times(run, args.steps), f"{args.preset} batch {args.batch} context {args.context}",
                       args.top, group=True)


if __name__ == "__main__":
    main()
