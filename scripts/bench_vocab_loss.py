"""The chunk loss kernel (`pallas_kernels.vocab_loss`) against its jnp reference under XLA.

    python scripts/bench_vocab_loss.py                 # one chunk of 512 slots, Qwen3-4B's vocabulary

For random fp32 draft and target logits [rows, vocab], it times the softmaxes, CE, L1 and the
bf16 gradient: XLA's fusions of the reference, then the kernel with and without the L1 term's
gradient for each block setting tried (the tuned one first), against the time of reading both
logits once and writing the gradient once at the copy bandwidth measured in the same run. Each
kernel setting's results are checked against the reference's first.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchlib import announce_bandwidth
from dspark_jax.evaluation.step_times import timed
from pallas_kernels.vocab_loss import gpu, loss_and_grad
from pallas_kernels.vocab_loss.ops import BLOCKS

TRIED = (BLOCKS, gpu.Blocks(1, 4096, 8), gpu.Blocks(2, 2048, 8), gpu.Blocks(1, 8192, 8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    args = parser.parse_args()

    r, v = args.rows, args.vocab
    bandwidth = announce_bandwidth(f"chunk loss over [{r}, {v}] fp32 logits, bf16 gradient")
    keys = jax.random.split(jax.random.key(0), 5)
    d, y = jax.random.normal(keys[0], (r, v)) * 3, jax.random.normal(keys[1], (r, v)) * 3  # [R, V]
    labels = jax.random.randint(keys[2], (r,), 0, v)
    a, b = jax.random.uniform(keys[3], (r,)), jax.random.uniform(keys[4], (r,))
    floor = (2 * d.nbytes + r * v * 2) / bandwidth
    print(f"floor (both logits read once, the gradient written once): {floor * 1e3:.3f} ms")
    print(f"{'implementation':58} {'ms':>8} {'x floor':>8}")
    for l1_grad in (True, False):
        weights = b if l1_grad else jnp.zeros_like(b)
        run = lambda implementation, blocks=None: jax.jit(lambda d, y: loss_and_grad(
            d, y, labels, a, weights, l1_grad=l1_grad, out_dtype=jnp.bfloat16, implementation=implementation,
            blocks=blocks))
        reference = run("xla")
        want = reference(d, y)
        rows = [("xla (reference)", reference)] + [(f"pallas {blocks}", run("pallas", blocks)) for blocks in TRIED]
        for name, fn in rows:
            got = fn(d, y)
            for x, w in zip(got, want):
                np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(w, np.float32), rtol=1e-2, atol=1e-5)
            seconds = timed(lambda: jax.block_until_ready(fn(d, y)))
            print(f"{name + (' l1 grad' if l1_grad else ''):58} {seconds * 1e3:8.3f} {seconds / floor:8.2f}")


if __name__ == "__main__":
    main()
