"""Tests run on 8 fake CPU devices so mesh tests can build (data, fsdp, tensor) meshes."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
