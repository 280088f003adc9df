"""An independent float64 numpy implementation of one DSpark block, written from the reference
description (sections 2.2-2.3 and 3): context injection, block attention, Markov heads and the
confidence head, one token slot and one head at a time."""

import numpy as np


def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope(x, positions, theta):
    """x [T, n, d] rotated by positions [T] (rotate-half)."""
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2) / d)
    ang = positions[:, None] * inv_freq[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def dspark_block(p, cfg, features, anchor, anchor_id, block_tokens):
    """Draft logits [G, V] and confidence logits [G] of the block at `anchor`.

    p: the draft params as float64 numpy (our layout); cfg: DraftConfig; features [T, F].
    """
    lc = cfg.layers
    eps, theta, g = lc.rms_norm_eps, lc.rope.theta, cfg.block_size
    n_heads, n_kv, d = lc.num_heads, lc.num_kv_heads, lc.head_dim
    ctx = rmsnorm(features[:anchor] @ p["fc"], p["hidden_norm"]["scale"], eps)  # only rows < anchor
    ids = [anchor_id] + [cfg.mask_token_id] * (g - 1)
    x = p["embed_tokens"][ids]  # [G, H]
    pos_ctx, pos_blk = np.arange(anchor), anchor + np.arange(g)
    for i in range(lc.num_layers):
        lp = p[f"layers_{i}"]
        at = lp["self_attn"]
        xn = rmsnorm(x, lp["input_layernorm"]["scale"], eps)

        def keys_values(rows, pos):
            k = np.einsum("th,hkd->tkd", rows, at["k_proj"])
            if lc.qk_norm:
                k = rmsnorm(k, at["k_norm"]["scale"], eps)
            return rope(k, pos, theta), np.einsum("th,hkd->tkd", rows, at["v_proj"])

        q = np.einsum("th,hnd->tnd", xn, at["q_proj"])
        if lc.qk_norm:
            q = rmsnorm(q, at["q_norm"]["scale"], eps)
        q = rope(q, pos_blk, theta)
        kc, vc = keys_values(ctx, pos_ctx)
        kb, vb = keys_values(xn, pos_blk)
        keys, values = np.concatenate([kc, kb]), np.concatenate([vc, vb])  # context first, then block
        out = np.zeros((g, n_heads, d))
        for slot in range(g):
            for head in range(n_heads):
                kv = head // (n_heads // n_kv)
                scores = keys[:, kv] @ q[slot, head] / np.sqrt(d)
                w = np.exp(scores - scores.max())
                out[slot, head] = (w / w.sum()) @ values[:, kv]
        x = x + np.einsum("tnd,ndh->th", out, at["o_proj"])
        xn = rmsnorm(x, lp["post_attention_layernorm"]["scale"], eps)
        gate, up = xn @ lp["mlp"]["gate_proj"], xn @ lp["mlp"]["up_proj"]
        x = x + (gate * sigmoid(gate) * up) @ lp["mlp"]["down_proj"]
    h = rmsnorm(x, p["norm"]["scale"], eps)
    logits = h @ p["lm_head"] if "lm_head" in p else h @ p["embed_tokens"].T
    prev = [anchor_id] + list(block_tokens[:-1])
    e = None
    if cfg.markov_rank:
        mh = p["markov_head"]
        e = mh["markov_w1"][prev]  # [G, r]
        state = np.zeros(cfg.markov_rank)
        for j in range(g):
            if cfg.markov_head_type == "vanilla":
                vec = e[j]
            elif cfg.markov_head_type == "gated":
                gp = mh["gate_proj"]
                vec = sigmoid(np.concatenate([h[j], e[j]]) @ gp["kernel"] + gp["bias"]) * e[j]
            else:
                jp = mh["joint_proj"]
                z = np.concatenate([state, e[j], h[j]]) @ jp["kernel"] + jp["bias"]
                gt, cand, o = np.split(z, 3)
                vec = np.tanh(o)
                state = sigmoid(gt) * state + (1 - sigmoid(gt)) * np.tanh(cand)
            logits[j] = logits[j] + mh["markov_w2"] @ vec
    conf = np.zeros(g)
    if cfg.confidence_head:
        cp = p["confidence_head"]["proj"]
        f = np.concatenate([h, e], -1) if cfg.confidence_with_markov else h
        conf = (f @ cp["kernel"] + cp["bias"])[:, 0]
    return logits, conf
