"""What Triton makes of the attention kernels for Hopper, without a GPU.

    pip install triton==3.9.0   # not a dependency of the project; a CPU machine will do
    python scripts/inspect_triton.py --preset qwen3-4b --batch 64 --context 8192 --queries 8
    python scripts/inspect_triton.py --kernel block_attention --preset qwen3-4b --batch 1 --context 4096 --queries 8

`ragged_paged_attention` is the serving kernel (`--batch` rows of `--context` positions,
`--queries` new tokens each); `block_attention` is drafter training's (forward and both
backward kernels; `--batch` sequences of `--context` keys and 512 blocks of `--queries`
slots, the recipe's shape). Pallas lowers a kernel to Triton modules (`pallas_kernels.lowering`,
as the tests do); this runs each module through the `triton` package's CUDA passes for sm_90a and its `ptxas`,
and prints what a kernel author checks first: which loads the software pipeliner turned into
asynchronous copies into shared memory and which it left as loads into registers (inside and
outside the main loop), the matrix instructions, and ptxas's registers and spills.
`--keep DIR` writes the module after each stage (ttir, ttgir, llir, ptx).

The package's passes are not the ones inside jaxlib, which builds its own Triton: this shows
what one Triton release does with the module, a lead to confirm with a timing on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from dspark_jax.models.presets import preset
from pallas_kernels.block_attention import gpu as block_gpu
from pallas_kernels.block_attention.tuning import pick_blocks as block_attention_blocks
from pallas_kernels.lowering import lower
from pallas_kernels.ragged_paged_attention import gpu as ragged_gpu
from pallas_kernels.ragged_paged_attention.tuning import pick_blocks as ragged_attention_blocks

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


def ragged_calls(cfg, args):
    """(name, fn, abstract arguments, blocks) of the serving kernel at the arguments' shape."""
    kv_heads, n, d, ps, t = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, args.page_size, args.queries
    columns = -(-args.context // ps)
    blocks = ragged_attention_blocks(batch=args.batch, kv_heads=kv_heads, query_rows=t * (n // kv_heads), head_dim=d,
                                     page_size=ps, table_columns=columns)
    blocks = dataclasses.replace(blocks, **overrides(args, pages=args.pages))
    S = jax.ShapeDtypeStruct
    pool = S((args.batch * columns + 1, ps, kv_heads, d), jnp.bfloat16)
    arrays = (S((args.batch, t, n, d), jnp.bfloat16), pool, pool, S((args.batch, columns), jnp.int32),
              S((args.batch, t), jnp.int32), S((args.batch,), jnp.int32))
    return [("ragged_paged_attention", functools.partial(ragged_gpu.ragged_paged_attention, blocks=blocks), arrays,
             blocks)]


def block_calls(cfg, args):
    """The training kernels (forward, backward) at the arguments' shape: 512 blocks of
    `queries` slots a sequence."""
    kv_heads, n, d, slots = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, args.queries
    blocks = block_attention_blocks(slots=slots, head_dim=d)
    blocks = dataclasses.replace(blocks, **overrides(args, block_q=args.block_q, block_k=args.block_k))
    S, b, rows = jax.ShapeDtypeStruct, args.batch, 512 * slots
    q = S((b, n, rows, d), jnp.bfloat16)
    positions = S((b, rows), jnp.int32)
    context, own = S((b, kv_heads, args.context, d), jnp.bfloat16), S((b, kv_heads, rows, d), jnp.bfloat16)
    arrays = (q, positions, positions, context, context, own, own)
    static = dict(slots=slots, blocks=blocks, scale=d**-0.5)
    return [("block_attention forward", functools.partial(block_gpu.forward, **static), arrays, blocks),
            ("block_attention backward", functools.partial(block_gpu.backward, **static),
             (*arrays, q, S((b, n, rows), jnp.float32), q), blocks)]


def overrides(args, **extra) -> dict:
    """The block settings given on the command line."""
    given = dict(num_warps=args.warps, num_stages=args.stages, **extra)
    return {key: value for key, value in given.items() if value is not None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="ragged_paged_attention", choices=["ragged_paged_attention", "block_attention"])
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--batch", type=int, default=64, help="rows (serving) or sequences (training)")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--queries", type=int, default=8, help="query tokens per row (1 + gamma) or slots per block")
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--pages", type=int, help="pages per step of the serving kernel (default: the tuning's)")
    p.add_argument("--block-q", type=int, help="query rows per program of the training kernels (default: the tuning's)")
    p.add_argument("--block-k", type=int, help="keys per step of the training kernels (default: the tuning's)")
    p.add_argument("--warps", type=int, help="warps per program (default: the tuning's)")
    p.add_argument("--stages", type=int, help="pipeline stages (default: the tuning's)")
    p.add_argument("--keep", help="a folder for each module after each stage")
    args = p.parse_args(argv)

    cfg = preset(args.preset)
    calls = (ragged_calls if args.kernel == "ragged_paged_attention" else block_calls)(cfg, args)
    print(f"{args.kernel}, {args.preset} (K={cfg.num_kv_heads}, N={cfg.num_heads}, D={cfg.head_dim}), batch "
          f"{args.batch}, context {args.context}, {args.queries} queries; sm_{ARCH}a")
    for name, fn, arrays, blocks in calls:
        modules: list[str] = []
        lower(fn, *arrays, platform="cuda", triton_modules=modules)
        for i, module in enumerate(modules):
            texts = compile_stages(module, num_warps=blocks.num_warps, num_stages=blocks.num_stages)
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                for stage, text in texts.items():
                    with open(os.path.join(args.keep, f"{name.replace(' ', '_')}_{i}.{stage}"), "w") as f:
                        f.write(text)
            print(f"\n{name}, module {i + 1} of {len(modules)}: {blocks}")
            for label, count in summarize(texts):
                print(f"{label:45} {count}")
            print(f"ptxas: {ptxas_report(texts['ptx'])}")


if __name__ == "__main__":
    main()
