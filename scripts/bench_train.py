"""Training throughput of the Qwen3-4B DSpark and DFlash recipe shapes on one GPU, in both target modes.

    python scripts/bench_train.py --modes offline online
    python scripts/bench_train.py --skip-split --modes offline --attention xla pallas --loss-chunk 0 512
    python scripts/bench_train.py --skip-split --algorithms dspark dflash --attention pallas --loss-chunk 512
    python scripts/bench_train.py --skip-split --algorithms dflash --modes offline --attention pallas \
        --loss-chunk 512 --profile 2 --hlo hlo/    # where the step's GPU time goes, kernel by kernel

One sequence of S = 4096 tokens per micro-step with 512 anchors x block 7 (about 3,580
supervised draft tokens), random bf16 target weights (step time does not depend on them),
fp32 master weights and AdamW state, bf16 compute, each algorithm with its recipe's loss terms
(DSpark: CE + L1 + confidence; DFlash: CE). For each algorithm, mode, `--attention`
implementation (the recipe key: `pallas` runs the draft's block attention on the Pallas
kernels) and each `--loss-chunk` (the recipe key `loss_chunk`: 0 builds whole logits, N runs
the fused head and losses N slots at a time) it reports:
- the whole train step (`make_train_step`, `--accumulation` micro-steps per AdamW update),
  per micro-step, its compile time, supervised draft tokens/s, XLA's planned memory of the
  step (arguments + outputs + temporaries, less donated buffers), the process's peak so far, and
  the CE of the first update (chunked and whole losses must agree);
- the split: draft forward (backbone), + LM head and losses, + backward, AdamW update, and
  online the target forward, each timed as its own jitted function;
- model FLOPs of one micro-step (`train_flops`, counted from the shapes: XLA's own cost
  analysis misses the cuBLAS calls), and MFU against the measured bf16 matmul rate
  (`--matmul-size` probe) and against the H100 datasheet 989 TFLOP/s.
With a chunk, each `--loss-kernel` (the recipe key `loss_kernel`: `pallas` runs each chunk's
softmaxes, losses and gradient on pallas_kernels/vocab_loss) is timed too.
The split uses the first algorithm, `--attention`, `--loss-chunk` and `--loss-kernel`; `--skip-split` times
only the train steps. The peak is the process's so far, so only the planned memory compares variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp

from dspark_jax import Draft, Target
from dspark_jax.models.draft_config import draft_config_for_target, spread_layer_ids
from dspark_jax.models.presets import preset
from dspark_jax.console import configure_logging
from dspark_jax.evaluation.step_times import timed, timed_chain
from dspark_jax.training.config import TrainConfig
from dspark_jax.training.losses import block_loss, sample_anchors
from dspark_jax.training.optim import make_optimizer
from dspark_jax.models.target import target_features
from dspark_jax.training.step import make_train_step
from dspark_jax.training.trainer import loss_weights

from benchlib import kernel_times, matmul_rate, print_kernel_times

logger = logging.getLogger(__name__)

DATASHEET_FLOPS = 989e12  # H100 SXM dense bf16


def train_flops(config, s: int, t: int) -> tuple[float, float]:
    """(draft, target) model FLOPs of one micro-step: S context positions, T block slots.

    Every matmul counts 2 FLOPs per multiply-add; weights that train cost 3x their forward
    (forward, input gradient, weight gradient), the frozen LM head 2x (no weight gradient),
    the target's logits for the losses and the fc over context features (inputs need no
    gradient) as noted. Attention counts the visible keys only: on average half the context
    (anchors are uniform) plus the block.
    """
    c = config.layers
    h, q, kv, i, v, g = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size, \
        c.vocab_size, config.block_size
    layer = 2 * t * (h * q + q * h + 3 * h * i) + 2 * (t + s) * h * 2 * kv
    attention = 2 * 2 * t * q * (s / 2 + g)
    draft = 3 * (c.num_layers * (layer + attention) + 2 * t * config.markov_rank * v) + 2 * (2 * s * config.feature_size * h)
    draft += 2 * (2 * t * h * v) + 2 * t * h * v  # draft LM head (fwd + input grad), target logits (fwd)
    # Draft layers copy the target's dimensions; the target's forward (no logits needed):
    target = config.num_target_layers * (2 * s * (h * q + q * h + 2 * h * kv + 3 * h * i) + 2 * 2 * s * q * s / 2)
    return float(draft), float(target)


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-4b")
    parser.add_argument("--algorithms", nargs="+", default=["dspark"], choices=["dspark", "dflash"])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=96, help="unsupervised tokens at the start of the sequence")
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["offline", "online"], choices=["offline", "online"])
    parser.add_argument("--attention", nargs="+", default=["xla"], choices=["xla", "cudnn", "pallas"],
                        help="implementations to time (the recipe key `attention`), each in every mode")
    parser.add_argument("--loss-chunk", nargs="+", type=int, default=[0],
                        help="the recipe key `loss_chunk` to time (0: whole logits; N: the fused loss, N slots a pass)")
    parser.add_argument("--loss-kernel", nargs="+", default=["xla"], choices=["xla", "pallas"],
                        help="the recipe key `loss_kernel` to time with each chunk (pallas: pallas_kernels/vocab_loss)")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--skip-split", action="store_true", help="time only the train steps (cold compiles)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing each train step, profile STEPS more and print its top GPU kernels per "
                             "micro-step (needs torch; see benchlib.kernel_times)")
    parser.add_argument("--hlo", metavar="DIR", help="write each train step's optimised HLO here (the kernels' "
                                                      "fusion names lead to it)")
    args = parser.parse_args()

    target = Target.random(preset(args.preset), dtype="bfloat16")
    tc = target.config
    with_attention = lambda impl: dataclasses.replace(target, config=dataclasses.replace(tc, attention=impl))
    layers = spread_layer_ids(tc.num_layers)
    s, a = args.seq, args.accumulation
    keys = jax.random.split(jax.random.key(1), 3)
    ids = jax.random.randint(keys[0], (1, s), 0, tc.vocab_size - 1)
    micro = {"input_ids": ids, "loss_mask": (jnp.arange(s) >= args.prompt)[None], "lengths": jnp.full((1,), s)}
    features, last = jax.jit(lambda p, x: target_features(target, p, x, layers))(target.params, ids)
    offline_micro = {**micro, "features": features, "last_hidden": last}
    matmul = matmul_rate(args.matmul_size)
    logger.info(f"bf16 matmul {args.matmul_size}^3: {matmul / 1e12:.0f} TFLOP/s")
    results = {"device": jax.devices()[0].device_kind, "matmul_flops": matmul, "seq": s, "anchors": args.anchors,
               "accumulation": a, "algorithms": {}, "modes": {}}

    for algorithm in args.algorithms:
        config = draft_config_for_target(tc, algorithm, layers, block_size=7, mask_token_id=tc.vocab_size - 1,
                                         num_anchors=args.anchors)
        master = Draft.random(config, target=target, seed=0, dtype="float32")
        own, _, _ = Draft.split(master.params)
        frozen = Draft.frozen(master.params)
        drafts = {impl: Draft(dataclasses.replace(config, layers=dataclasses.replace(config.layers, attention=impl)),
                              None, jnp.bfloat16)
                  for impl in args.attention}
        recipe = TrainConfig(algorithm=algorithm, target="preset:" + args.preset)
        optimizer, schedule = make_optimizer(recipe, total_steps=1000)
        weights = loss_weights(recipe)
        trainable_params = sum(x.size for x in jax.tree.leaves(own))
        step_flops, target_flops = train_flops(config, s, args.anchors * config.block_size)
        results["algorithms"][algorithm] = {"trainable_params": trainable_params, "draft_step_flops": step_flops,
                                            "target_forward_flops": target_flops}
        logger.info(f"{args.preset} {algorithm} draft: {trainable_params / 1e6:.0f}M trainable parameters, S={s}, "
                    f"{args.anchors} anchors, accumulation {a}")

        if not args.skip_split and "split_ms" not in results:
            def loss(trainable, batch, draft=drafts[args.attention[0]], weights=weights):
                return block_loss(draft, {**jax.tree.map(lambda p: p.astype(jnp.bfloat16), trainable), **frozen},
                                  batch, jax.random.key(0),
                                  weights._replace(chunk=args.loss_chunk[0], kernel=args.loss_kernel[0]))

            results["split_ms"] = time_split(drafts[args.attention[0]], own, frozen, loss, optimizer, target, layers,
                                             offline_micro, args.anchors)

        for mode, impl, chunk, kernel in itertools.product(args.modes, args.attention, args.loss_chunk,
                                                           args.loss_kernel):
            if not chunk and kernel != args.loss_kernel[0]:
                continue  # whole logits take no loss kernel
            batch = offline_micro if mode == "offline" else micro
            stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (a,) + x.shape), batch)
            step = jax.jit(make_train_step(drafts[impl], optimizer, schedule,
                                           weights._replace(chunk=chunk, kernel=kernel),
                                           target=with_attention(impl) if mode == "online" else None),
                           donate_argnums=0)
            state = optimizer_state(optimizer, own)
            name = f"{algorithm}/{mode}/{impl}/" + (f"{chunk}/{kernel}" if chunk else "whole")
            logger.info(f"train step {name} (algorithm/mode/attention/loss chunk/loss kernel)")
            start = time.perf_counter()
            compiled = step.lower(state, frozen, target.params, stacked).compile()
            compile_s = time.perf_counter() - start
            memory = compiled.memory_analysis()  # XLA's buffer plan of the step
            planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                       - memory.alias_size_in_bytes)
            per_step = timed_chain(lambda st: compiled(st, frozen, target.params, stacked)[0], state, iters=1, reps=3)
            per_micro = per_step / a
            _, metrics = compiled(optimizer_state(optimizer, own), frozen, target.params, stacked)
            supervised = float(metrics["block_supervised_tokens"][0]) / a
            ce = float(metrics["ce_loss"][0] / metrics["ce_loss"][1])
            flops = step_flops + (target_flops if mode == "online" else 0.0)
            row = {"micro_step_ms": per_micro * 1e3, "supervised_tokens": supervised, "ce_loss": ce,
                   "tokens_per_s": supervised / per_micro, "mfu_measured": flops / per_micro / matmul,
                   "mfu_datasheet": flops / per_micro / DATASHEET_FLOPS,
                   "compile_s": compile_s, "planned_gib": planned / 2**30,
                   "peak_gib": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30}
            results["modes"][name] = row
            logger.info(f"{name}: {json.dumps(row)}")
            if args.hlo:
                os.makedirs(args.hlo, exist_ok=True)
                with open(os.path.join(args.hlo, name.replace("/", "_") + ".hlo.txt"), "w") as f:
                    f.write(compiled.as_text())
            if args.profile:
                held = [optimizer_state(optimizer, own)]

                def run():  # one train step, its state carried (the step donates it)
                    held[0] = compiled(held[0], frozen, target.params, stacked)[0]
                    jax.block_until_ready(held[0])

                per_micro = {k: (ms / a, count / a) for k, (ms, count) in kernel_times(run, args.profile).items()}
                print_kernel_times(per_micro, f"{name}, per micro-step", top=40)

    print(f"\n{args.preset} draft training, S={s}, {args.anchors} anchors, device {results['device']}")
    if "split_ms" in results:
        print(f"split ({args.algorithms[0]}, one micro-step, ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in results["split_ms"].items()))
    for algorithm, info in results["algorithms"].items():
        print(f"{algorithm} model FLOPs per micro-step: draft {info['draft_step_flops'] / 1e12:.1f} T, "
              f"target forward {info['target_forward_flops'] / 1e12:.1f} T")
    print(f"{'algo/mode/attn/chunk/kernel':34} {'ms/seq':>8} {'tokens/seq':>10} {'tokens/s':>10} {'MFU(meas)':>10} "
          f"{'MFU(989T)':>10} {'compile s':>9} {'plan GiB':>9} {'peak GiB':>9} {'CE':>8}")
    for mode, row in results["modes"].items():
        print(f"{mode:34} {row['micro_step_ms']:8.1f} {row['supervised_tokens']:10.0f} {row['tokens_per_s']:10.0f} "
              f"{row['mfu_measured']:10.1%} {row['mfu_datasheet']:10.1%} {row['compile_s']:9.1f} "
              f"{row['planned_gib']:9.1f} {row['peak_gib']:9.1f} {row['ce_loss']:8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def optimizer_state(optimizer, own) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": jax.tree.map(jnp.copy, own), "opt_state": optimizer.init(own),
            "key": jax.random.key_data(jax.random.key(0))}


def time_split(draft, own, frozen, loss, optimizer, target, layers, batch, anchors) -> dict:
    """ms of: draft forward (backbone), forward + LM head and losses, + backward, the AdamW
    update, and the target forward, each its own jitted function on one micro-batch."""
    cast = lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), {**p, **frozen})
    fns = {
        "draft_forward": jax.jit(lambda p, b: draft.block_forward(
            cast(p), b["features"], b["input_ids"], *sample_anchors(jax.random.key(0), b["loss_mask"], anchors))[2]),
        "forward_and_loss": jax.jit(lambda p, b: loss(p, b)[0]),
        "forward_and_backward": jax.jit(jax.value_and_grad(lambda p, b: loss(p, b)[0])),
    }
    times = {}
    for name, fn in fns.items():
        logger.info(name)
        times[name] = timed(lambda fn=fn: jax.block_until_ready(fn(own, batch)), reps=5, iters=3)
    grads = fns["forward_and_backward"](own, batch)[1]
    opt_state = optimizer.init(own)
    update = jax.jit(lambda g, st, p: optimizer.update(g, st, p))
    logger.info("optimizer")
    times["optimizer"] = timed(lambda: jax.block_until_ready(update(grads, opt_state, own)), reps=5, iters=3)
    logger.info("target forward")
    feats = jax.jit(lambda p, x: target_features(target, p, x, layers))
    times["target_forward"] = timed(lambda: jax.block_until_ready(feats(target.params, batch["input_ids"])),
                                    reps=5, iters=3)
    return {k: v * 1e3 for k, v in times.items()}


if __name__ == "__main__":
    main()
