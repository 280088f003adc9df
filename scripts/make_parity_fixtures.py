"""Writes the golden fixtures of tests/fixtures/ with transformers' PyTorch models.

Runs under any Python that has torch, transformers (>= 5.17), gguf and accelerate; on
machines where jax needs Python 3.12 but torch only ships for 3.11, use a separate 3.11
environment:

    python3.11 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 transformers==5.17.0 gguf accelerate
    /tmp/ref/bin/python scripts/make_parity_fixtures.py --smollm2-gguf PATH.gguf --smollm2-tokenizer DIR

Outputs:
- tests/fixtures/tiny/<name>/: a random tiny Qwen3, Llama or Gemma4 checkpoint (config.json +
  safetensors, one of them sharded with an index) and golden.npz with input ids, fp32 and bf16
  logits, final-normed hidden states, and the raw output of every decoder layer;
- tests/fixtures/smollm2_golden.npz: SmolLM2-135M-Instruct (GGUF, dequantized by
  transformers) on a fixed ChatML prompt: top-20 logits per position and logsumexp, plus the
  greedy answer to "What is the capital of France?";
- tests/fixtures/smollm2_tokenizer.json: token ids of sample strings and a rendered chat from
  the reference tokenizer.json, to check the tokenizer built from GGUF metadata;
- tests/fixtures/tiny/gemma4_*.gguf: the tiny Gemma4 checkpoints written as llama.cpp's
  converter writes Gemma4 (its tensor names from the gguf package's map, its metadata keys,
  the rope_freqs tensor of the full layers' proportional RoPE), read against golden.npz;
- tests/fixtures/gemma4_12b.json: the parameter count of Gemma-4-12B's text decoder;
- with --deepspec DIR instead (a checkout of deepseek-ai/DeepSpec, run under the transformers
  release it pins, 5.10.2, whose Gemma4 modules it was written against; nothing else is written
  then): tests/fixtures/gemma4_drafts/<name>/,
  random tiny Gemma4 DSpark and Eagle3 drafters built by the reference's own PyTorch modules,
  saved with save_pretrained, and golden.npz with their inputs and outputs (DSpark: the
  training forward's Markov-biased draft logits and confidence logits at fixed anchors;
  Eagle3: the layer's logits over a sequence, the first training-time-test step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from unittest import mock

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")

TINY = {
    # GQA, explicit head_dim (32 != 64 / 4), untied head.
    "qwen3_gqa_untied": dict(
        cls="Qwen3",
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=160, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
    ),
    # Multi-head attention, tied head.
    "qwen3_mha_tied": dict(
        cls="Qwen3",
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, vocab_size=128, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
    ),
    # GQA with Llama 3.1 RoPE scaling (a short original context so that scaling bites), untied.
    "llama_gqa_llama3rope": dict(
        cls="Llama",
        hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=144, tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
        },
        rms_norm_eps=1e-5,
    ),
    # Tied head, saved as several shards with model.safetensors.index.json.
    "llama_tied_sharded": dict(
        cls="Llama",
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, vocab_size=96, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        max_shard_size="40KB",
    ),
    # Gemma4: sliding-window layers (window 5 < the 12 input tokens) between full layers with
    # their own head dim, one key/value head whose keys double as values, proportional RoPE,
    # soft-capped logits, tied head.
    "gemma4_sliding_k_eq_v": dict(
        cls="Gemma4", config_cls="Gemma4TextConfig",
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        vocab_size=160, tie_word_embeddings=True, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
        rms_norm_eps=1e-6,
    ),
    # Gemma4 with separate value projections everywhere, no soft-cap, an untied head.
    "gemma4_untied_v_proj": dict(
        cls="Gemma4", config_cls="Gemma4TextConfig",
        hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=16, attention_k_eq_v=False, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 100000.0},
        },
        vocab_size=128, tie_word_embeddings=False, final_logit_softcapping=None, hidden_size_per_layer_input=0,
        rms_norm_eps=1e-6,
    ),
}

# google/gemma-4-12B-it's text decoder (as transformers' Gemma4UnifiedTextConfig describes it).
GEMMA4_12B_TEXT = dict(
    hidden_size=3840, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8,
    num_global_key_value_heads=1, intermediate_size=15360, vocab_size=262144, head_dim=256, global_head_dim=512,
    attention_k_eq_v=True, tie_word_embeddings=True, sliding_window=1024, max_position_embeddings=131072,
    final_logit_softcapping=30.0,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)],
)

SMOLLM2_PROMPT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Explain in two sentences why the sky is blue."},
    {"role": "assistant", "content": "Sunlight scatters off air molecules; blue light scatters most."},
    {"role": "user", "content": "And at sunset? Answer in 12 words or fewer."},
]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
TOKENIZER_SAMPLES = [
    "Hello, world!",
    "The year 2024 had 366 days; pi is 3.14159.",
    "  leading spaces\tand tabs\nnew lines\n\n",
    "def f(x):\n    return x ** 2  # square",
    "Ünïcödé — naïve café, 東京, emoji 🙂",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with healthy activations: N(0, 1/fan_in) matrices, N(1, 0.1) norm scales and
    Gemma4 layer scalars (buffers, 1.0 in released checkpoints, so a test sees them applied)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1.0 + 0.1 * torch.randn(b.shape, generator=gen))
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def layer_outputs(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, final-normed hidden, raw output of every decoder layer [L, B, T, H])."""
    captured = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
        for layer in model.model.layers
    ]
    try:
        out = model(input_ids=input_ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out.logits.detach(), out.hidden_states[-1].detach(), torch.stack(captured)


def as_f32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


def make_tiny(name: str, spec: dict, seed: int) -> None:
    spec = dict(spec)
    cls = spec.pop("cls")
    shard = spec.pop("max_shard_size", None)
    config = getattr(transformers, spec.pop("config_cls", f"{cls}Config"))(**spec)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).float().eval()
    randomize(model, seed)
    out_dir = os.path.join(FIXTURES, "tiny", name)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    model.save_pretrained(out_dir, max_shard_size=shard) if shard else model.save_pretrained(out_dir)
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        logits32, last32, layers32 = layer_outputs(model, input_ids)
        model_bf16 = model.to(torch.bfloat16)
        logits16, last16, layers16 = layer_outputs(model_bf16, input_ids)
    np.savez_compressed(
        os.path.join(out_dir, "golden.npz"),
        input_ids=input_ids.numpy().astype(np.int32),
        logits_fp32=as_f32(logits32),
        last_hidden_fp32=as_f32(last32),
        layers_fp32=as_f32(layers32),
        logits_bf16=as_f32(logits16),
        last_hidden_bf16=as_f32(last16),
        layers_bf16=as_f32(layers16),
    )
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params -> {out_dir}")


def write_gemma4_gguf(name: str) -> None:
    """tests/fixtures/tiny/<name>.gguf from the tiny Gemma4 checkpoint <name>, in fp32, with
    the metadata and tensors llama.cpp's Gemma4 converter writes (no tokenizer)."""
    import gguf
    from safetensors.numpy import load_file

    src = os.path.join(FIXTURES, "tiny", name)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    full_dims = {**{"head_dim": cfg["head_dim"]}, **next(iter((cfg.get("per_layer_config") or {"": {}}).values()))}
    swa = [kind == "sliding_attention" for kind in cfg["layer_types"]]
    w = gguf.GGUFWriter(os.path.join(FIXTURES, "tiny", f"{name}.gguf"), arch="gemma4")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_sliding_window_pattern(swa)
    w.add_key_length(full_dims["head_dim"])
    w.add_value_length(full_dims["head_dim"])
    w.add_key_length_swa(cfg["head_dim"])
    w.add_value_length_swa(cfg["head_dim"])
    full_kv = full_dims.get("num_key_value_heads", cfg["num_key_value_heads"])
    w.add_head_count_kv([cfg["num_key_value_heads"] if s else full_kv for s in swa])
    w.add_rope_freq_base(cfg["rope_parameters"]["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(cfg["rope_parameters"]["sliding_attention"]["rope_theta"])
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_shared_kv_layers(0)
    w.add_embedding_length_per_layer_input(0)
    rotated = int(full_dims["head_dim"] * cfg["rope_parameters"]["full_attention"]["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", np.asarray([1.0] * rotated + [1e30] * (full_dims["head_dim"] // 2 - rotated),
                                                 np.float32))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, cfg["num_hidden_layers"])
    for key, array in load_file(os.path.join(src, "model.safetensors")).items():
        # every tensor is a ".weight" in the file, layer_scalar too (as the converter names it)
        w.add_tensor(names.get_name(key.removesuffix(".weight")) + ".weight", array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{name}.gguf written")


def count_gemma4_12b() -> None:
    """The parameter count of Gemma-4-12B's text decoder with LM head, from transformers'
    module built on the meta device (no memory), for the eval_shape test."""
    from transformers.models.gemma4_unified import Gemma4UnifiedForCausalLM, Gemma4UnifiedTextConfig

    with torch.device("meta"):
        model = Gemma4UnifiedForCausalLM(Gemma4UnifiedTextConfig(**GEMMA4_12B_TEXT))
    count = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("layer_scalar"))
    with open(os.path.join(FIXTURES, "gemma4_12b.json"), "w") as f:
        json.dump({"text_config": GEMMA4_12B_TEXT, "num_params": count}, f, indent=1)
    print(f"gemma4-12b text decoder: {count} parameters (tied head, layer scalars included)")


# Tiny Gemma4 drafter layers: the draft-layer fields DeepSpec copies from a Gemma4 target.
GEMMA4_DRAFT_TEXT = dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    attention_k_eq_v=True, vocab_size=160, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    rms_norm_eps=1e-6,
)


def _gemma4_draft_config(num_layers: int, fields: dict):
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    config = Gemma4TextConfig(**GEMMA4_DRAFT_TEXT, num_hidden_layers=num_layers, global_head_dim=32,
                              num_global_key_value_heads=1, layer_types=["full_attention"] * num_layers)
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def make_gemma4_drafts(deepspec_dir: str) -> None:
    sys.path.insert(0, deepspec_dir)
    import deepspec.modeling.dspark.gemma4.modeling as dspark_gemma4
    from deepspec.modeling.eagle3.gemma4.modeling import Gemma4Eagle3Model

    out_root = os.path.join(FIXTURES, "gemma4_drafts")
    gen = torch.Generator().manual_seed(7)
    b, s, taps = 2, 24, [0, 1, 2, 4, 5]
    ids = torch.randint(0, GEMMA4_DRAFT_TEXT["vocab_size"], (b, s), generator=gen)
    features = torch.randn(b, s, len(taps) * GEMMA4_DRAFT_TEXT["hidden_size"], generator=gen)

    dspark = _gemma4_draft_config(2, dict(
        architectures=["Gemma4DSparkModel"], target_layer_ids=taps, num_target_layers=6, block_size=4,
        mask_token_id=4, num_anchors=3, enable_confidence_head=True, confidence_head_with_markov=True,
        markov_rank=8, markov_head_type="vanilla", _attn_implementation="flex_attention"))
    model = dspark_gemma4.Gemma4DSparkModel(dspark).float().eval()
    randomize(model, seed=11)
    anchors = torch.tensor([[2, 9, 17], [0, 5, 20]])
    keep = torch.tensor([[True, True, True], [True, False, True]])
    loss_mask = torch.ones(b, s, dtype=torch.bool)
    with torch.no_grad(), mock.patch.object(dspark_gemma4, "sample_anchor_positions", lambda **_: (anchors, keep)):
        out = model(ids, features, loss_mask)
    _save_draft(model, os.path.join(out_root, "dspark"), input_ids=ids, features=features, anchors=anchors, keep=keep,
                draft_logits=out.draft_logits, confidence=out.confidence_pred)

    eagle3 = _gemma4_draft_config(1, dict(
        architectures=["Gemma4Eagle3Model"], target_layer_ids=taps, num_target_layers=6, ttt_length=3,
        step_loss_decay=0.8, draft_num_hidden_layers=1, _attn_implementation="sdpa"))
    model = Gemma4Eagle3Model(eagle3).float().eval()
    randomize(model, seed=12)
    next_ids = torch.cat([ids[:, 1:], torch.zeros(b, 1, dtype=ids.dtype)], dim=1)  # x_{t+1}, 0 past the end
    with torch.no_grad():
        out = model(hidden_states=features, input_ids=next_ids, position_ids=torch.arange(s).expand(b, s),
                    return_logits=True)
    _save_draft(model, os.path.join(out_root, "eagle3"), input_ids=ids, features=features,
                step0_logits=out.draft_logits)


def _save_draft(model, out_dir: str, **arrays) -> None:
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    np.savez_compressed(os.path.join(out_dir, "golden.npz"),
                        **{k: v.numpy() if v.dtype != torch.long else v.numpy().astype(np.int32)
                           for k, v in arrays.items()})
    print(f"{model.__class__.__name__}: {sum(p.numel() for p in model.parameters())} params -> {out_dir}")


def make_smollm2(gguf_path: str, tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).eval()
    prompt_ids = tok.apply_chat_template(SMOLLM2_PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    france_ids = tok.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids])).logits[0].float()
        top = torch.topk(logits, 20, dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        generated = model.generate(
            torch.tensor([france_ids]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id
        )[0, len(france_ids):]
    answer = tok.decode(generated, skip_special_tokens=True)
    print(f"smollm2 greedy answer: {answer!r}")
    np.savez_compressed(
        os.path.join(FIXTURES, "smollm2_golden.npz"),
        prompt_ids=np.asarray(prompt_ids, np.int32),
        top_ids=top.indices.numpy().astype(np.int32),
        top_logits=top.values.numpy(),
        logsumexp=lse.numpy(),
        france_ids=np.asarray(france_ids, np.int32),
        france_greedy=generated.numpy().astype(np.int32),
    )
    samples = {
        "texts": TOKENIZER_SAMPLES,
        "ids": [tok.encode(t, add_special_tokens=False) for t in TOKENIZER_SAMPLES],
        "chat": SMOLLM2_PROMPT,
        "chat_rendered": tok.apply_chat_template(SMOLLM2_PROMPT, add_generation_prompt=True, tokenize=False),
        "chat_ids": prompt_ids,
        "france_answer": answer,
    }
    with open(os.path.join(FIXTURES, "smollm2_tokenizer.json"), "w") as f:
        json.dump(samples, f, indent=1, ensure_ascii=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2-gguf", help="SmolLM2-135M-Instruct GGUF (python -m dspark_jax fetch-smollm2 prints it)")
    parser.add_argument("--smollm2-tokenizer", help="directory with SmolLM2's reference tokenizer.json")
    parser.add_argument("--only", nargs="*", help="write only these tiny checkpoints (default: all of them)")
    parser.add_argument("--deepspec", help="a DeepSpec checkout: write only the Gemma4 draft fixtures")
    args = parser.parse_args()
    if args.deepspec:  # under the reference's pinned transformers, which the other fixtures do not use
        make_gemma4_drafts(args.deepspec)
        return
    torch.manual_seed(0)
    for seed, (name, spec) in enumerate(TINY.items()):
        if not args.only or name in args.only:
            make_tiny(name, spec, seed=100 * seed)
    for name in ("gemma4_sliding_k_eq_v", "gemma4_untied_v_proj"):
        write_gemma4_gguf(name)
    count_gemma4_12b()
    if args.smollm2_gguf and args.smollm2_tokenizer:
        make_smollm2(args.smollm2_gguf, args.smollm2_tokenizer)


if __name__ == "__main__":
    main()
