"""GGUF files (llama.cpp format) of the Llama and Qwen3 architectures.

Weights are dequantized with the `gguf` package one block of rows at a time. llama.cpp's
converter permutes the rows of Llama q/k projections for its interleaved RoPE; we undo that
on read, so GGUF and transformers checkpoints share one (rotate-half) RoPE convention. The
model config and the tokenizer (BPE vocabulary, merges, special tokens, chat template) come
from the file's metadata.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from dspark_jax.checkpoints.safetensors_io import CheckpointError
from dspark_jax.checkpoints.store import Store, StoredTensor
from dspark_jax.models.config import ConfigError, ModelConfig, RopeConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen3")

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
        if model != "gpt2":
            raise ConfigError(f"{self.path}: tokenizer.ggml.model={model!r} is not supported (only BPE 'gpt2')")
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
