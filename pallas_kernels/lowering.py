"""Lowering a kernel for a platform this machine lacks: `jax.export` runs the Pallas lowering
rules of Triton (GPU) or Mosaic (TPU) on abstract arguments, which catches what those rules
refuse (block shapes, layouts, unsupported operations) without the device. For Triton the
kernel's module is also run through MLIR's verifier, as the GPU compiler does first (it
catches, for one, a loop whose bounds have different integer types). Neither reaches the
device compiler's own passes (shared memory or register limits); `scripts/inspect_triton.py`
takes the Triton modules further, through the `triton` package's CUDA passes.

A tool for tests and scripts, not for the kernels' callers.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import jax
from jax import export
from jax._src import mesh as mesh_lib  # AbstractDevice: the GPU kind Triton's lowering asks for
from jax._src.pallas.triton import pallas_call_registration as triton_registration

_TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _verified(lower_module, modules: list[str] | None):
    def lowered(*args, **kwargs):
        result = lower_module(*args, **kwargs)
        result.module.operation.verify()  # raises an MLIRError naming the operation
        if modules is not None:
            modules.append(str(result.module))
        return result

    return lowered


def lower(fn, *args, platform: str, triton_modules: list[str] | None = None) -> str:
    """The StableHLO text of jit(fn) lowered for "cuda" (an H200) or "tpu"; args may be
    jax.ShapeDtypeStructs. For "cuda", the text of each Triton module is appended to
    `triton_modules` if one is given."""
    if platform == "cuda":
        device = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
        scope = contextlib.ExitStack()
        scope.enter_context(jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)))
        to_triton = triton_registration.lowering.lower_jaxpr_to_triton_module
        scope.enter_context(mock.patch.object(triton_registration.lowering, "lower_jaxpr_to_triton_module",
                                              _verified(to_triton, triton_modules)))
        checks = (_TRITON,)
    else:
        scope, checks = contextlib.nullcontext(), ()
    with scope:
        exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()
