"""Every attention computation of the project, behind one implementation setting.

Four attention patterns exist; model code calls these functions and never computes attention
itself, so a kernel plugs in here and nowhere else:

- `cached_attention`: a decoder's queries over its KV cache (prefill, decode and verify);
  `kv_attention` takes the layer cache itself, contiguous or paged;
- `sequence_attention`: the causal attention of a cache-free full forward (training targets);
- `block_attention`: DSpark/DFlash block slots over injected context plus their own block;
  `kv_block_attention` takes the context's layer cache itself;
- `ttt_attention`: Eagle3's training-time-test unroll.

`implementation` (`ModelConfig.attention`, or the caller's argument) picks the computation:
"xla" is plain jnp (softmax in fp32, the reference every other implementation is tested
against); "cudnn" runs cuDNN's fused flash attention where it applies (the cache-free causal
forward in bf16/fp16 on a GPU) and XLA elsewhere; "pallas" runs the kernels of `pallas_kernels`
(interpreted off a GPU): ragged paged attention over paged caches, and block attention where
blocks attend to a whole context (training and scoring), with cuDNN for the causal forward on a
GPU as "cudnn" does, and XLA elsewhere.
Numerics: attention logits and softmax in fp32, products in the inputs' dtype.

Every function takes `scale` (the logit scale; None is 1/sqrt(head_dim), Gemma4 uses 1) and
the decoder's ones take `window` (a sliding-window layer: a query at position p sees only
positions > p - window); the kernel takes both.

Einsum letters follow the legend in `dspark_jax.models`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dspark_jax.models.config import ATTENTION_IMPLEMENTATIONS
from dspark_jax.models.kv_cache import LayerCache, PagedLayerCache
from dspark_jax.sharding import shard_map
from pallas_kernels.block_attention import block_attention as _block_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


def check_implementation(implementation: str) -> str:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    return implementation


def _scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else scale


def cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_lengths: jax.Array,
    implementation: str = "xla", *, scale: float | None = None, window: int | None = None,
    slot_positions: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query attention of queries over key slots 0..S-1 (slot s holds position s, or
    slot_positions[b, s] [B, S] for a ring cache; a negative one was never written).

    q: [B, T, N, D]; k, v: [B, K, S, D] (head-major, the KV-cache layout); q_positions: [B, T]
    int32; kv_lengths: [B] int32. Query t of row b sees position s iff s <= q_positions[b, t],
    s < kv_lengths[b] (and q_positions[b, t] - s < window). Returns [B, T, N, D] in q's dtype.
    A query that sees nothing gets a finite (unused) output. Every implementation runs XLA here.
    """
    check_implementation(implementation)
    b, t, n, d = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, d)  # [B, T, K, R, D]
    logits = jnp.einsum("btkrd,bksd->bkrts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * _scale(scale, d)
    slots = jnp.arange(k.shape[2], dtype=jnp.int32)[None, None, :] if slot_positions is None \
        else slot_positions[:, None, :]  # [B or 1, 1, S]
    qpos = q_positions[:, :, None]  # [B, T, 1]
    visible = (slots <= qpos) & (slots < kv_lengths[:, None, None]) & (slots >= 0)  # [B, T, S]
    if window is not None:
        visible = visible & (qpos - slots < window)
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkrts,bksd->btkrd", probs, v)
    return out.reshape(b, t, n, d)


def kv_attention(q: jax.Array, kv: LayerCache | PagedLayerCache, q_positions: jax.Array, kv_lengths: jax.Array,
                 implementation: str = "xla", *, scale: float | None = None, window: int | None = None) -> jax.Array:
    """`cached_attention` over a layer cache. With "pallas" a paged cache is read by the ragged
    paged attention kernel, which reads only the pages below each row's length (and its last
    query's position); otherwise the cache's view is gathered first (every page of a paged
    cache's block table). A query that sees nothing gets zeros from the kernel and a finite
    (unused) output otherwise."""
    if isinstance(kv, PagedLayerCache) and check_implementation(implementation) == "pallas":
        return ragged_paged_attention(q, kv.k, kv.v, kv.block_table, q_positions, kv_lengths, scale=scale,
                                      window=window)
    slot_positions = kv.slot_positions(kv_lengths) if isinstance(kv, LayerCache) else None
    return cached_attention(q, *kv.view(), q_positions, kv_lengths, implementation, scale=scale, window=window,
                            slot_positions=slot_positions)


def sequence_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                       implementation: str = "xla", *, scale: float | None = None,
                       window: int | None = None) -> jax.Array:
    """Causal attention of a cache-free forward over positions 0..T-1.

    q: [B, T, N, D]; k, v: [B, T, K, D] (token-major); lengths: [B] (T in a full forward).
    "cudnn" (and "pallas" on a GPU) in bf16/fp16 never materialises the [T, T] scores. Rows past a sequence's length
    hold padding and are unused either way (causality keeps them out of real rows).
    """
    fused = check_implementation(implementation) == "cudnn" or (implementation == "pallas" and
                                                                jax.default_backend() == "gpu")
    if fused and q.dtype in (jnp.bfloat16, jnp.float16):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn",
                                            local_window_size=None if window is None else (window - 1, 0))
    b, t = q.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return cached_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, lengths, scale=scale,
                            window=window)


def block_attention(
    q: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    ctx_len: jax.Array,
    k_blk: jax.Array,
    v_blk: jax.Array,
    keep: jax.Array,
    implementation: str = "xla",
    *,
    scale: float | None = None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Attention of block slots over injected context plus their own block, one softmax.

    q: [B, A, G, N, D] (A blocks of G slots); k_ctx, v_ctx: [B, K, S, D] context keys/values
    (slot s = position s); ctx_len: [B, A], block a sees context slots s < ctx_len[b, a];
    k_blk, v_blk: [B, A, G, K, D]; keep: [B, A], False blocks see nothing and output zeros.
    Returns [B, A, G, N, D]. With "pallas" the block attention kernels compute it (and its
    gradient) without building the [slots, keys] scores; otherwise their jnp reference does.
    Under a `mesh` of several devices the kernels run on each device's sequences (a kernel call
    has no rule of its own to split it); every device of a tensor axis computes all heads.
    """
    kernel = "pallas" if check_implementation(implementation) == "pallas" else "xla"
    attend = lambda *args: _block_attention(*args, implementation=kernel, scale=scale)
    if kernel == "pallas" and mesh is not None and mesh.size > 1:
        per_sequence = lambda x: ("batch",) + (None,) * (x.ndim - 1)
        args = (q, k_ctx, v_ctx, ctx_len, k_blk, v_blk, keep)
        attend = shard_map(attend, mesh, [per_sequence(x) for x in args], per_sequence(q), check_vma=False)
    return attend(q, k_ctx, v_ctx, ctx_len, k_blk, v_blk, keep)


def kv_block_attention(q: jax.Array, kv: LayerCache | PagedLayerCache, ctx_len: jax.Array, k_blk: jax.Array,
                       v_blk: jax.Array, keep: jax.Array, implementation: str = "xla", *,
                       scale: float | None = None) -> jax.Array:
    """`block_attention` with the context in a layer cache (a draft proposing at inference).
    With "pallas" a paged context is read by the ragged paged attention kernel (only the pages
    below each block's context length); its softmax over the context is then merged with the
    block's own keys through the kernel's log-sum-exp, which is the one softmax of
    `block_attention` up to rounding. Otherwise the cache's view is gathered first and XLA
    attends over it."""
    b, a, g, n, d = q.shape
    if a == 0:  # the context is only being written (a draft taking in positions): nothing attends
        return jnp.zeros(q.shape, q.dtype)
    if not (isinstance(kv, PagedLayerCache) and check_implementation(implementation) == "pallas"):
        return block_attention(q, *kv.view(), ctx_len, k_blk, v_blk, keep, scale=scale)
    kv_heads = k_blk.shape[3]
    # every slot of block a sees context positions < ctx_len[b, a]; a dropped block sees nothing
    last = jnp.where(keep, ctx_len - 1, -1)  # [B, A]
    positions = jnp.repeat(last, g, axis=1)  # [B, A * G]
    lengths = jnp.max(jnp.where(keep, ctx_len, 0), axis=1)  # [B]
    out_ctx, lse_ctx = ragged_paged_attention(q.reshape(b, a * g, n, d), kv.k, kv.v, kv.block_table, positions,
                                              lengths, return_lse=True, scale=scale)
    out_ctx = out_ctx.reshape(b, a, g, kv_heads, n // kv_heads, d).astype(jnp.float32)  # [B, A, G, K, R, D]
    lse_ctx = lse_ctx.reshape(b, a, g, kv_heads, n // kv_heads)  # [B, A, G, K, R]
    qg = q.reshape(b, a, g, kv_heads, n // kv_heads, d)  # [B, A, G, K, R, D]
    s_blk = jnp.einsum("bajkrd,balkd->bajkrl", qg, k_blk, preferred_element_type=jnp.float32) * _scale(scale, d)
    s_blk = jnp.where(keep[:, :, None, None, None, None], s_blk, -jnp.inf)  # [B, A, G, K, R, G]
    peak = jnp.maximum(lse_ctx, jnp.max(s_blk, axis=-1))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    w_ctx = jnp.exp(lse_ctx - peak)  # the context's share (0 where it has none)
    p_blk = jnp.exp(s_blk - peak[..., None])
    total = w_ctx + jnp.sum(p_blk, axis=-1)
    out = w_ctx[..., None] * out_ctx + jnp.einsum("bajkrl,balkd->bajkrd", p_blk.astype(v_blk.dtype), v_blk,
                                                  preferred_element_type=jnp.float32)
    out = out / jnp.where(total > 0, total, 1.0)[..., None]  # dropped blocks: zeros
    return out.reshape(b, a, g, n, d).astype(q.dtype)


def ttt_attention(q, k0, v0, diag_k, diag_v, implementation: str = "xla", *, scale: float | None = None):
    """Eagle3's training-time-test attention at unroll step len(diag_k).

    q [B, T, N, D] over step-0 keys k0/v0 [B, K, T, D] at positions <= t and, at the same t,
    the keys of later steps diag_k/diag_v (lists of [B, T, K, D]). Returns [B, T, N, D].
    """
    check_implementation(implementation)
    b, t, n, d = q.shape
    kv_heads = k0.shape[1]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, d)  # [B, T, K, R, D]
    causal = jnp.einsum("btkrd,bksd->bkrts", qg, k0, preferred_element_type=jnp.float32)
    pos = jnp.arange(t)
    causal = jnp.where((pos[None, :] <= pos[:, None])[None, None, None], causal, -jnp.inf)
    diag = [jnp.einsum("btkrd,btkd->bkrt", qg, k, preferred_element_type=jnp.float32)[..., None] for k in diag_k]
    logits = jnp.concatenate([causal] + diag, axis=-1) * _scale(scale, d)  # [B, K, R, T, T + steps]
    probs = jax.nn.softmax(logits, axis=-1).astype(v0.dtype)
    out = jnp.einsum("bkrts,bksd->btkrd", probs[..., :t], v0)
    for i, v in enumerate(diag_v):
        out = out + jnp.einsum("bkrt,btkd->btkrd", probs[..., t + i], v)
    return out.reshape(b, t, n, d)
