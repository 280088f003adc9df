"""The grain pipeline of training micro-batches: per-host shard, per-epoch shuffle, padding.

`micro_batches` is a random-access grain MapDataset: element k is this host's k-th micro-batch
(a dict of numpy arrays, right-padded to max_length). Iteration is deterministic in k, so the
iterator state a checkpoint needs is one integer, the next micro-batch index; epochs follow
one another seamlessly with a fresh permutation each.
"""

from __future__ import annotations

import grain
import numpy as np


def collate(samples, max_length: int) -> dict:
    """Right-pads samples to [b, max_length]: input_ids int32, loss_mask bool, lengths int32,
    and features / last_hidden when the samples carry them (offline target cache)."""
    b = len(samples)
    out = {"input_ids": np.zeros((b, max_length), np.int32), "loss_mask": np.zeros((b, max_length), bool),
           "lengths": np.zeros((b,), np.int32)}
    for key in ("features", "last_hidden"):
        if key in samples[0]:
            out[key] = np.zeros((b, max_length, samples[0][key].shape[-1]), samples[0][key].dtype)
    for i, sample in enumerate(samples):
        s = min(len(sample["input_ids"]), max_length)
        out["lengths"][i] = s
        for key in out:
            if key != "lengths":
                out[key][i, :s] = sample[key][:s]
    return out


def micro_batches(source, *, batch_size: int, max_length: int, seed: int, host_index: int = 0,
                  host_count: int = 1) -> grain.MapDataset:
    """This host's micro-batches of `batch_size` sequences (its share of the global micro-batch)."""
    if len(source) < host_count * batch_size:
        raise ValueError(f"{len(source)} sequences cannot fill a micro-batch of {host_count * batch_size}")
    ds = grain.MapDataset.source(source)[host_index::host_count]
    return ds.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True,
                                                batch_fn=lambda samples: collate(samples, max_length))
