"""A target of a preset's shape with random weights and a real tokenizer, saved as a
transformers directory: what `serve.py` and `bench_server_overhead.py` serve on a machine
without the real weights. With EOS ignored (as the serving benchmarks ask) the speed of
autoregressive decoding does not depend on the weights' values (with a draft it does: the
draft's acceptance depends on them).

    python scripts/save_random_target.py --preset smollm2-135m --out /tmp/smollm2-shape
    python scripts/bench_server_overhead.py --model /tmp/smollm2-shape --prompts gsm8k.jsonl ...
"""

from __future__ import annotations

import argparse

from dspark_jax import Target
from dspark_jax.checkpoints.target import save_target
from dspark_jax.models.presets import preset


def load_tokenizer(source: str):
    """SmolLM2's (the setup's GGUF) for "smollm2", a GGUF file's, or a tokenizer directory's."""
    if source == "smollm2" or source.endswith(".gguf"):
        from dspark_jax.checkpoints.gguf_file import GGUFCheckpoint
        from dspark_jax.checkpoints.smollm2 import smollm2_gguf

        return GGUFCheckpoint(smollm2_gguf() if source == "smollm2" else source).tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", help="a model preset (dspark_jax.models.presets)")
    p.add_argument("--tokenizer", default="smollm2", help="smollm2 (the setup's GGUF), a .gguf, or a tokenizer dir")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the directory to write")
    args = p.parse_args(argv)
    config, tokenizer = preset(args.preset), load_tokenizer(args.tokenizer)
    if len(tokenizer) > config.vocab_size:
        p.error(f"the tokenizer has {len(tokenizer)} tokens, more than {args.preset}'s vocab_size {config.vocab_size}")
    save_target(Target.random(config, dtype=args.dtype, seed=args.seed, tokenizer=tokenizer), args.out)
    print(f"{args.preset} with random {args.dtype} weights and {args.tokenizer}'s tokenizer in {args.out}")


if __name__ == "__main__":
    main()
