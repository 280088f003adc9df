"""GGUF files (llama.cpp format) of the Llama, Qwen3 and Gemma4 architectures.

Weights are dequantized with the `gguf` package one block of rows at a time. llama.cpp's
converter permutes the rows of Llama q/k projections for its interleaved RoPE; we undo that
on read, so GGUF and transformers checkpoints share one (rotate-half) RoPE convention. The
model config and the tokenizer (BPE vocabulary, merges, special tokens, chat template) come
from the file's metadata.

Gemma4 as llama.cpp's converter writes it: `attention.sliding_window_pattern` marks the
sliding layers, `attention.key_length` / `key_length_swa` are the full and sliding head dims,
`attention.head_count_kv` is per layer where they differ, full layers without `attn_v` use
their keys as values, `rope.freq_base` / `freq_base_swa` are the two RoPE bases, and the
`rope_freqs` tensor (1 for rotated pairs, 1e30 for the rest) is the full layers'
proportional RoPE. Norm weights are stored as they are (Gemma4's norms multiply by w).
"""

from __future__ import annotations

import logging
from typing import Any

import gguf
import numpy as np

from dspark_jax.checkpoints.safetensors_io import CheckpointError
from dspark_jax.checkpoints.store import Store, StoredTensor
from dspark_jax.models.config import ConfigError, ModelConfig, RopeConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen3", "gemma4")

# GGUF "tokenizer.ggml.pre" -> regex of the pre-tokenizer that the model was trained with.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGML_CONTROL, _GGML_USER_DEFINED = 3, 4
logger = logging.getLogger(__name__)


class GGUFCheckpoint:
    """Metadata, tensors, config and tokenizer of one GGUF file."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.arch = self.metadata("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{path}: unknown architecture general.architecture={self.arch!r}; "
                f"supported: {list(SUPPORTED_ARCHITECTURES)}"
            )

    def metadata(self, key: str, default: Any = KeyError) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise ConfigError(f"{self.path}: missing required metadata key {key!r}")
            return default
        return field.contents()

    def config(self) -> ModelConfig:
        if self.arch == "gemma4":
            return self._gemma4_config()
        arch, m = self.arch, self.metadata
        hidden = int(m(f"{arch}.embedding_length"))
        heads = int(m(f"{arch}.attention.head_count"))
        scaling = m(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", ""):
            raise ConfigError(f"{self.path}: unsupported {arch}.rope.scaling.type {scaling!r}")
        theta = float(m(f"{arch}.rope.freq_base", 10000.0))
        rope = RopeConfig(theta=theta)
        if "rope_freqs.weight" in self._tensors:
            factors = self._dequantize("rope_freqs.weight", 0, None).reshape(-1)
            rope = RopeConfig(theta=theta, rope_type="freq_factors", freq_factors=tuple(float(f) for f in factors))
        tokens = m("tokenizer.ggml.tokens", None)
        vocab = m(f"{arch}.vocab_size", None) or (len(tokens) if tokens else self.shape("token_embd.weight")[0])
        eos = m("tokenizer.ggml.eos_token_id", None)
        return ModelConfig(
            family=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(m(f"{arch}.feed_forward_length")),
            num_layers=int(m(f"{arch}.block_count")),
            num_heads=heads,
            num_kv_heads=int(m(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(m(f"{arch}.attention.key_length", hidden // heads)),
            rms_norm_eps=float(m(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope=rope,
            tie_word_embeddings="output.weight" not in self._tensors,
            max_position_embeddings=int(m(f"{arch}.context_length", 4096)),
            bos_token_id=m("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=() if eos is None else (int(eos),),
        )

    def _gemma4_config(self) -> ModelConfig:
        m = self.metadata
        for key, what in (("embedding_length_per_layer_input", "per-layer input embeddings"),
                          ("attention.shared_kv_layers", "key/value sharing across layers"),
                          ("expert_count", "mixture-of-experts blocks")):
            if m(f"gemma4.{key}", 0):
                raise ConfigError(f"{self.path}: gemma4.{key}={m(f'gemma4.{key}')} ({what}) is not supported")
        layers = int(m("gemma4.block_count"))
        pattern = m("gemma4.attention.sliding_window_pattern", [False] * layers)
        if not isinstance(pattern, list):  # a period n: every n-th layer is full
            pattern = [(i + 1) % int(pattern) != 0 for i in range(layers)]
        kinds = ["sliding_attention" if swa else "full_attention" for swa in pattern]
        kv = m("gemma4.attention.head_count_kv")
        kv = list(kv) if isinstance(kv, list) else [int(kv)] * layers
        full = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
        sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
        keys_as_values = any(f"blk.{i}.attn_v.weight" not in self._tensors for i in full)
        head_dim = int(m("gemma4.attention.key_length"))
        global_rope = RopeConfig(theta=float(m("gemma4.rope.freq_base", 1000000.0)))
        if "rope_freqs.weight" in self._tensors:
            factors = self._dequantize("rope_freqs.weight", 0, None).reshape(-1)
            rotated = int(np.sum(factors < 1e20))  # the rest never turn (factor 1e30)
            if factors.size != head_dim // 2 or np.any(factors[:rotated] != 1) or np.any(factors[rotated:] < 1e20):
                raise ConfigError(f"{self.path}: rope_freqs is not a proportional RoPE of head dim {head_dim}")
            global_rope = RopeConfig(theta=global_rope.theta, rope_type="proportional",
                                     partial_rotary_factor=2 * rotated / head_dim)
        softcap = m("gemma4.final_logit_softcapping", None)
        eos = m("tokenizer.ggml.eos_token_id", 1)
        return ModelConfig(
            family="gemma4",
            vocab_size=int(m("gemma4.vocab_size", None) or self.shape("token_embd.weight")[0]),
            hidden_size=int(m("gemma4.embedding_length")),
            intermediate_size=int(m("gemma4.feed_forward_length")),
            num_layers=layers,
            num_heads=int(m("gemma4.attention.head_count")),
            num_kv_heads=int(kv[sliding[0]] if sliding else kv[0]),
            head_dim=int(m("gemma4.attention.key_length_swa", head_dim)),
            rms_norm_eps=float(m("gemma4.attention.layer_norm_rms_epsilon")),
            rope=RopeConfig(theta=float(m("gemma4.rope.freq_base_swa", 10000.0))),
            tie_word_embeddings="output.weight" not in self._tensors,
            max_position_embeddings=int(m("gemma4.context_length", 131072)),
            bos_token_id=m("tokenizer.ggml.bos_token_id", 2),
            eos_token_ids=(int(eos),),
            hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=None if softcap is None else float(softcap),
            layer_types=tuple(kinds),
            sliding_window=int(m("gemma4.attention.sliding_window")) if sliding else None,
            global_head_dim=head_dim,
            num_global_kv_heads=int(kv[full[0]]) if keys_as_values else None,
            attention_k_eq_v=keys_as_values,
            global_rope=global_rope,
        )

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape in transformers order: [rows, cols] for matrices (GGUF lists dims innermost first)."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def _dequantize(self, name: str, start: int, stop: int | None) -> np.ndarray:
        t = self._tensors[name]
        data = t.data if t.data.ndim > 1 else t.data.reshape(1, -1)
        rows = gguf.quants.dequantize(np.asarray(data[start:stop]), t.tensor_type)
        return rows.astype(np.float32, copy=False)

    def store(self, config: ModelConfig) -> Store:
        """StoredTensors in transformers layout; llama q/k rows are un-permuted on read."""
        store: Store = {}
        for name in self._tensors:
            shape = self.shape(name)
            unpermute = None
            if self.arch == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight")):
                unpermute = config.num_heads if "attn_q" in name else config.num_kv_heads
            reader = _with_columns(self._row_reader(name, shape, unpermute))
            store[name] = StoredTensor(name, self.path, shape, reader)
        return store

    def _row_reader(self, name: str, shape: tuple[int, ...], unpermute_heads: int | None):
        if len(shape) == 1:
            return lambda start, stop: self._dequantize(name, 0, None).reshape(-1)[start:stop]
        if unpermute_heads is None:
            return lambda start, stop: self._dequantize(name, start, stop)
        head_rows = shape[0] // unpermute_heads

        def read(start: int, stop: int) -> np.ndarray:
            lo, hi = start // head_rows * head_rows, -(-stop // head_rows) * head_rows
            block = self._dequantize(name, lo, hi)  # whole heads, GGUF row order
            n = (hi - lo) // head_rows
            block = block.reshape(n, head_rows // 2, 2, -1).swapaxes(1, 2).reshape(hi - lo, -1)
            return block[start - lo : stop - lo]

        return read

    def tokenizer(self):
        """A transformers PreTrainedTokenizerFast built from the BPE metadata, or None.

        Built here rather than by `AutoTokenizer.from_pretrained(dir, gguf_file=...)`: that path
        of transformers 5.17 imports torch (integrations/gguf/gguf_conversion_mapping.py), which
        this project does not depend on; and, with torch stubbed out, it encodes, decodes and
        renders the SmolLM2 fixtures identically but names <|im_start|> as eos and no pad token
        where the file says id 2 (<|im_end|>) for both. The SmolLM2 tests check this tokenizer
        against transformers' golden ids.
        """
        model = self.metadata("tokenizer.ggml.model", None)
        if model is None:
            return None
        if model != "gpt2":  # the weights still load; prompts then come as token ids
            logger.warning(f"{self.path}: tokenizer.ggml.model={model!r} is not read (only BPE 'gpt2'): no tokenizer")
            return None
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tokens = list(self.metadata("tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in self.metadata("tokenizer.ggml.merges")]
        types = list(self.metadata("tokenizer.ggml.token_type", [1] * len(tokens)))
        bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        pre = self.metadata("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("default", "gpt-2"))
        if pre == "smollm":
            bpe.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
        elif pre in ("llama-bpe", "llama3", "qwen2"):
            split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
            bpe.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
            )
        elif pre in ("default", "gpt-2"):
            bpe.pre_tokenizer = byte_level
        else:
            raise ConfigError(f"{self.path}: tokenizer.ggml.pre={pre!r} is not supported")
        bpe.decoder = decoders.ByteLevel()
        specials = [t for t, kind in zip(tokens, types) if kind in (_GGML_CONTROL, _GGML_USER_DEFINED)]
        bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

        def token(key):
            i = self.metadata(f"tokenizer.ggml.{key}_token_id", None)
            return None if i is None else tokens[int(i)]

        return PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token=token("bos"),
            eos_token=token("eos"),
            unk_token=token("unknown"),
            pad_token=token("padding"),
            chat_template=self.metadata("tokenizer.chat_template", None),
        )


def _with_columns(read_rows):
    """A row reader that also takes `columns=(c0, c1)` (GGUF rows are dequantized whole)."""
    def read(start: int, stop: int, columns: tuple[int, int] | None = None) -> np.ndarray:
        block = read_rows(start, stop)
        return block if columns is None else block[:, columns[0] : columns[1]]

    return read
