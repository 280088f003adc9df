"""Draft training across the devices of one host: time per sequence, scaling efficiency and
memory per device on data and fsdp meshes of several sizes.

    python scripts/bench_scaling.py --devices 1 2 4 --axes data fsdp --modes online offline

For each mesh (n devices on the `data` or the `fsdp` axis) and target mode, the train step of
`dspark_jax.training` (the one `train.py` runs: fp32 master weights and AdamW state sharded
by their logical axes, the batch split over the data axes) runs on random weights of the
recipe's shape (`--preset`, DSpark, 5 draft layers, `--anchors` x block 7) with
`--per-device` sequences of `--seq` tokens per device per micro-step (weak scaling: the global
batch grows with n) and `--accumulation` micro-steps per update. It reports ms per step,
ms per sequence, sequences/s, the scaling efficiency (sequences/s over n times one device's
on the same axis and mode) and the memory of one device's share of the step as XLA plans it
(arguments, outputs and temporaries, donated buffers counted once; the frozen target's share
included). Offline mode feeds the target's features computed beforehand, as a target cache
would.

On a CPU, `--fake-devices N` splits the host into N devices (for a dry run of the script).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="mesh sizes to run")
    p.add_argument("--axes", nargs="+", default=["data", "fsdp"], choices=["data", "fsdp"])
    p.add_argument("--modes", nargs="+", default=["online", "offline"], choices=["online", "offline"])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--anchors", type=int, default=512)
    p.add_argument("--per-device", type=int, default=1, help="sequences per device per micro-step")
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fake-devices", type=int, default=0, help="on a CPU: split the host into this many devices")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.fake_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
            f" --xla_force_host_platform_device_count={args.fake_devices}"
    import jax
    import jax.numpy as jnp

    from dspark_jax import Target
    from dspark_jax.console import configure_logging
    from dspark_jax.evaluation.step_times import timed_chain
    from dspark_jax.models.draft import Draft
    from dspark_jax.models.draft_config import draft_config_for_target, spread_layer_ids
    from dspark_jax.models.presets import preset
    from dspark_jax.models.target import target_features
    from dspark_jax.sharding import make_mesh
    from dspark_jax.training.config import TrainConfig
    from dspark_jax.training.losses import LossWeights
    from dspark_jax.training.optim import make_optimizer
    from dspark_jax.training.step import batch_shardings, make_train_step
    from dspark_jax.training.trainer import initial_state

    configure_logging()
    logger = logging.getLogger("bench_scaling")
    available = len(jax.devices())
    if max(args.devices) > available:
        sys.exit(f"error: --devices asks for {max(args.devices)} devices, this host has {available}")
    recipe = TrainConfig(target="preset:" + args.preset)
    optimizer, schedule = make_optimizer(recipe, total_steps=1000)
    s, a = args.seq, args.accumulation
    rows = []
    for axis in args.axes:
        for n in args.devices:
            mesh = make_mesh(**{axis: n}, devices=jax.devices()[:n])
            target = Target.random(preset(args.preset), dtype="bfloat16", mesh=mesh)
            tc = target.config
            layers = spread_layer_ids(tc.num_layers)
            config = draft_config_for_target(tc, "dspark", layers, block_size=7, mask_token_id=tc.vocab_size - 1,
                                             num_anchors=args.anchors)
            b = n * args.per_device
            ids = jax.random.randint(jax.random.key(1), (a, b, s), 0, tc.vocab_size - 1)
            prompt = min(96, s // 2)  # unsupervised tokens at the start of each sequence
            batch = {"input_ids": ids, "loss_mask": jnp.broadcast_to(jnp.arange(s) >= prompt, (a, b, s)),
                     "lengths": jnp.full((a, b), s)}
            for mode in args.modes:
                state, frozen = initial_state(config, target, optimizer, mesh, seed=0)
                micro = dict(batch)
                if mode == "offline":  # what a target cache holds, computed once beforehand
                    features, last = jax.jit(jax.vmap(lambda x: target_features(target, target.params, x, layers)))(ids)
                    micro.update(features=features, last_hidden=last)
                micro = jax.device_put(micro, batch_shardings(mesh, micro))
                draft = Draft(config, None, jnp.bfloat16, mesh)
                step = jax.jit(make_train_step(draft, optimizer, schedule, LossWeights(),
                                               target=target if mode == "online" else None,
                                               state_shardings=jax.tree.map(lambda x: x.sharding, state)),
                               donate_argnums=0)
                logger.info(f"{axis}={n} {mode}: compiling and timing")
                compiled = step.lower(state, frozen, target.params, micro).compile()
                memory = compiled.memory_analysis()  # XLA's buffer plan of one device's share of the program
                planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                           - memory.alias_size_in_bytes)
                seconds = timed_chain(lambda st: compiled(st, frozen, target.params, micro)[0], state, iters=1,
                                      reps=args.reps)
                row = dict(axis=axis, devices=n, mode=mode, sequences_per_step=a * b, step_ms=seconds * 1e3,
                           ms_per_sequence=seconds * 1e3 / (a * b), sequences_per_s=a * b / seconds,
                           planned_gib_per_device=planned / 2**30)
                one = next((r for r in rows if (r["axis"], r["devices"], r["mode"]) == (axis, 1, mode)), None)
                row["efficiency"] = row["sequences_per_s"] / (n * one["sequences_per_s"]) if one else None
                rows.append(row)
                logger.info(json.dumps(row))
    device = jax.devices()[0].device_kind
    print(f"\n{args.preset} DSpark training, S={s}, {args.anchors} anchors, {args.per_device} sequence(s) per device "
          f"per micro-step, accumulation {a}, {device}")
    print("| axis | devices | mode | ms per step | ms per sequence | sequences/s | efficiency | GiB per device |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.1%}"
        print(f"| {r['axis']} | {r['devices']} | {r['mode']} | {r['step_ms']:.1f} | {r['ms_per_sequence']:.1f} | "
              f"{r['sequences_per_s']:.2f} | {eff} | {r['planned_gib_per_device']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, preset=args.preset, seq=s, anchors=args.anchors, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
