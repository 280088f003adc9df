"""The drafter's training block attention: the Pallas kernels against the XLA reference, and a
sweep of the GPU kernels' block sizes.

    python scripts/bench_block_attention.py                       # the Qwen3-4B recipe shape, tuned blocks
    python scripts/bench_block_attention.py --sweep --json sweep.json

One layer of `pallas_kernels.block_attention` at the training shape of `scripts/bench_train.py`
(one sequence of `--seq` positions, `--anchors` blocks of `--block` slots at uniform anchors
after a `--prompt`, the preset's heads), in bf16: the forward alone, and the forward with the
backward (the gradients of every input for a random output cotangent). Each row prints the
median time, and the rate in TFLOP/s counting only the visible (query, key) pairs: 4 D FLOPs
per pair and head forward (two products: scores and values), 14 D for forward + backward (the
usual FlashAttention-2 count of seven products; the kernels recompute the probabilities in both
backward kernels, so they do nine), against the bf16 matmul rate measured in the same run. The
gradients of every configuration are checked against the XLA reference's before it is timed.
`--sweep` times every block size, warp count and pipeline depth in the grid below (a
configuration Triton cannot build, for its shared memory say, is reported and skipped) and
names the fastest forward + backward; the table that `tuning.pick_blocks` uses comes from that.
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp

from benchlib import matmul_rate
from dspark_jax.evaluation.step_times import timed
from dspark_jax.models.presets import preset
from pallas_kernels.block_attention import block_attention, gpu
from pallas_kernels.block_attention.tuning import pick_blocks

SWEEP = dict(block_q=(64, 128), block_k=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-4b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--block", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=96)
    parser.add_argument("--sweep", action="store_true", help="time every configuration of the sweep grid too")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    c = preset(args.preset)
    n, kv, d, s, a, g = c.num_heads, c.num_kv_heads, c.head_dim, args.seq, args.anchors, args.block
    keys = jax.random.split(jax.random.key(0), 7)
    normal = lambda k, shape: jax.random.normal(k, shape, jnp.bfloat16)
    q = normal(keys[0], (1, a, g, n, d))  # [B, A, G, N, D]
    k_ctx, v_ctx = normal(keys[1], (1, kv, s, d)), normal(keys[2], (1, kv, s, d))  # [B, K, S, D]
    k_blk, v_blk = normal(keys[3], (1, a, g, kv, d)), normal(keys[4], (1, a, g, kv, d))  # [B, A, G, K, D]
    anchors = jnp.sort(jax.random.choice(keys[5], jnp.arange(args.prompt, s - 1), (a,), replace=False))[None]
    keep = jnp.ones((1, a), bool)
    cotangent = normal(keys[6], q.shape)
    pairs = g * float(jnp.sum(anchors + g)) * n  # visible (query, key) pairs over every head
    flops = {"forward": 4 * d * pairs, "forward+backward": 14 * d * pairs}
    matmul = matmul_rate(8192)

    def programs(implementation, blocks=None):
        run = lambda q, kc, vc, kb, vb: block_attention(q, kc, vc, anchors, kb, vb, keep,
                                                        implementation=implementation, blocks=blocks)
        grad = jax.grad(lambda *x: jnp.sum(run(*x).astype(jnp.float32) * cotangent), argnums=(0, 1, 2, 3, 4))
        return jax.jit(run), jax.jit(grad)

    def save(results):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    inputs = (q, k_ctx, v_ctx, k_blk, v_blk)
    _, reference_grad = programs("xla")
    expected = reference_grad(*inputs)

    def measure(name, implementation, blocks=None):
        forward, grad = programs(implementation, blocks)
        got = grad(*inputs)
        error = max(float(jnp.linalg.norm((x - y).astype(jnp.float32)) / jnp.linalg.norm(y.astype(jnp.float32)))
                    for x, y in zip(got, expected))
        if error > 2e-2:
            raise AssertionError(f"{name}: gradients differ from the reference by {error:.2e} (relative)")
        times = {"forward": timed(lambda: jax.block_until_ready(forward(*inputs))),
                 "forward+backward": timed(lambda: jax.block_until_ready(grad(*inputs)))}
        row = {"ms": {k: t * 1e3 for k, t in times.items()},
               "tflops": {k: flops[k] / t / 1e12 for k, t in times.items()}, "gradient_error": error}
        ms, tflops = row["ms"], row["tflops"]
        print(f"{name:34} {ms['forward']:8.3f} {tflops['forward']:8.0f} {ms['forward+backward']:8.3f} "
              f"{tflops['forward+backward']:8.0f} {error:10.1e}", flush=True)
        return row

    print(f"{jax.devices()[0].device_kind}: bf16 matmul {matmul / 1e12:.0f} TFLOP/s; {args.preset} heads {n}/{kv}x{d}, "
          f"S={s}, {a} blocks of {g}; {pairs / 1e9:.2f} G visible pairs x heads")
    print(f"{'implementation':34} {'fwd ms':>8} {'TFLOP/s':>8} {'f+b ms':>8} {'TFLOP/s':>8} {'grad err':>10}")
    slots = 1 << (g - 1).bit_length()
    tuned = pick_blocks(slots=slots, head_dim=d)
    results = {"device": jax.devices()[0].device_kind, "matmul_flops": matmul, "flops": flops,
               "xla": measure("xla (reference)", "xla"),
               "tuned": {"blocks": tuned.__dict__, **measure(f"pallas {_label(tuned)}", "pallas", tuned)}}
    if args.sweep:
        results["sweep"] = []
        for values in itertools.product(*SWEEP.values()):
            blocks = gpu.Blocks(**dict(zip(SWEEP, values)))
            if blocks.block_q < slots:
                continue
            try:
                row = measure(f"pallas {_label(blocks)}", "pallas", blocks)
            except Exception as error:  # Triton refuses some configurations (shared memory, registers)
                print(f"pallas {_label(blocks):27} failed: {str(error).splitlines()[0][:150]}")
                continue
            results["sweep"].append({"blocks": blocks.__dict__, **row})
            save(results)  # as it goes: a sweep stopped early keeps its rows
        best = min(results["sweep"], key=lambda r: r["ms"]["forward+backward"])
        print(f"fastest forward + backward: {best['blocks']} {best['ms']['forward+backward']:.3f} ms "
              f"({results['tuned']['ms']['forward+backward'] / best['ms']['forward+backward']:.2f}x the tuned blocks)")
    save(results)


def _label(blocks: gpu.Blocks) -> str:
    return f"q{blocks.block_q} k{blocks.block_k} w{blocks.num_warps} s{blocks.num_stages}"


if __name__ == "__main__":
    main()
