"""Speculative rejection sampling: the fused Pallas kernel against the XLA path, against the
bytes floor.

    python scripts/bench_rejection.py --batch 64 256 --gamma 7 --vocab 151936

For each batch and gamma, one verify step of a round at T = 1 (every row verifying all gamma
drafts, from draft distributions near the target's so that acceptances vary) runs as

- `xla`: `probabilities` of the target's bf16 logits, then `decoding.rejection.verify` (what
  `kernels="xla"` runs);
- `pallas`: `decoding.rejection.verify_logits` (what `kernels="pallas"` runs: the fused kernel
  reads G + 2 logit rows, one q row and one noise row per row, never writing p).

Both draw the same uniforms and Gumbel noise from the same keys, and their tokens are checked
equal first. Each prints the median time, and that time over the bytes floor of reading p and
q once in fp32 (B (2 gamma + 1) V 4 bytes) at the device copy bandwidth (read + write)
measured in the same run: the issue's measure, 1.0 being the floor.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchlib import announce_bandwidth, median_seconds
from dspark_jax.decoding.rejection import verify, verify_logits
from dspark_jax.sampling import SamplingParams, probabilities


def round_inputs(b: int, g: int, v: int):
    """(target logits [B, G + 1, V] bf16, q [B, G, V] fp32, draft tokens [B, G], keys [B])."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(b * 31 + g), 4)
    logits = (3 * jax.random.normal(k1, (b, g + 1, v), jnp.float32)).astype(jnp.bfloat16)
    q = jax.nn.softmax(logits[:, :g].astype(jnp.float32) + jax.random.normal(k2, (b, g, v), jnp.float32), axis=-1)
    tokens = jax.random.categorical(k3, jnp.log(q), axis=-1).astype(jnp.int32)
    return logits, q, tokens, jax.random.split(k4, b)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--gamma", type=int, nargs="+", default=[7])
    p.add_argument("--vocab", type=int, default=151936)
    args = p.parse_args(argv)

    bandwidth = announce_bandwidth(f"V = {args.vocab}, T = 1")
    print("| batch | gamma | implementation | us per verify | p + q bytes floor (us) | of the floor |")
    print("|---|---|---|---|---|---|")
    for g in args.gamma:
        for b in args.batch:
            logits, q, tokens, keys = round_inputs(b, g, args.vocab)
            lengths = jnp.full((b,), g, jnp.int32)
            temperature = jnp.ones((b,), jnp.float32)
            sampling = SamplingParams(temperature=temperature[:, None])
            xla = jax.jit(lambda lg, q, t, k: verify(k, t, q, probabilities(lg, sampling), lengths))
            fused = jax.jit(lambda lg, q, t, k: verify_logits(k, t, q, lg, temperature, lengths))
            want, got = xla(logits, q, tokens, keys), fused(logits, q, tokens, keys)
            same = float(np.mean(np.asarray(want.next_token) == np.asarray(got.next_token)))
            if not (np.array_equal(want.accepted, got.accepted) and same >= 0.99):
                raise SystemExit(f"the kernel disagrees at batch {b}, gamma {g}: {same:.1%} equal next tokens")
            floor = b * (2 * g + 1) * args.vocab * 4 / bandwidth
            for name, fn in (("xla", xla), ("pallas", fused)):
                seconds = median_seconds(fn, logits, q, tokens, keys)
                print(f"| {b} | {g} | {name} | {1e6 * seconds:.0f} | {1e6 * floor:.0f} | {seconds / floor:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
