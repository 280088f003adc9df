"""Test-wide JAX settings.

8 fake CPU devices let mesh tests build (data, fsdp, tensor) meshes on any machine, and fp32
matmuls run at full precision on GPUs too (JAX defaults to TF32 there), so the fp32 parity
bounds hold wherever the suite runs.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
