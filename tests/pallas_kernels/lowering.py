"""Lowering a kernel for a platform this machine lacks: `jax.export` runs the Pallas lowering
rules of Triton (GPU) or Mosaic (TPU) on abstract arguments, which catches what those rules
refuse (block shapes, layouts, unsupported operations) without the device. It stops short of
the device compiler's own passes."""

from __future__ import annotations

import contextlib

import jax
from jax import export
from jax._src import mesh as mesh_lib  # AbstractDevice: the GPU kind Triton's lowering asks for

_TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def lower(fn, *args, platform: str) -> str:
    """The StableHLO text of jit(fn) lowered for "cuda" (an H200) or "tpu"; args may be
    jax.ShapeDtypeStructs."""
    if platform == "cuda":
        device = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
        scope = jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))
        checks = (_TRITON,)
    else:
        scope, checks = contextlib.nullcontext(), ()
    with scope:
        exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()
