"""Sharded loading and execution on 8 fake CPU devices give the 1-device results."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dspark_jax import load_target
from dspark_jax.checkpoints.store import hf_store
from dspark_jax.checkpoints.target_weights import hf_bindings
from dspark_jax.models.presets import preset
from dspark_jax.models.target import Target, abstract_params
from dspark_jax.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, shard_map
from tests.helpers import golden, max_rel_err, tiny_path

NAME = "qwen3_gqa_untied"  # 4 query heads, 2 kv heads, vocab 160


def cpu_mesh(**shape):
    """A mesh over the 8 CPU devices of tests/conftest.py, whatever the default backend."""
    return make_mesh(**shape, devices=jax.devices("cpu"))


def test_logical_to_spec_skips_axes_that_do_not_divide():
    mesh = cpu_mesh(data=2, tensor=4)
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == P(None, "tensor", None)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P(None, None, None)
    assert logical_to_spec(("batch", "seq"), (4, 3), mesh) == P("data", None)
    mesh = cpu_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("batch", "seq"), (8, 3), mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "seq"), (2, 3), mesh) == P("data", None)
    with pytest.raises(ValueError, match="needs 3 devices, got 8"):
        cpu_mesh(data=3)


def test_blockwise_reads_equal_full_tensor_slices():
    """Binding.read of any block equals slicing the fully read parameter."""
    target = load_target(tiny_path(NAME), dtype="float32")
    store = hf_store(tiny_path(NAME))
    shapes, _ = abstract_params(target.config, np.float32)
    rng = np.random.default_rng(0)
    for b in hf_bindings(shapes, store):
        full = b.read(store, tuple(slice(None) for _ in b.shape))
        for _ in range(5):
            index = []
            for n in b.shape:
                lo = int(rng.integers(0, n))
                index.append(slice(lo, int(rng.integers(lo + 1, n + 1))))
            np.testing.assert_array_equal(b.read(store, tuple(index)), full[tuple(index)], err_msg=str(b.path))


@pytest.mark.parametrize("shape", [dict(data=2, tensor=4), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_logits_equal_single_device(shape):
    g = golden(NAME)
    single = load_target(tiny_path(NAME), dtype="float32")
    mesh = cpu_mesh(**shape)
    sharded = load_target(tiny_path(NAME), dtype="float32", mesh=mesh)
    q_spec = sharded.params["layers_0"]["self_attn"]["q_proj"].sharding.spec
    assert "tensor" in jax.tree.leaves(tuple(q_spec)), q_spec  # really split over devices
    for path, leaf in jax.tree_util.tree_flatten_with_path(sharded.params)[0]:
        ref = single.params
        for k in path:
            ref = ref[k.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref), err_msg=str(path))

    ids = np.concatenate([g["input_ids"], g["input_ids"][:, ::-1]])  # batch 4, split over data
    ref_logits, _, ref_taps = single.forward(single.params, ids, hidden_layers=(0, 2))
    logits, _, taps = jax.jit(sharded.forward, static_argnames="hidden_layers")(sharded.params, ids, hidden_layers=(0, 2))
    assert max_rel_err(logits, ref_logits) <= 1e-5
    assert max_rel_err(taps, ref_taps) <= 1e-5

    cache = sharded.init_cache(4, 16)
    lengths = np.array([12, 7, 12, 3], np.int32)
    step, _, _, cache = jax.jit(sharded.extend)(sharded.params, cache, ids, lengths)
    for b, n in enumerate(lengths):
        assert max_rel_err(np.asarray(step)[b, :n], np.asarray(ref_logits)[b, :n]) <= 1e-5


def test_a_dimension_no_rule_divides_is_an_error():
    """Query heads must divide the tensor axis: SmolLM2's 9 heads on 2 devices are refused by
    name unless the rules passed in allow replicating them."""
    mesh = cpu_mesh(data=4, tensor=2)
    with pytest.raises(ValueError, match=r"logical axis 'heads' of size 9 cannot be split over the mesh \(tensor=2\)"):
        logical_to_spec(("embed", "heads", "head_dim"), (576, 9, 64), mesh)
    relaxed = DEFAULT_RULES.replace(heads=(("tensor",), ()))
    assert logical_to_spec(("embed", "heads", "head_dim"), (576, 9, 64), mesh, relaxed) == P(None, None, None)
    assert logical_to_spec(("embed", "heads", "head_dim"), (576, 8, 64), mesh, relaxed) == P(None, "tensor", None)
    odd = dataclasses.replace(preset("smollm2-135m"), num_layers=1, vocab_size=64)
    with pytest.raises(ValueError, match="logical axis 'heads' of size 9"):
        Target.random(odd, dtype="float32", mesh=mesh)
    target = Target.random(odd, dtype="float32", mesh=mesh, rules=relaxed.replace(act_heads=(("tensor",), ())))
    assert target.params["layers_0"]["self_attn"]["q_proj"].sharding.spec == P(None, None, None)


def test_shard_map_from_logical_names():
    """The shard_map helper splits by the same rules and gives the unsharded result."""
    mesh = cpu_mesh(data=2, tensor=4)
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))  # [B, N, D]
    w = jax.random.normal(jax.random.key(1), (8, 16))  # [N, D]
    per_head = lambda x, w: jax.nn.softmax(x * w[None], axis=-1)  # independent per batch row and head
    mapped = jax.jit(shard_map(per_head, mesh, [("batch", "act_heads", "head_dim"), ("heads", "head_dim")],
                               ("batch", "act_heads", "head_dim")))
    out = mapped(x, w)
    np.testing.assert_allclose(np.asarray(out), np.asarray(per_head(x, w)), rtol=1e-6)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "tensor", None)), out.ndim)
