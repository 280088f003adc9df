"""Prefill and decode step time of a random-weight target model, against the hardware floor.

    python scripts/bench_target.py --preset qwen3-4b --batch 1 8 64 --json results.json

Measures on the current default device, in one run:
- the ceilings: device-to-device copy bandwidth (bytes read + written per second) and a large
  bf16 matmul's FLOP rate;
- decode: `Target.extend` steps of 1 token per sequence against a cache of `--context`
  positions (each rolled back, so every step sees the same context), 16 steps per jitted
  loop as in generation, so host dispatch is not counted;
- prefill: `Target.extend` of `--prompt` tokens per sequence into an empty cache (last-token
  logits only, as generation uses it).

The floor of a step is max(bytes it must move / copy bandwidth, FLOPs / matmul rate). For a
decode step the bytes are every weight once plus the valid KV entries; a bf16 Qwen3-4B decode
step therefore cannot beat ~8.0 GB / bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging

import jax
import jax.numpy as jnp

from dspark_jax import Target
from dspark_jax.models.presets import preset
from dspark_jax.console import configure_logging
from dspark_jax.evaluation.step_times import timed, timed_chain

from benchlib import matmul_rate

logger = logging.getLogger(__name__)

DECODE_STEPS = 16  # decode steps per timed program


def copy_bandwidth(gib: float) -> float:
    """Bytes read + written per second by an elementwise pass over `gib` GiB of fp32."""
    x = jax.random.normal(jax.random.key(0), (int(gib * (1 << 28)),), jnp.float32)
    bump = jax.jit(lambda a: a + 1.0)
    seconds = timed(lambda: bump(x).block_until_ready())
    return 2 * x.nbytes / seconds


def fill_cache(target: Target, batch: int, capacity: int, length: int):
    """A cache of random K/V with `length` valid positions per sequence."""
    cache = target.init_cache(batch, capacity)
    keys = iter(jax.random.split(jax.random.key(2), 2 * len(cache.k)))
    rand = lambda arrays: tuple(jax.random.normal(next(keys), a.shape, a.dtype) for a in arrays)
    return cache.replace(k=rand(cache.k), v=rand(cache.v), lengths=jnp.full((batch,), length, jnp.int32))


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-4b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=1024, help="cached positions seen by each decode step")
    parser.add_argument("--prompt", type=int, default=512, help="tokens per sequence in a prefill")
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the bandwidth probe")
    parser.add_argument("--matmul-size", type=int, default=8192, help="size of the matmul probe")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    config = preset(args.preset)
    device = jax.devices()[0]
    bandwidth, flops_rate = copy_bandwidth(args.copy_gib), matmul_rate(args.matmul_size)
    print(f"device {device.device_kind}: copy {bandwidth / 1e12:.2f} TB/s (read+write), bf16 matmul {flops_rate / 1e12:.0f} TFLOP/s")

    target = Target.random(config, dtype="bfloat16")
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(target.params))
    kv_bytes_per_pos = config.kv_width * 2  # k and v of every layer, bf16
    embed = config.vocab_size * config.hidden_size
    dense_params = config.num_params - embed * (1 if config.tie_word_embeddings else 2)  # excl. embeddings
    attn_dim = config.num_heads * config.head_dim

    @functools.partial(jax.jit, donate_argnums=1, static_argnums=3)
    def decode(params, cache, tokens, steps):
        """`steps` decode steps in one program, as the generation loop runs them."""

        def step(_, carry):
            tokens, cache = carry
            logits, _, _, new = target.extend(params, cache, tokens, jnp.ones(tokens.shape[:1], jnp.int32))
            tokens = jnp.argmax(logits[:, 0], axis=-1)[:, None].astype(jnp.int32)
            return tokens, new.rollback(cache.lengths)

        return jax.lax.fori_loop(0, steps, step, (tokens, cache))

    @functools.partial(jax.jit, donate_argnums=1)
    def prefill(params, cache, tokens):
        lengths = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
        logits, _, _, new = target.extend(params, cache, tokens, lengths, last_only=True)
        return jnp.argmax(logits, axis=-1), new.rollback(jnp.zeros_like(lengths))

    rows = []
    for batch in args.batch:
        capacity = args.context + 128
        cache = fill_cache(target, batch, capacity, args.context)
        tokens = jnp.zeros((batch, 1), jnp.int32)
        run_decode = lambda carry: decode(target.params, carry[1], carry[0], DECODE_STEPS)

        logger.info(f"decode batch {batch}")
        t = timed_chain(run_decode, (tokens, cache), iters=2) / DECODE_STEPS
        step_bytes = weight_bytes + batch * args.context * kv_bytes_per_pos
        flops = 2 * batch * (dense_params + embed) + 4 * batch * config.num_layers * attn_dim * args.context
        floor = max(step_bytes / bandwidth, flops / flops_rate)
        rows.append(dict(phase="decode", batch=batch, tokens=batch, context=args.context, ms=t * 1e3,
                         floor_ms=floor * 1e3, fraction_of_floor=floor / t, bytes=step_bytes, flops=flops))

        prompt = jax.random.randint(jax.random.key(3), (batch, args.prompt), 0, config.vocab_size, jnp.int32)
        run_prefill = lambda carry: prefill(target.params, carry[1], prompt)

        logger.info(f"prefill batch {batch}")
        t = timed_chain(run_prefill, (None, target.init_cache(batch, args.prompt + 128)), iters=3)
        tokens = batch * args.prompt
        flops = (2 * tokens * dense_params + 2 * batch * embed
                 + 2 * batch * config.num_layers * attn_dim * args.prompt * args.prompt)  # causal QK^T + PV
        step_bytes = weight_bytes + tokens * kv_bytes_per_pos
        floor = max(step_bytes / bandwidth, flops / flops_rate)
        rows.append(dict(phase="prefill", batch=batch, tokens=tokens, context=args.prompt, ms=t * 1e3,
                         floor_ms=floor * 1e3, fraction_of_floor=floor / t, bytes=step_bytes, flops=flops))

    print(f"\n{args.preset} random weights, bf16, weights {weight_bytes / 1e9:.2f} GB")
    print(f"{'phase':8} {'batch':>5} {'tokens':>7} {'ms':>9} {'floor ms':>9} {'of floor':>9} {'TFLOP/s':>8} {'TB/s':>6}")
    for r in rows:
        print(f"{r['phase']:8} {r['batch']:>5} {r['tokens']:>7} {r['ms']:>9.3f} {r['floor_ms']:>9.3f} "
              f"{r['fraction_of_floor']:>8.1%} {r['flops'] / r['ms'] / 1e9:>8.1f} {r['bytes'] / r['ms'] / 1e9:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device.device_kind, bandwidth=bandwidth, matmul_flops=flops_rate,
                           preset=args.preset, weight_bytes=weight_bytes, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
