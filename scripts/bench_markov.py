"""One DSpark draft slot's sampling step: the fused Pallas kernel against the XLA path, against
the bytes floor.

    python scripts/bench_markov.py --batch 128 --rank 256 --vocab 151936 --sweep

At T = 1, from the same per-row keys, one slot's step runs as
- `xla`: the Markov bias (`einsum` of vec and W2), `probabilities` of the biased logits, then
  `draw` (what `kernels="xla"` runs in `BlockDrafter.sample_slot`);
- `pallas`: the Gumbel noise of the same keys, then `pallas_kernels.markov_sampling` (what
  `kernels="pallas"` runs);
- `kernel`: the kernel alone on noise made beforehand (with `--sweep`, for other block sizes
  too), to separate it from the noise's generation.
Each prints the median time and that time over the bytes floor of one slot (reading the fp32
logits and W2 once and writing q in fp32) at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchlib import announce_bandwidth, median_seconds
from dspark_jax.sampling import SamplingParams, draw, gumbel, probabilities
from pallas_kernels.markov_sampling import markov_sample
from pallas_kernels.markov_sampling.gpu import Blocks
from pallas_kernels.markov_sampling.tuning import pick_blocks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--sweep", action="store_true", help="time the kernel alone at other block sizes too")
    args = p.parse_args(argv)

    v, r = args.vocab, args.rank
    bandwidth = announce_bandwidth(f"V = {v}, Markov rank {r}, T = 1")
    print("| batch | implementation | blocks | us per slot | bytes floor (us) | of the floor |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        k = jax.random.split(jax.random.key(b), 4)
        base = 3 * jax.random.normal(k[0], (b, v), jnp.float32)
        vec = jax.random.normal(k[1], (b, r), jnp.bfloat16)
        w2 = (0.05 * jax.random.normal(k[2], (v, r), jnp.float32)).astype(jnp.bfloat16)
        keys = jax.random.split(k[3], b)
        temperature = jnp.ones((b,), jnp.float32)

        def xla(base, vec, w2, temperature, keys):
            bias = jnp.einsum("bm,vm->bv", vec, w2, preferred_element_type=jnp.float32)
            probs = probabilities(base + bias, SamplingParams(temperature=temperature, filtered=False))
            return probs, draw(keys, probs)

        fused = lambda base, vec, w2, temperature, keys: markov_sample(base, temperature, gumbel(keys, v), vec, w2)
        xla, fused = jax.jit(xla), jax.jit(fused)  # every array an argument: none is folded into the program
        inputs = (base, vec, w2, temperature, keys)
        (want_q, want), (got_q, got) = xla(*inputs), fused(*inputs)
        same = float(np.mean(np.asarray(want) == np.asarray(got)))
        err = float(jnp.max(jnp.abs(want_q - got_q)))
        if same < 0.98 or err > 1e-4:
            raise SystemExit(f"the kernel disagrees at batch {b}: {same:.1%} equal tokens, max |dq| {err:.2e}")
        floor = (2 * b * v * 4 + v * r * 2) / bandwidth
        row = lambda name, blocks, seconds: print(f"| {b} | {name} | {blocks} | {1e6 * seconds:.0f} | "
                                                  f"{1e6 * floor:.0f} | {seconds / floor:.2f}x |", flush=True)
        row("xla", "-", median_seconds(xla, *inputs))
        tuned = pick_blocks(batch=b, vocab=v, bias=True)
        row("pallas", _name(tuned), median_seconds(fused, *inputs))
        noise = gumbel(keys, v)
        variants = [tuned]
        if args.sweep:
            variants += [Blocks(rows, tile, splits, warps) for rows in (16, 32, 64, 128) if rows <= max(16, b)
                         for tile, splits, warps in ((128, 132, 4), (128, 264, 8), (256, 132, 8), (64, 264, 4))]
        for blocks in dict.fromkeys(variants):
            alone = jax.jit(lambda base, vec, w2, temperature, noise, blocks=blocks: markov_sample(
                base, temperature, noise, vec, w2, blocks=blocks))
            row("kernel", _name(blocks), median_seconds(alone, base, vec, w2, temperature, noise))


def _name(blocks: Blocks) -> str:
    return f"{blocks.rows} rows, tile {blocks.tile}, {blocks.splits} splits, {blocks.num_warps} warps"


if __name__ == "__main__":
    main()
