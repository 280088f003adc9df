"""Device meshes and the rules that map logical axis names to mesh axes.

Every parameter and large activation in the project is annotated with logical axis names
(`"embed"`, `"heads"`, `"batch"`, ...). A `ShardingRules` value says which mesh axes each
name is split over. It is a value, not a global: loaders, models and the trainer take it as
an argument (`DEFAULT_RULES` unless given), so two models can live under different rules.

Each name lists its placements in order of preference; the first whose mesh axes divide the
dimension is used. A dimension no listed placement divides is an error naming the axis,
never a silent replication: replication must be listed, as `()`, where it is acceptable
(key/value heads fewer than the tensor-parallel degree are replicated, as vLLM does; a batch
smaller than the data axes is replicated), while query heads, MLP and vocabulary dimensions
must divide the tensor axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Placements = tuple[tuple[str, ...], ...]  # alternatives in order of preference; () replicates


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """logical axis name -> placements (tuples of mesh axes, in order of preference)."""

    table: tuple[tuple[str, Placements], ...]

    @classmethod
    def of(cls, rules: Mapping[str, Placements]) -> "ShardingRules":
        return cls(tuple(sorted(rules.items())))

    def replace(self, **changes: Placements) -> "ShardingRules":
        """These rules with some names' placements changed (or added)."""
        return ShardingRules.of({**dict(self.table), **changes})

    def placements(self, name: str) -> Placements:
        for key, value in self.table:
            if key == name:
                return value
        raise KeyError(f"logical axis {name!r} has no sharding rule")


REPLICATED: Placements = ((),)
DEFAULT_RULES = ShardingRules.of({
    # activations
    "batch": (("data", "fsdp"), ("data",), ("fsdp",), ()),
    "seq": REPLICATED,
    "act_embed": REPLICATED,
    "act_heads": (("tensor",),),
    "act_kv_heads": (("tensor",), ()),
    "act_mlp": (("tensor",),),
    "act_vocab": (("tensor",),),
    "cache_seq": REPLICATED,
    "kv_pages": REPLICATED,  # a paged KV cache's pool of pages
    "page_slot": REPLICATED,  # positions within a page
    # parameters
    "vocab": (("tensor",),),
    "embed": (("fsdp",),),
    "heads": (("tensor",),),
    "kv_heads": (("tensor",), ()),
    "head_dim": REPLICATED,
    "mlp": (("tensor",),),
    "norm": REPLICATED,
    "features": REPLICATED,  # concatenated tapped target features (draft fc input)
    "markov": REPLICATED,  # Markov-head rank
})


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (data, fsdp, tensor)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {math.prod(shape)} devices, "
            f"got {len(devices)}"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def _placement(name: str | None, size: int, mesh: Mesh, rules: ShardingRules, used: set[str]) -> tuple[str, ...]:
    """The first listed placement of `name` that divides `size` (mesh axes of size 1 and axes
    already used by another dimension are dropped from it)."""
    if name is None:
        return ()
    for option in rules.placements(name):
        axes = tuple(a for a in option if mesh.shape[a] > 1 and a not in used)
        if size % math.prod(mesh.shape[a] for a in axes) == 0:
            return axes
    sizes = " or ".join(
        "x".join(f"{a}={mesh.shape[a]}" for a in option) or "replicated" for option in rules.placements(name)
    )
    raise ValueError(f"logical axis {name!r} of size {size} cannot be split over the mesh ({sizes}); "
                     f"list () among its placements to allow replication")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: ShardingRules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array with these logical axis names, on this mesh. A mesh axis is
    used at most once."""
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = _placement(name, size, mesh, rules, used)
        used.update(axes)
        spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int],
                   rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None,
              rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape, rules))


def shard_map(fn: Callable, mesh: Mesh, in_names: Sequence[Sequence[str | None]],
              out_names: Sequence[str | None] | Sequence[Sequence[str | None]], rules: ShardingRules = DEFAULT_RULES,
              check_vma: bool = True):
    """`jax.shard_map` of fn with its specs derived from logical axis names by the same rules.

    in_names: one tuple of names per positional argument; out_names: one tuple (a single
    output) or one per output. Input specs follow the arguments' shapes; an output axis takes
    the mesh axes its name got among the inputs (a kernel's outputs are laid out like its
    inputs), and is replicated when the name did not occur there. fn sees per-device blocks.
    check_vma=False skips JAX's check of how values vary across devices (a Pallas kernel's
    outputs do not declare it).
    """
    single = bool(out_names) and (out_names[0] is None or isinstance(out_names[0], str))

    def wrapped(*args):
        in_specs, chosen = [], {}
        for names, arg in zip(in_names, args, strict=True):
            spec = logical_to_spec(names, arg.shape, mesh, rules)
            in_specs.append(spec)
            chosen.update({n: axes for n, axes in zip(names, spec) if n is not None})
        out_spec = lambda names: PartitionSpec(*(chosen.get(n) for n in names))
        out_specs = out_spec(out_names) if single else tuple(out_spec(names) for names in out_names)
        return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs, check_vma=check_vma)(*args)

    return wrapped
