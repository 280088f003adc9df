"""Offline target cache: tokens, loss masks and the target's features, on disk, streamable.

The layout is DeepSpec's version-2 cache (reference section 1.3), so caches are exchangeable
with the reference trainer:

    <dir>/manifest.json     version 2, num_samples, shards, target_layer_ids, hidden_size,
                            target_model_name_or_path, max_length, ... (what produced the cache)
    <dir>/samples.idx       one 56-byte little-endian record per sample, `<Q I I Q Q Q Q Q>` =
                            (sample_id, shard_id, seq_len, byte offsets of the five tensors)
    <dir>/shard-XXXXX.bin   per sample, back to back:
                              input_ids             [S]           int32
                              attention_mask        [S]           uint8 (all ones)
                              loss_mask             [S]           uint8
                              target_hidden_states  [S, L_t * H]  bfloat16 (tapped layers, layer-major)
                              target_last_hidden    [S, H]        bfloat16 (after the final norm)

Bytes per token: 4 + 1 + 1 + 2 * L_t * H + 2 * H, e.g. 30,726 for Qwen3-4B (L_t = 5, H = 2560)
and 6,918 for SmolLM2-135M (H = 576). No logits are stored: the trainer recomputes target
logits from the last hidden state with the frozen LM head.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.models.target import target_features

VERSION = 2
INDEX = np.dtype([("sample_id", "<u8"), ("shard_id", "<u4"), ("seq_len", "<u4"), ("input_ids", "<u8"),
                  ("attention_mask", "<u8"), ("loss_mask", "<u8"), ("hidden", "<u8"), ("last_hidden", "<u8")])
assert INDEX.itemsize == 56


class CacheError(ValueError):
    """A cache that is missing, damaged, or was built for another configuration."""


def bytes_per_token(num_layers: int, hidden_size: int) -> int:
    return 4 + 1 + 1 + 2 * num_layers * hidden_size + 2 * hidden_size


def write_target_cache(target, examples, out_dir: str, *, layer_ids, batch_size: int = 8,
                       shard_bytes: int = 64 << 30, metadata: dict | None = None) -> dict:
    """Runs the target over `examples` ({"input_ids", "loss_mask"}) and writes a cache.

    Sequences are padded to a multiple of 128 per batch (few compiled shapes); each sample is
    stored at its true length. Returns the manifest.
    """
    os.makedirs(out_dir, exist_ok=True)
    hidden = target.config.hidden_size
    featurize = jax.jit(lambda p, ids: target_features(target, p, ids, layer_ids))
    records, shards = [], []
    shard, shard_file, offset = -1, None, shard_bytes
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = -(-max(len(e["input_ids"]) for e in chunk) // 128) * 128
        ids = np.zeros((batch_size, width), np.int32)
        for i, e in enumerate(chunk):
            ids[i, : len(e["input_ids"])] = e["input_ids"]
        features, last = featurize(target.params, jnp.asarray(ids))
        features = np.asarray(features.astype(jnp.bfloat16))
        last = np.asarray(last.astype(jnp.bfloat16))
        for i, e in enumerate(chunk):
            s = len(e["input_ids"])
            parts = [np.asarray(e["input_ids"], np.int32), np.ones(s, np.uint8), np.asarray(e["loss_mask"], np.uint8),
                     features[i, :s], last[i, :s]]
            size = sum(p.nbytes for p in parts)
            if offset + size > shard_bytes and offset > 0:
                if shard_file:
                    shard_file.close()
                shard += 1
                shards.append({"shard_id": shard, "file_name": f"shard-{shard:05d}.bin"})
                shard_file, offset = open(os.path.join(out_dir, shards[-1]["file_name"]), "wb"), 0
            offsets = []
            for p in parts:
                offsets.append(offset)
                shard_file.write(np.ascontiguousarray(p).tobytes())
                offset += p.nbytes
            records.append((len(records), shard, s, *offsets))
    if shard_file:
        shard_file.close()
    np.asarray(records, INDEX).tofile(os.path.join(out_dir, "samples.idx"))
    manifest = {
        "version": VERSION, "num_samples": len(records), "num_shards": len(shards), "shards": shards,
        "target_layer_ids": list(layer_ids), "hidden_size": hidden, "hidden_dtype": "bfloat16",
        "token_dtype": "int32", "mask_dtype": "uint8", "index_record_size": INDEX.itemsize,
        "bytes_per_token": bytes_per_token(len(layer_ids), hidden), **(metadata or {}),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


class TargetCache:
    """Random-access reader of a cache directory (a grain data source): sample i -> dict of
    input_ids int32 [S], loss_mask bool [S], features bf16 [S, L_t * H], last_hidden bf16 [S, H]."""

    def __init__(self, directory: str):
        path = os.path.join(directory, "manifest.json")
        if not os.path.exists(path):
            raise CacheError(f"{directory}: no manifest.json (not a target cache; build one with --prepare-cache)")
        with open(path) as f:
            self.manifest = json.load(f)
        self.directory = directory
        if self.manifest.get("version") != VERSION:
            raise CacheError(f"{path}: version {self.manifest.get('version')!r}, expected {VERSION}")
        self.index = np.fromfile(os.path.join(directory, "samples.idx"), INDEX)
        if len(self.index) != self.manifest["num_samples"]:
            raise CacheError(f"{directory}/samples.idx holds {len(self.index)} records, manifest says "
                             f"{self.manifest['num_samples']}")
        if not np.array_equal(self.index["sample_id"], np.arange(len(self.index))):
            raise CacheError(f"{directory}/samples.idx: record i must have sample_id i")
        self.shards = {s["shard_id"]: np.memmap(os.path.join(directory, s["file_name"]), np.uint8, "r")
                       for s in self.manifest["shards"]}
        self.features = len(self.manifest["target_layer_ids"]) * self.manifest["hidden_size"]

    def check(self, expected: dict) -> None:
        """Raises a CacheError naming the manifest key that disagrees with the training config.
        Targets compare by their last path component ("Qwen/Qwen3-4B" = "/models/Qwen3-4B")."""
        for key, want in expected.items():
            have = self.manifest.get(key)
            if key == "target_model_name_or_path" and have and want:
                have, want = (os.path.basename(os.path.normpath(x)) for x in (have, want))
            if have != want:
                raise CacheError(f"{self.directory}/manifest.json: {key} is {have!r} but the config needs {want!r}")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        r = self.index[i]
        buf, s, h = self.shards[int(r["shard_id"])], int(r["seq_len"]), self.manifest["hidden_size"]

        def read(key, dtype, shape):
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            return buf[int(r[key]) : int(r[key]) + n].view(dtype).reshape(shape)

        return {
            "input_ids": read("input_ids", np.int32, (s,)),
            "loss_mask": read("loss_mask", np.uint8, (s,)).astype(bool),
            "features": read("hidden", jnp.bfloat16, (s, self.features)),
            "last_hidden": read("last_hidden", jnp.bfloat16, (s, h)),
        }
