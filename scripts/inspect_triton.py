"""What Triton makes of the ragged paged attention kernel for Hopper, without a GPU.

    pip install triton==3.9.0   # not a dependency of the project; a CPU machine will do
    python scripts/inspect_triton.py --preset qwen3-4b --batch 64 --context 8192 --queries 8

Pallas lowers the kernel to a Triton module (`pallas_kernels.lowering`, as the tests do);
this runs that module through the `triton` package's CUDA passes for sm_90a and its `ptxas`,
and prints what a kernel author checks first: which loads the software pipeliner turned into
asynchronous copies into shared memory and which it left as loads into registers (inside and
outside the main loop), the matrix instructions, and ptxas's registers and spills.
`--keep DIR` writes the module after each stage (ttir, ttgir, llir, ptx).

The package's passes are not the ones inside jaxlib, which builds its own Triton: this shows
what one Triton release does with the module, a lead to confirm with a timing on the GPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from dspark_jax.models.presets import preset
from pallas_kernels.lowering import lower
from pallas_kernels.ragged_paged_attention import gpu
from pallas_kernels.ragged_paged_attention.tuning import pick_blocks

ARCH = 90  # Hopper (H100, H200)


def compile_stages(module_text: str, *, num_warps: int, num_stages: int) -> dict[str, str]:
    """The module's text after each of Triton's CUDA stages up to PTX."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler.compiler import Language

    backend = CUDABackend(GPUTarget("cuda", ARCH, 32))
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    with tempfile.NamedTemporaryFile("w", suffix=".ttir") as f:
        f.write(module_text)
        f.flush()
        module = ir.parse_mlir_module(f.name, context)
    module.context = context
    stages: dict = {}
    backend.add_stages(stages, options, Language.TRITON)
    texts, current, metadata = {}, module, {}
    for name in ("ttir", "ttgir", "llir", "ptx"):
        current = stages[name](current, metadata)
        texts[name] = current if isinstance(current, str) else str(current)
    return texts


def ptxas_report(ptx: str) -> str:
    """ptxas's resource line for the PTX (registers, spills), from the ptxas that the triton
    package carries and that accepts this PTX version."""
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        errors = []
        for name in ("ptxas", "ptxas-blackwell"):
            run = subprocess.run([os.path.join(tools, name), f"-arch=sm_{ARCH}a", "-v", path, "-o",
                                  os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
            if run.returncode == 0:
                lines = [line.split("info    : ")[-1] for line in run.stderr.splitlines()
                         if "registers" in line or "spill" in line]
                return "; ".join(line.strip() for line in lines)
            errors.append(f"{name}: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
        return "ptxas failed: " + " | ".join(errors)


def summarize(texts: dict[str, str]) -> list[tuple[str, int]]:
    """Counts that say how the loads and matrix products were compiled."""
    ttgir, ptx = texts["ttgir"], texts["ptx"]
    loop = ttgir[ttgir.find("scf.for"):]  # the main loop and what follows it
    return [
        ("async copies into shared memory (ttgir)", ttgir.count("ttg.async_copy_global_to_local")),
        ("loads of tensors into registers (ttgir)", len(re.findall(r"tt\.load %\S+(?:, %\S+)* : tensor<", ttgir))),
        ("  of which in or after the main loop", len(re.findall(r"tt\.load %\S+(?:, %\S+)* : tensor<", loop))),
        ("shared-memory buffers (ttgir local_alloc)", ttgir.count("ttg.local_alloc")),
        ("cp.async instructions (ptx)", ptx.count("cp.async.cg") + ptx.count("cp.async.ca")),
        ("mma.sync instructions (ptx)", ptx.count("mma.sync")),
        ("wgmma instructions (ptx)", ptx.count("wgmma.mma_async")),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--queries", type=int, default=8, help="query tokens per row (1 + gamma)")
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--pages", type=int, help="pages per step (default: the tuning's)")
    p.add_argument("--warps", type=int, help="warps per program (default: the tuning's)")
    p.add_argument("--stages", type=int, help="pipeline stages (default: the tuning's)")
    p.add_argument("--keep", help="a folder for the module after each stage")
    args = p.parse_args(argv)

    cfg = preset(args.preset)
    kv_heads, n, d, ps, t = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, args.page_size, args.queries
    columns = -(-args.context // ps)
    blocks = pick_blocks(batch=args.batch, kv_heads=kv_heads, query_rows=t * (n // kv_heads), head_dim=d,
                         page_size=ps, table_columns=columns)
    blocks = gpu.Blocks(blocks.block_q, args.pages or blocks.pages, blocks.splits, args.warps or blocks.num_warps,
                        args.stages or blocks.num_stages)
    S = jax.ShapeDtypeStruct
    pool = S((args.batch * columns + 1, ps, kv_heads, d), jnp.bfloat16)
    arrays = (S((args.batch, t, n, d), jnp.bfloat16), pool, pool, S((args.batch, columns), jnp.int32),
              S((args.batch, t), jnp.int32), S((args.batch,), jnp.int32))
    modules: list[str] = []
    lower(functools.partial(gpu.ragged_paged_attention, blocks=blocks), *arrays, platform="cuda",
          triton_modules=modules)
    print(f"ragged paged attention, {args.preset} layer (K={kv_heads}, N={n}, D={d}), {args.batch} rows of "
          f"{args.context} positions, {t} queries, pages of {ps}; {blocks}; sm_{ARCH}a")
    for module in modules:
        texts = compile_stages(module, num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            for stage, text in texts.items():
                with open(os.path.join(args.keep, f"ragged_paged_attention.{stage}"), "w") as f:
                    f.write(text)
        for label, count in summarize(texts):
            print(f"{label:45} {count}")
        print(f"ptxas: {ptxas_report(texts['ptx'])}")


if __name__ == "__main__":
    main()
