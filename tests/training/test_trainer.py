"""The trainer end to end on the demo target: sharding invariance, exact resume, online vs
offline target features, export, and the demo recipe's learning curve."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import load_draft
from dspark_jax.data.target_cache import CacheError
from dspark_jax.training.config import load_config
from dspark_jax.training.optim import make_optimizer
from dspark_jax.training.step import make_train_step
from dspark_jax.training.trainer import _update, checkpointer, loss_weights, prepare_cache, restore, setup, train
from tests.helpers import tiny_path
from tests.training.tensorboard_records import scalars

SMALL = ["demo_sequences=64", "max_length=32", "num_anchors=8", "global_batch_size=16", "micro_batch_size=8",
         "log_every=1", "save_every=1000"]


def small_config(tmp_path, name, *extra):
    return load_config("configs/demo_tiny.py", SMALL + [f"output_dir={tmp_path / name}", *extra])


def metrics(config) -> list[dict]:
    with open(os.path.join(config.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("algorithm", ["dspark", pytest.param("eagle3", marks=pytest.mark.slow)])
def test_eight_devices_match_one_device(tmp_path, algorithm):
    """data=2, fsdp=2, tensor=2 vs a single device: the same 12-step loss trajectory in fp32
    (both on the 8 CPU devices of tests/conftest.py, whatever the default backend)."""
    extra = [f"algorithm={algorithm}", "max_steps=12"]
    one = small_config(tmp_path, "one", *extra, "mesh_data=1")
    eight = small_config(tmp_path, "eight", *extra, "mesh_data=2", "mesh_fsdp=2", "mesh_tensor=2")
    cpus = jax.devices("cpu")
    train(one, devices=cpus[:1])
    run = train(eight, devices=cpus)
    assert dict(run.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    a, b = np.array([m["loss"] for m in metrics(one)]), np.array([m["loss"] for m in metrics(eight)])
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert a[-1] < a[0]


@pytest.mark.slow  # CI: the kernels (interpreted) against their references in tests/pallas_kernels/
def test_training_kernels_give_the_same_trajectory(tmp_path):
    """attention=pallas (the block attention kernels, forward and backward, interpreted here) with
    the fused chunked head and losses on their kernel (loss_kernel=pallas), against the XLA path
    with whole logits: the same 8-step fp32 loss trajectory."""
    cpu = jax.devices("cpu")[:1]
    runs = [small_config(tmp_path, "xla", "max_steps=8"),
            small_config(tmp_path, "kernels", "max_steps=8", "attention=pallas", "loss_chunk=100",
                         "loss_kernel=pallas")]
    for config in runs:
        train(config, devices=cpu)
    xla, kernels = (np.array([m["loss"] for m in metrics(config)]) for config in runs)
    assert len(xla) == 8 and xla[-1] < xla[0]
    np.testing.assert_allclose(kernels, xla, rtol=1e-5)


@pytest.mark.slow  # the kernels' trajectory over a mesh
def test_training_kernels_split_over_a_mesh(tmp_path):
    """attention=pallas and the fused loss on its kernel on data=2 x fsdp=2 x tensor=2 (each
    device's sequences through the kernels, interpreted, and through the loss's chunks) against
    one device: the same 5-step fp32 loss trajectory."""
    extra = ["max_steps=5", "attention=pallas", "loss_chunk=20", "loss_kernel=pallas"]
    one = small_config(tmp_path, "one", *extra, "mesh_data=1")
    eight = small_config(tmp_path, "eight", *extra, "mesh_data=2", "mesh_fsdp=2", "mesh_tensor=2")
    cpus = jax.devices("cpu")
    train(one, devices=cpus[:1])
    train(eight, devices=cpus)
    a, b = np.array([m["loss"] for m in metrics(one)]), np.array([m["loss"] for m in metrics(eight)])
    assert len(a) == 5
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_micro_batches_fed_one_at_a_time_equal_the_one_program_step(tmp_path):
    """The trainer's update (a jitted call per micro-batch, then AdamW) against make_train_step
    (the micro-batches stacked and scanned in one program): the same parameters and loss."""
    config = small_config(tmp_path, "pieces", "global_batch_size=24")  # 3 micro-batches
    run = setup(config, devices=jax.devices("cpu")[:1])
    optimizer, schedule = make_optimizer(config, run.total_steps)
    step = jax.jit(make_train_step(run.draft, optimizer, schedule, loss_weights(config), target=run.target))  # online mode
    stacked = {k: np.stack([run.dataset[i][k] for i in range(3)]) for k in run.dataset[0]}
    state, metrics = step(jax.tree.map(jnp.copy, run.state), run.frozen, run.target.params, stacked)
    fed = _update(run, 0)
    chex.assert_trees_all_close(run.state["params"], state["params"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fed["loss"][0], metrics["loss"][0], rtol=1e-6)
    assert float(fed["loss_tokens"][0]) == float(np.sum(stacked["loss_mask"]))


def final_state(config) -> dict:
    run = setup(config, devices=jax.devices("cpu")[:1])
    assert restore(run, checkpointer(config)) == config.max_steps
    return run.state


def test_sigkilled_run_resumes_bit_identical(tmp_path):
    """train.py killed with SIGKILL mid-run, then rerun, ends bit-identical to an uninterrupted
    train.py run (both in fresh processes with the same environment)."""
    extra = ["max_steps=30", "save_every=10", "log_every=5"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # XLA_FLAGS from tests/conftest.py are inherited
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # the later runs load every program

    def command(config):
        return [sys.executable, "train.py", "--config", "configs/demo_tiny.py", "--set", *SMALL, *extra,
                f"output_dir={config.output_dir}"]

    straight, killed = small_config(tmp_path, "straight", *extra), small_config(tmp_path, "killed", *extra)
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(command(straight), check=True, **quiet)
    first = subprocess.Popen(command(killed), **quiet)
    log = os.path.join(killed.output_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(log) and any(json.loads(line)["step"] >= 15 for line in open(log))):
        assert first.poll() is None and time.time() < deadline, "the first run ended before it could be killed"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert metrics(killed)[-1]["step"] < 30
    subprocess.run(command(killed), check=True, **quiet)
    steps = [m["step"] for m in metrics(killed)]
    assert steps[-1] == 30 and steps != sorted(set(steps))  # the rerun redid the steps after its checkpoint
    chex.assert_trees_all_equal(final_state(straight), final_state(killed))  # bit-identical, leaf by leaf


def test_sigterm_checkpoints_after_the_update_in_flight_and_the_rerun_resumes_there(tmp_path, monkeypatch):
    """SIGTERM arriving during update 3 of 6: train checkpoints after that update and returns
    (train.py exits 143); the rerun trains updates 4 to 6 only and ends bit-identical to an
    uninterrupted run. The signal handlers in place before are back afterwards."""
    from dspark_jax.training import cli, trainer

    extra = ["max_steps=6", "save_every=4"]
    straight, stopped = small_config(tmp_path, "straight", *extra), small_config(tmp_path, "stopped", *extra)
    cpu = jax.devices("cpu")[:1]
    train(straight, devices=cpu)
    before = signal.getsignal(signal.SIGTERM)

    def signalled_update(run, step):
        if step == 2:  # twice, as a job manager may send it: the second changes nothing
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return _update(run, step)

    monkeypatch.setattr(trainer, "_update", signalled_update)
    run = train(stopped, devices=cpu)
    assert run.stopped_by == "SIGTERM" and signal.getsignal(signal.SIGTERM) is before
    assert [m["step"] for m in metrics(stopped)] == [1, 2, 3]
    manager = checkpointer(stopped)
    assert manager.all_steps() == [3]
    manager.close()
    monkeypatch.setattr(trainer, "train", lambda config: run)
    assert cli.main(["--config", "configs/demo_tiny.py"]) == 128 + signal.SIGTERM
    monkeypatch.setattr(trainer, "_update", _update)
    assert train(stopped, devices=cpu).stopped_by is None
    assert [m["step"] for m in metrics(stopped)] == [1, 2, 3, 4, 5, 6]
    chex.assert_trees_all_equal(final_state(straight), final_state(stopped))


def test_online_and_offline_targets_give_the_same_loss(tmp_path):
    """A bf16 target: the cache stores exactly the features the online step computes."""
    common = ["target_dtype=bfloat16", "max_steps=2"]
    online = small_config(tmp_path, "online", *common)
    offline = small_config(tmp_path, "offline", *common, "target_mode=offline", f"cache_dir={tmp_path / 'cache'}")
    manifest = prepare_cache(offline)
    assert manifest["num_samples"] == 64 and manifest["bytes_per_token"] == 4 + 2 + 2 * 3 * 64 + 2 * 64
    train(online, devices=jax.devices()[:1])
    train(offline, devices=jax.devices()[:1])
    a, b = metrics(online), metrics(offline)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["tau_probabilistic"] == pytest.approx(y["tau_probabilistic"], rel=1e-6)


def test_auto_kernels_are_pallas_on_a_gpu_and_xla_elsewhere(monkeypatch):
    """attention and loss_kernel default to "auto": the kernels on a GPU (attention only at head
    dims run there), jnp/XLA on CPUs and TPUs; an explicit choice stays; the GPU recipes chunk
    the loss; a bad value names its key."""
    from dspark_jax.models.config import ConfigError
    from dspark_jax.training.config import TrainConfig
    from dspark_jax.training.recipes import reference_recipe, smollm2_recipe

    config = TrainConfig()
    assert (config.attention, config.loss_kernel) == ("auto", "auto")
    for backend, want in [("cpu", "xla"), ("tpu", "xla"), ("gpu", "pallas")]:
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert config.kernel("attention") == config.kernel("loss_kernel") == want
        assert loss_weights(config).kernel == want
        assert config.kernel("attention", {64, 128}) == want
    assert config.kernel("attention", {128, 256}) == "xla"  # Gemma4's wide heads: not run on a GPU yet
    explicit = TrainConfig(attention="cudnn", loss_kernel="xla")
    assert (explicit.kernel("attention"), explicit.kernel("loss_kernel")) == ("cudnn", "xla")
    assert reference_recipe("dspark", "qwen3_4b").loss_chunk == smollm2_recipe("dflash").loss_chunk == 512
    with pytest.raises(ConfigError, match="'loss_kernel'"):
        TrainConfig(loss_kernel="triton")


def test_cache_built_for_another_config_is_refused(tmp_path):
    config = small_config(tmp_path, "c", "target_mode=offline", f"cache_dir={tmp_path / 'cache'}")
    prepare_cache(config)
    other = small_config(tmp_path, "c", "target_mode=offline", f"cache_dir={tmp_path / 'cache'}",
                         "target_layer_ids=0,2")
    with pytest.raises(CacheError, match=r"manifest.json: target_layer_ids is \[0, 1, 2\] but the config needs \[0, 2\]"):
        setup(other, devices=jax.devices()[:1])


def test_demo_recipe_learns_and_exports_a_loadable_draft(tmp_path):
    config = load_config("configs/demo_tiny.py", ["max_steps=120", f"output_dir={tmp_path / 'demo'}"])
    run = train(config, devices=jax.devices()[:1])
    rows = metrics(config)
    first, last = rows[0]["tau_probabilistic"], rows[-1]["tau_probabilistic"]
    assert last > first + 0.3, (first, last)
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The host's peak resident memory: never falling, and no more than the process's peak now.
    peaks = [row["host_peak_rss_gib"] for row in rows]
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peaks == sorted(peaks) and 0.1 < peaks[0] and peaks[-1] <= now, (peaks, now)
    draft = load_draft(os.path.join(config.output_dir, "draft"), target=run.target, dtype="bfloat16")
    exported = jax.tree.map(lambda p: np.asarray(p.astype(np.float32)), run.state["params"])
    chex.assert_trees_all_equal(  # the export is the fp32 masters rounded to bf16
        jax.tree.map(lambda x: np.asarray(x, np.float32).astype("bfloat16").astype(np.float32), exported),
        jax.tree.map(lambda y: np.asarray(y, np.float32), {key: draft.params[key] for key in exported}))
    assert os.listdir(os.path.join(config.output_dir, "tensorboard"))
    # TensorBoard holds the same scalars as metrics.jsonl (float32), with the same tags and steps.
    logged = scalars(os.path.join(config.output_dir, "tensorboard"))
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert logged[(key, row["step"])] == pytest.approx(value, rel=1e-6, abs=1e-30), (key, row["step"])
    assert len(logged) == sum(len(row) - 1 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_gemma4_recipe_trains_on_a_tiny_gemma4_target(tmp_path, algorithm):
    """The gemma4_12b recipe with its target swapped for a tiny random Gemma4 (sliding and full
    layers, keys as values, soft-capped logits) and no data files (the target's own samples)."""
    recipe = f"configs/{algorithm}_gemma4_12b.py"
    reference = load_config(recipe)
    assert (reference.target, reference.mask_token_id, reference.chat_template) == (
        "google/gemma-4-12B-it", 4, "gemma4")
    config = load_config(recipe, SMALL + [
        f"target={tiny_path('gemma4_sliding_k_eq_v')}", "target_layer_ids=[0,1,2,3]", "train_files=[]",
        f"num_draft_layers={1 if algorithm == 'eagle3' else 2}", "max_steps=30", "learning_rate=3e-3",
        "warmup_ratio=0.0", "target_dtype=float32", f"output_dir={tmp_path / algorithm}"])
    run = train(config, devices=jax.devices()[:1])
    rows = metrics(config)
    assert np.isfinite([r["loss"] for r in rows]).all()
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.8 * np.mean([r["loss"] for r in rows[:5]]), rows
    draft = load_draft(os.path.join(config.output_dir, "draft"), target=run.target, dtype="float32")
    assert draft.config.architecture == f"Gemma4{'Eagle3' if algorithm == 'eagle3' else 'DSpark'}Model"
    assert draft.config.layers.layer_spec(0).k_eq_v
