"""Binding parameters to checkpoint tensors: reading blocks, checking shapes, placing, writing.

A `Binding` says where one parameter comes from: the checkpoint tensor name, the shape that
tensor must have, and how its layout maps to ours (Linear weights are [out, in] on disk and
input-major here, e.g. q_proj [H, N, D]). `read` produces any rectangular block of the
parameter from only the block of the stored tensor it needs, which is what lets each device
read only its own shard (`jax.make_array_from_callback`). `to_stored` is the inverse, for
writing checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

from dspark_jax.checkpoints.safetensors_io import CheckpointError
from dspark_jax.checkpoints.store import Store

Path = tuple[str, ...]
# parameter path ("layers" for every layers_<i>) -> (checkpoint name template, n_in)
NameTable = dict[Path, tuple[str, int | None]]


@dataclasses.dataclass(frozen=True)
class Binding:
    path: Path  # key path in the params pytree
    name: str  # checkpoint tensor name
    stored_shape: tuple[int, ...]  # shape the stored tensor must have
    shape: tuple[int, ...]  # our parameter's shape
    n_in: int | None = None  # None: same layout; k: Linear whose first k dims (ours) are its input

    def read(self, store: Store, index: tuple[slice, ...]) -> np.ndarray:
        """The block `param[index]` as a numpy array, in the stored dtype or float32."""
        bounds = [s.indices(n)[:2] for s, n in zip(index, self.shape)]
        tensor, shape = store[self.name], self.shape
        rest = tuple(slice(a, b) for a, b in bounds[1:])
        if self.n_in is None:
            if len(bounds) == 1:
                return tensor.read_rows(*bounds[0])
            return tensor.read_rows(*bounds[0], columns=bounds[1])[(slice(None), slice(None)) + rest[1:]]
        in_dims, out_dims = shape[: self.n_in], shape[self.n_in :]
        in_bounds, out_bounds = bounds[: self.n_in], bounds[self.n_in :]
        r0, r1, out_cover = _cover(out_bounds, out_dims)
        c0, c1, in_cover = _cover(in_bounds, in_dims)
        block = np.asarray(tensor.read_rows(r0, r1, columns=(c0, c1)))  # [out rows, in cols]
        block = block.T.reshape(in_cover + out_cover)
        inner = (
            (slice(None),)
            + tuple(slice(a, b) for a, b in in_bounds[1:])
            + (slice(None),)
            + tuple(slice(a, b) for a, b in out_bounds[1:])
        )
        return block[inner]


def _cover(bounds: Sequence[tuple[int, int]], dims: Sequence[int]) -> tuple[int, int, tuple[int, ...]]:
    """Flat [start, stop) covering whole trailing dims of a block, and the covered shape."""
    inner = math.prod(dims[1:])
    a, b = bounds[0]
    return a * inner, b * inner, (b - a,) + tuple(dims[1:])


def bindings_for(abstract_params: Any, table: NameTable) -> list[Binding]:
    """One Binding per leaf of `abstract_params` (shapes from `jax.eval_shape` of init).

    A leaf under `layers_<i>` is looked up as "layers" and "{i}" in its name becomes i. The
    stored shape is ours for n_in None, else [prod(output dims), prod(input dims)].
    """
    bindings = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        path = tuple(k.key for k in key_path)
        layer, generic = None, path
        if path[0].startswith("layers_"):
            layer, generic = int(path[0].removeprefix("layers_")), ("layers",) + path[1:]
        template, n_in = table[generic]
        shape = tuple(leaf.shape)
        stored = shape if n_in is None else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
        bindings.append(Binding(path, template.format(i=layer), stored, shape, n_in))
    return bindings


def to_stored(binding: Binding, value: np.ndarray) -> np.ndarray:
    """Our parameter value in the checkpoint's layout (the inverse of `Binding.read`)."""
    if binding.n_in is None:
        return value.reshape(binding.stored_shape)
    n_in = math.prod(binding.shape[: binding.n_in])
    return value.reshape(n_in, -1).T.reshape(binding.stored_shape)


def check_store(bindings: Sequence[Binding], store: Store, source: str, ignorable: Sequence[str] = ()) -> None:
    """Raises one CheckpointError listing every missing, mis-shaped and unexpected tensor."""
    problems = []
    for b in bindings:
        if b.name not in store:
            problems.append(f"missing tensor {b.name!r} (expected shape {b.stored_shape})")
        elif store[b.name].shape != b.stored_shape:
            problems.append(
                f"tensor {b.name!r} in {store[b.name].file} has shape {store[b.name].shape}, "
                f"expected {b.stored_shape}"
            )
    for name in sorted(set(store) - {b.name for b in bindings} - set(ignorable)):
        if not name.endswith("rotary_emb.inv_freq"):
            problems.append(f"unexpected tensor {name!r} in {store[name].file}")
    if problems:
        listing = "\n  - ".join(problems)
        raise CheckpointError(f"{source}: {len(problems)} problem(s) with the checkpoint:\n  - {listing}")


def place(
    bindings: Sequence[Binding], store: Store, shardings: dict[Path, jax.sharding.Sharding], dtype
) -> dict[str, Any]:
    """Builds the params pytree; each device reads only the block its shard needs."""
    params: dict[str, Any] = {}
    for b in bindings:
        def read(index, b=b):
            return b.read(store, index).astype(dtype)

        array = jax.make_array_from_callback(b.shape, shardings[b.path], read)
        node = params
        for key in b.path[:-1]:
            node = node.setdefault(key, {})
        node[b.path[-1]] = array
    return params
