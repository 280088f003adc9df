"""The training run: target, draft, data, sharded train step, logging and checkpoints.

`train(config)` runs (or resumes) a recipe end to end:
- the mesh (data x fsdp x tensor) over all devices, the target on it (frozen), a fresh draft
  whose trainable weights are fp32 masters sharded by their logical axes;
- micro-batches from the grain pipeline over tokenised conversations (online mode, the target
  computes features inside the step) or over a target cache (offline mode), sent to the device
  one at a time: each is a jitted call that adds its gradients to sums kept on the device, and
  one more call applies AdamW (so the host never holds a whole update's batch);
- `<output_dir>/metrics.jsonl` (one JSON object per logging step: the losses and acceptance
  metrics, supervised tokens/s, and the host process's peak resident memory), TensorBoard events under
  `<output_dir>/tensorboard`, a progress bar with ETA;
- with `eval_files`, the same losses and metrics over held-out conversations (no update, the
  same anchors each time) in `<output_dir>/heldout.jsonl` and under TensorBoard's `heldout/`,
  before the first update of a fresh run, every `eval_every` updates and after the last: the
  curve that says when training stops paying;
- orbax checkpoints of the whole state (params, AdamW state, step, key) and the data position
  under `<output_dir>/checkpoints` (async, keep-N); a run restarts from the latest one, and
  the result is bit-identical to an uninterrupted run;
- the trained draft exported in DeepSpec's format to `<output_dir>/draft` at every checkpoint;
- SIGTERM or SIGINT (a preempted VM, a job's time limit, Ctrl-C) checkpoints after the update
  in flight and stops the run (`Run.stopped_by` names the signal); rerunning resumes there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import resource
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary
from tqdm import tqdm

from dspark_jax.checkpoints.deepspec import save_draft
from dspark_jax.data.conversations import Counts, load_examples
from dspark_jax.data.pipeline import micro_batches
from dspark_jax.data.target_cache import TargetCache, write_target_cache
from dspark_jax.models.config import ConfigError
from dspark_jax.models.draft import Draft, abstract_module_params
from dspark_jax.models.draft_config import draft_config_for_target
from dspark_jax.sharding import make_mesh, named_sharding
from dspark_jax.training.config import TrainConfig
from dspark_jax.training.losses import LossWeights
from dspark_jax.training.optim import make_optimizer
from dspark_jax.training.step import MicroSteps, batch_shardings, make_micro_steps

logger = logging.getLogger(__name__)


def build_mesh(config: TrainConfig, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    data = config.mesh_data if config.mesh_data > 0 else len(devices) // (config.mesh_fsdp * config.mesh_tensor)
    return make_mesh(data, config.mesh_fsdp, config.mesh_tensor, devices)


def build_target(config: TrainConfig, mesh):
    """The frozen target a recipe names (see TrainConfig.target), computing attention with the
    recipe's implementation (its drafts copy the target's layer config, and with it that choice)."""
    target = _named_target(config, mesh)
    c = target.config
    attention = config.kernel("attention", {c.layer_spec(i).head_dim for i in range(c.num_layers)})
    loss = (f"loss in chunks of {config.loss_chunk} slots, kernel {config.kernel('loss_kernel')} (recipe: "
            f"{config.loss_kernel})" if config.loss_chunk else "loss over whole logits")
    logger.info(f"attention: {attention} (recipe: {config.attention}); {loss}")
    return dataclasses.replace(target, config=dataclasses.replace(target.config, attention=attention))


def _named_target(config: TrainConfig, mesh):
    from dspark_jax.checkpoints.target import load_target
    from dspark_jax.models.target import Target

    if config.target == "demo":
        from dspark_jax.training.demo import demo_target

        return demo_target(dtype=config.target_dtype, mesh=mesh)
    if config.target.startswith("preset:"):
        from dspark_jax.models.presets import preset

        return Target.random(preset(config.target.removeprefix("preset:")), dtype=config.target_dtype, mesh=mesh)
    path = config.target
    if path == "smollm2":
        from dspark_jax.checkpoints.smollm2 import smollm2_gguf

        path = smollm2_gguf()
    return load_target(path, dtype=config.target_dtype, mesh=mesh)


def build_draft_config(config: TrainConfig, target):
    mask_token = config.mask_token_id if config.mask_token_id >= 0 else target.config.vocab_size - 1
    return draft_config_for_target(
        target.config, config.algorithm, config.target_layer_ids, num_layers=config.num_draft_layers or None,
        block_size=config.block_size, mask_token_id=mask_token, num_anchors=config.num_anchors,
        markov_rank=config.markov_rank, markov_head_type=config.markov_head_type,
        confidence_with_markov=config.confidence_with_markov, step_loss_decay=config.step_loss_decay,
        target_model_name_or_path=config.target,
    )


def training_examples(config: TrainConfig, target, files: tuple[str, ...] | None = None) -> list[dict]:
    """Tokenised conversations of `files` (default: the recipe's train_files); with none,
    sequences the target samples itself from random prompts (how the demo recipe, and any
    recipe on a random target, trains)."""
    files = config.train_files if files is None else files
    if not files:
        from dspark_jax.training.demo import demo_examples

        return demo_examples(target, count=config.demo_sequences, prompt_length=config.demo_prompt_length,
                             max_length=config.max_length, seed=config.data_seed)
    if target.tokenizer is None:
        raise ValueError(f"target {config.target!r} has no tokenizer to render {list(files)}")
    counts = Counts()
    examples = load_examples(files, target.tokenizer, template=config.chat_template,
                             max_length=config.max_length, min_loss_tokens=config.min_loss_tokens, counts=counts)
    logger.info(f"data: {counts.summary()}")
    return examples


def cache_expectations(config: TrainConfig, target) -> dict:
    """Manifest entries a target cache must have to train this recipe."""
    return {"target_layer_ids": list(config.target_layer_ids), "hidden_size": target.config.hidden_size,
            "target_model_name_or_path": config.target, "max_length": config.max_length}


def prepare_cache(config: TrainConfig, *, batch_size: int = 8) -> dict:
    """Writes the recipe's offline target cache to config.cache_dir; returns its manifest."""
    target = build_target(config, None)
    examples = training_examples(config, target)
    meta = {**cache_expectations(config, target), "source_jsonl_paths": list(config.train_files),
            "chat_template": config.chat_template, "min_loss_tokens": config.min_loss_tokens}
    manifest = write_target_cache(target, examples, config.cache_dir, layer_ids=config.target_layer_ids,
                                  batch_size=batch_size, metadata=meta)
    tokens = sum(len(e["input_ids"]) for e in examples)
    logger.info(f"cache {config.cache_dir}: {len(examples)} sequences, {tokens} tokens, "
                f"{manifest['bytes_per_token']} bytes/token")
    return manifest


@dataclasses.dataclass
class Run:
    """Everything a training run holds (see `setup`)."""

    config: TrainConfig
    mesh: object
    target: object
    draft: Draft  # compute-dtype drafter; its params are passed explicitly
    frozen: dict
    dataset: object
    num_sequences: int
    total_steps: int
    steps: MicroSteps  # jitted; `apply` knows the accumulation
    state: dict
    heldout: object = None  # micro-batches of config.eval_files, if any
    heldout_batches: int = 0  # the first this many of them: every held-out sequence once, but for fewer than a
    # micro-batch left over
    stopped_by: str | None = None  # the signal ("SIGTERM") that stopped `train` before its last step, if one did

    def export(self, path: str) -> None:
        """Writes the current draft (bf16) in DeepSpec's format, with its frozen tensors unless
        config.export_frozen is off. Every process must call it (parameters sharded across
        hosts are gathered first); process 0 writes."""
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), self.state["params"])
        frozen = self.frozen if self.config.export_frozen else {}
        if jax.process_count() > 1:
            params, frozen = multihost_utils.process_allgather((params, frozen), tiled=True)
        if jax.process_index() == 0:
            save_draft(dataclasses.replace(self.draft, params={**params, **frozen}), path,
                       frozen=self.config.export_frozen)


def setup(config: TrainConfig, devices=None) -> Run:
    mesh = build_mesh(config, devices)
    target = build_target(config, mesh)
    draft_config = build_draft_config(config, target)
    if config.target_mode == "offline":
        source = TargetCache(config.cache_dir)
        source.check(cache_expectations(config, target))
    else:
        source = training_examples(config, target)
    hosts = jax.process_count()
    if config.micro_batch_size % hosts:
        raise ConfigError(f"config key 'micro_batch_size' ({config.micro_batch_size}) must be a multiple of the "
                          f"number of hosts ({hosts})")
    dataset = micro_batches(source, batch_size=config.micro_batch_size // hosts, max_length=config.max_length,
                            seed=config.data_seed, host_index=jax.process_index(), host_count=hosts)
    total = config.total_steps(len(source))
    optimizer, schedule = make_optimizer(config, total)

    state, frozen = initial_state(draft_config, target, optimizer, mesh, config.seed)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    draft = Draft(draft_config, None, jnp.dtype(config.dtype), mesh)
    pieces = make_micro_steps(draft, optimizer, schedule, loss_weights(config),
                              target=target if config.target_mode == "online" else None,
                              state_shardings=state_shardings)
    steps = MicroSteps(jax.jit(pieces.zeros), jax.jit(pieces.accumulate, donate_argnums=0),
                       jax.jit(functools.partial(pieces.apply, accumulation=config.accumulation_steps),
                               donate_argnums=0), jax.jit(pieces.evaluate))
    run = Run(config, mesh, target, draft, frozen, dataset, len(source), total, steps, state)
    if config.eval_files:
        heldout = training_examples(config, target, config.eval_files)
        run.heldout = micro_batches(heldout, batch_size=config.micro_batch_size // hosts, max_length=config.max_length,
                                    seed=config.data_seed, host_index=jax.process_index(), host_count=hosts)
        run.heldout_batches = len(heldout) // config.micro_batch_size
    return run


def loss_weights(config: TrainConfig) -> LossWeights:
    """The recipe's block-loss terms: DSpark's three alphas; DFlash trains on cross-entropy alone
    (Eagle3's TTT loss takes none of them)."""
    if config.algorithm == "dspark":
        return LossWeights(config.ce_alpha, config.tv_alpha, config.confidence_alpha, config.loss_decay_gamma,
                           config.loss_chunk, config.kernel("loss_kernel"))
    return LossWeights(1.0, 0.0, 0.0, config.loss_decay_gamma, config.loss_chunk, config.kernel("loss_kernel"))


def initial_state(draft_config, target, optimizer, mesh, seed: int) -> tuple[dict, dict]:
    """(train state, frozen arrays) of a fresh draft for `target`: fp32 master weights and
    optimizer state sharded over `mesh` by their logical axes (step and key replicated), and
    the target's embedding / LM head the draft shares."""
    master = Draft.random(draft_config, target=target, seed=seed, dtype="float32")
    own, _, _ = Draft.split(master.params)
    frozen = Draft.frozen(master.params)  # the target's own arrays
    _, specs = abstract_module_params(draft_config)
    shardings = jax.tree.map(lambda s, x: named_sharding(mesh, tuple(s), x.shape), specs, own,
                             is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    own = jax.device_put(own, shardings)
    replicated = named_sharding(mesh, (), ())
    opt_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, own),
                                          shardings, transform_non_params=lambda _: replicated)
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "params": own,
        "opt_state": jax.jit(optimizer.init, out_shardings=opt_shardings)(own),
        "key": jax.device_put(jax.random.key_data(jax.random.key(seed)), named_sharding(mesh, (None,), (2,))),
    }
    return state, frozen


def checkpointer(config: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(config.output_dir, "checkpoints")), options=options)


def data_signature(run: Run) -> dict:
    """What fixes the data order and the schedule; a resumed run must match it."""
    c = run.config
    return {"micro_batch_size": c.micro_batch_size, "accumulation": c.accumulation_steps,
            "processes": jax.process_count(), "sequences": run.num_sequences, "data_seed": c.data_seed,
            "max_length": c.max_length, "total_steps": run.total_steps}


def restore(run: Run, manager: ocp.CheckpointManager) -> int:
    """Loads the latest checkpoint into run.state; returns its step (0 if none)."""
    latest = manager.latest_step()
    if latest is None:
        return 0
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
    restored = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               data=ocp.args.JsonRestore()))
    want = data_signature(run)
    have = {k: restored["data"].get(k) for k in want}
    if have != want:
        raise ValueError(f"checkpoint step {latest} was written with {have}, this run has {want}: "
                         "resuming would change the data order or the schedule (use a new output_dir)")
    run.state = restored["state"]
    return latest


def _device_micro_batch(run: Run, index: int, dataset=None) -> dict:
    """Micro-batch `index` of the run's training data (or of `dataset`) on the mesh, assembled
    from every host's share."""
    local = (run.dataset if dataset is None else dataset)[index]  # [b_local, ...]
    hosts = jax.process_count()
    shapes = {k: (x.shape[0] * hosts,) + x.shape[1:] for k, x in local.items()}
    shardings = batch_shardings(run.mesh, {k: jax.ShapeDtypeStruct(v, local[k].dtype) for k, v in shapes.items()},
                                stacked=False)
    return {k: jax.make_array_from_process_local_data(shardings[k], x, shapes[k]) for k, x in local.items()}


def _update(run: Run, step: int) -> dict:
    """Optimizer step `step`: its micro-batches go to the device one at a time (the host holds
    one, never a whole update's), their gradients are summed there, then AdamW updates."""
    accumulation = run.config.accumulation_steps
    totals = None
    for index in range(accumulation):
        micro = _device_micro_batch(run, step * accumulation + index)
        if totals is None:
            totals = run.steps.zeros(run.state, run.frozen, run.target.params, micro)
        totals = run.steps.accumulate(totals, run.state, run.frozen, run.target.params, micro, jnp.int32(index))
    run.state, metrics = run.steps.apply(run.state, totals)
    return metrics


def evaluate_heldout(run: Run) -> dict:
    """The losses and acceptance metrics of the current draft over the held-out sequences (each
    once, but for the fewer than micro_batch_size left over), as metrics.jsonl reports them for
    training batches."""
    totals = None
    for index in range(run.heldout_batches):
        metrics = run.steps.evaluate(run.state, run.frozen, run.target.params,
                                     _device_micro_batch(run, index, run.heldout))
        totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    totals = jax.device_get(totals)
    return {"sequences": run.heldout_batches * run.config.micro_batch_size,
            **_summarise({k: v for k, v in totals.items() if k != "loss_tokens"})}


def _summarise(window: dict) -> dict:
    return {name: float(num) / float(den) if den else 0.0 for name, (num, den) in window.items()}


def host_peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_scalars(writer: SummaryWriter, step: int, values: dict[str, float]) -> None:
    """One TensorBoard event with every scalar of a logging step, tagged as in metrics.jsonl
    (written as a summary: `add_scalar` would rename accept_rate@j to accept_rate_j)."""
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
    writer.file_writer.add_summary(summary, step)
    writer.flush()


class StopSignals:
    """Catches SIGTERM and SIGINT while the loop runs (in the main thread, and not where they
    are ignored), so that the loop can checkpoint and stop between updates. A repeated SIGTERM
    changes nothing (a job manager may send one to each process of a job and another through
    a parent); a second Ctrl-C stops at once. `requested(step)` gives every process the same
    answer (the signal's number, 0 for none), so all of them stop after the same update; over
    several processes they compare flags every `every` steps (a collective that waits for the
    step), on one process at every step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, every: int = 1):
        self.received, self.previous, self.every = 0, {}, every

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.previous[s] = signal.signal(s, self._catch)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set from C
        self.previous = {}

    def _catch(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            self.__exit__()
            signal.raise_signal(signum)
        self.received = self.received or signum

    def requested(self, step: int) -> int:
        if jax.process_count() == 1:
            return self.received
        if step % self.every:
            return 0
        return int(multihost_utils.process_allgather(np.int32(self.received)).max())


def train(config: TrainConfig, *, devices=None) -> Run:
    """Trains, resuming from the latest checkpoint in output_dir."""
    os.makedirs(config.output_dir, exist_ok=True)
    run = setup(config, devices)
    manager = checkpointer(config)
    start = restore(run, manager)
    with open(os.path.join(config.output_dir, "train_config.json"), "w") as f:
        f.write(config.to_json())
    is_main = jax.process_index() == 0
    metrics_file = open(os.path.join(config.output_dir, "metrics.jsonl"), "a") if is_main else None
    events = SummaryWriter(os.path.join(config.output_dir, "tensorboard")) if is_main else None
    logger.info(f"{config.algorithm} on {config.target}: {run.num_sequences} sequences, {run.total_steps} steps of "
                f"{config.global_batch_size} sequences ({config.accumulation_steps} x {config.micro_batch_size}), "
                f"mesh {dict(run.mesh.shape)}, starting at step {start}")
    heldout_file = open(os.path.join(config.output_dir, "heldout.jsonl"), "a") if is_main and run.heldout is not None \
        else None
    eval_every = config.eval_every or config.save_every

    def heldout_row(done: int) -> float:
        """Evaluates the held-out set, logs and records it; returns the seconds it took."""
        jax.block_until_ready(run.state)  # the updates queued so far are training time
        began = time.perf_counter()
        row = {"step": done, **evaluate_heldout(run)}
        logger.info(f"held-out after {done} updates: loss {row['loss']:.4f}, tau {row['tau_probabilistic']:.3f} "
                    f"({row['sequences']} sequences)")
        if is_main:
            heldout_file.write(json.dumps(row) + "\n")
            heldout_file.flush()
            write_scalars(events, done, {f"heldout/{k}": v for k, v in row.items() if k != "step"})
        return time.perf_counter() - began

    if run.heldout is not None and start == 0:
        heldout_row(0)  # the curve's starting point: the untrained draft
    window, clock = None, time.perf_counter()
    bar = tqdm(total=run.total_steps, initial=start, disable=not is_main, dynamic_ncols=True)
    with StopSignals(every=config.log_every) as signals:
        for step in range(start, run.total_steps):
            metrics = _update(run, step)
            window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
            done = step + 1
            last = done == run.total_steps
            stop = 0 if last else signals.requested(done)
            if done % config.log_every == 0 or last or stop:
                window = jax.device_get(window)
                row = {"step": done, **_summarise({k: v for k, v in window.items() if k != "loss_tokens"})}
                row["loss_tokens_per_s"] = float(window["loss_tokens"][0]) / (time.perf_counter() - clock)
                row["host_peak_rss_gib"] = host_peak_rss_gib()
                window, clock = None, time.perf_counter()
                if is_main:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    write_scalars(events, done, {k: v for k, v in row.items() if k != "step"})
                bar.set_postfix(loss=f"{row['loss']:.4f}", tau=f"{row['tau_probabilistic']:.3f}")
            bar.update(1)
            if run.heldout is not None and (done % eval_every == 0 or last):
                clock += heldout_row(done)  # the evaluation's time is not training time
            if done % config.save_every == 0 or last or stop:
                manager.save(done, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(run.state),
                    data=ocp.args.JsonSave({"next_micro_batch": done * config.accumulation_steps,
                                            **data_signature(run)})))
                run.export(os.path.join(config.output_dir, "draft"))
            if stop:
                run.stopped_by = signal.Signals(stop).name
                logger.warning(f"{run.stopped_by}: checkpointed after update {done} of {run.total_steps} and "
                               "stopped; the same command resumes from there")
                break
        bar.close()
        manager.wait_until_finished()
    manager.close()
    if is_main:
        metrics_file.close()
        events.close()
        if heldout_file:
            heldout_file.close()
    return run
