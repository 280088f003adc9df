"""Serving benchmark: the engine's output tokens/s and time per output token under load.

    python scripts/bench_engine.py --target smollm2 --draft runs/dspark_smollm2/draft \\
        --prompts ../shared/data/eval/mt-bench.jsonl --concurrency 1 4 16 64 256
    python scripts/bench_engine.py --target qwen3-4b --draft random:dspark --concurrency 1 4 16 64 256
    python scripts/bench_engine.py --target qwen3-8b --modes ar sched --tensor-parallel 2 --static-batch 0

For each mode (ar: no draft; fixed: the draft verifying all gamma tokens; fixed:<g>: the
draft verifying its first g tokens, through the narrower verify pass; sched: the draft
with the confidence scheduler, Algorithm 1 over an SPS table profiled at the start of the run
and calibrated to the engine's own rounds (`dspark_jax.serving.round_times`), with the draft's
seconds per round, so that it also skips drafting where drafting does not pay;
async: the same with the asynchronous scheduler, its budget from confidences two rounds old;
sched-always: the prefix scheduler without the draft's cost, drafting every round) and each
concurrency c, a closed loop keeps c requests in flight: --num-prompts requests (default 4c, at
least 16; one count for every level or one per level), each new one added as soon as one
finishes. Every request asks for --max-tokens tokens with EOS ignored, so all modes produce
the same amount of text, at --temperature (0: greedy; each
request sampled with its own seed otherwise). Before each measured loop the same
loop runs once to compile the engine's programs, and the run waits for the compilations it
started; programs compiled during the measured loop and steps that waited for one are
reported (`compiled_during`, `compile_stalls`: zero when the warm-up met every shape), with the
engine's mean wall time per step (`step_ms`), the part of it spent blocked on the device
(`wait_ms`: the rest is the host's planning, launching and committing), the share of the loop
it spent stepping (`stepping`; serve.py's /metrics gives the same for its engine, so
bench_serving.py reports them too), and the drafting decision's forecast scale at the level's
end (`forecast_scale`, `Engine.forecast_scale`).
Each setting's engine runs every level before the next engine is built, unless --repeats R
asks for more than one measurement: then every engine stays alive (the KV budget shared
evenly), and each level measures the settings in turn, R times over, so that whatever drifts
in the process (the host's clocks, the device allocator's layout) weighs on each engine alike;
the summary adds each setting's medians and its tokens/s over AR's in each repeat.
--out is rewritten after every level; `--resume` continues a run of the same command cut short
from the rows it holds.
Once the models are loaded the heap is frozen, as serve.py freezes it; the full garbage
collection before that is timed (`heap_collect_ms`, over `heap_objects` objects): what an
unfrozen process would pay at an unforeseen step.
Output tokens/s counts every
generated token over the loop's wall time; time per output token (TPOT) is a request's
(finish - first token) / (tokens - 1), p50/p99 over requests. The static baseline is
`generate` on c prompts at once (compilation excluded). `--tensor-parallel N` runs the target,
the draft and the engine under a mesh of N devices on its tensor axis (the Pallas kernels,
one device's, are refused there).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import re
import sys
import time

import numpy as np

from benchlib import level_requests, requests_per_level, step_profile

from dspark_jax import Target, generate, load_target
from dspark_jax.console import configure_logging
from dspark_jax.decoding.scheduler import scheduler_from_spec, scheduler_from_table
from dspark_jax.evaluation.calibration import load_sts
from dspark_jax.evaluation.evaluation import chat_ids, draft_from_spec, load_prompts
from dspark_jax.evaluation.sps import load_table, profile_draft_seconds
from dspark_jax.models.presets import preset
from dspark_jax.serving import Engine, SamplingParams
from dspark_jax.serving.engine import freeze_heap
from dspark_jax.serving.pages import pages_for_budget
from dspark_jax.serving.round_times import engine_table
from dspark_jax.sharding import make_mesh

log = logging.getLogger(__name__)


def workload(target, args) -> list[list[int]]:
    """Prompt ids: chat prompts from --prompts, or random tokens of --prompt-len."""
    if args.prompts:
        return chat_ids(target.tokenizer, load_prompts(args.prompts, cap=512))
    rng = np.random.default_rng(0)
    return rng.integers(0, target.config.vocab_size, (512, args.prompt_len)).tolist()


def closed_loop(engine: Engine, prompts, concurrency: int, total: int, params: SamplingParams) -> dict:
    """Keeps `concurrency` requests in flight until `total` have finished; timings per request."""
    submitted, added, first, finish, counts = 0, {}, {}, {}, {}

    def submit():
        nonlocal submitted
        rid = engine.add_request(prompts[submitted % len(prompts)], params)
        added[rid], counts[rid] = time.perf_counter(), 0
        submitted += 1

    for _ in range(min(concurrency, total)):
        submit()
    start = time.perf_counter()
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            if o.new_token_ids and o.request_id not in first:
                first[o.request_id] = now
            counts[o.request_id] += len(o.new_token_ids)
            if o.finished:
                finish[o.request_id] = now
                if submitted < total:
                    submit()
    seconds = time.perf_counter() - start
    ttft = [first[r] - added[r] for r in finish]
    tpot = [(finish[r] - first[r]) / (counts[r] - 1) for r in finish if counts[r] > 1]
    pct = lambda xs, q: 1e3 * float(np.percentile(xs, q))
    return {"requests": len(finish), "tokens": sum(counts.values()), "seconds": seconds,
            "requests_per_s": len(finish) / seconds, "tokens_per_s": sum(counts.values()) / seconds,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99)}


def static_baseline(target, prompts, batch: int, max_tokens: int, temperature: float) -> float:
    """Output tokens/s of `generate` on `batch` prompts at once, compilation excluded."""
    run = lambda: generate(target, None, prompts[:batch], max_new_tokens=max_tokens, temperature=temperature,
                           stop_ids=())
    run()
    start = time.perf_counter()
    tokens = sum(map(len, run().tokens))
    return tokens / (time.perf_counter() - start)


def earlier_run(path: str, command: list[str], device: str) -> dict:
    """What a run of the same command (--resume aside) on the same kind of device, cut short,
    wrote to `path` (for --resume; {} if nothing)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        earlier = json.load(f)
    same = lambda argv: [a for a in argv if a != "--resume"]
    if same(earlier.get("command") or []) != same(command):
        raise SystemExit(f"--resume: {path} was written by another command ({earlier.get('command')}); remove it "
                         "or run that command again")
    if earlier.get("device") != device:
        raise SystemExit(f"--resume: {path} holds rows measured on {earlier.get('device')}, not on this {device}")
    return earlier


def mode_name(text: str) -> str:
    if text in ("ar", "fixed", "sched", "async", "sched-always") or re.fullmatch(r"fixed:[1-9]\d*", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected ar, fixed, fixed:<g> (g >= 1), sched, async or sched-always")


def main(argv=None) -> None:
    configure_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2", help="smollm2, a preset name (random weights), or a checkpoint path")
    p.add_argument("--draft", default="random:dspark", help="a DeepSpec draft directory or random:<algorithm>")
    p.add_argument("--prompts", help="a {\"turns\": [...]} prompt file (default: random token prompts)")
    p.add_argument("--prompt-len", type=int, default=128, help="random prompts' length")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--num-prompts", type=int, nargs="+",
                   help="requests per level: one count, or one per --concurrency level (default: max(4c, 16))")
    p.add_argument("--modes", nargs="+", default=["ar", "fixed", "sched"], type=mode_name,
                   help="ar, fixed, fixed:<g>, sched, async, sched-always")
    p.add_argument("--scheduling", nargs="+", default=["async"], choices=["async", "sync"],
                   help="async: plan each step while the previous one runs; sync: one step at a time")
    p.add_argument("--scheduler-steps", type=int, nargs="+", default=[1],
                   help="the engine's num_scheduler_steps values to run (decoding rounds per step)")
    p.add_argument("--sps", help="for sched and async: an SPS table to use (a file with \"sps\", one curve or one "
                                 "per row count with \"sps_rows\", and the "
                                 "draft's \"draft_seconds\" unless they are to be profiled, such as an earlier run's "
                                 "--out) instead of profiling one calibrated to the engine's rounds "
                                 "(dspark_jax.serving.round_times, with the first --scheduler-steps and --kernels)")
    p.add_argument("--static-batch", type=int, default=64, help="batch of the static generate baseline (0: skip)")
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--kv-memory", type=float, default=0.5,
                   help="KV pages' budget: a fraction of free device memory, or bytes if > 1 (shared evenly by the "
                        "engines with --repeats)")
    p.add_argument("--repeats", type=int, default=1,
                   help="above 1: every setting's engine stays alive, and each level measures them in turn this many "
                        "times (ratios to AR from the same repeat; a process's drift shows in every engine alike)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--kernels", nargs="+", default=["auto"], choices=["auto", "pallas", "xla"],
                   help="the engines' paged attention, each in turn (auto: the engine's default)")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="split the target and the draft over this many devices (a tensor mesh axis)")
    p.add_argument("--out", default="bench_engine.json")
    p.add_argument("--resume", action="store_true",
                   help="go on with a run of the same command cut short: keep the rows, the SPS table and the static "
                        "baseline an existing --out holds, and run only what is missing")
    command = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(command)

    import jax

    earlier = earlier_run(args.out, command, jax.devices()[0].device_kind) if args.resume else {}

    try:
        counts = level_requests(args.num_prompts, args.concurrency, requests_per_level)
    except ValueError as e:
        p.error(str(e))
    requests = dict(zip(args.concurrency, counts))
    if any(requests[c] != n for c, n in zip(args.concurrency, counts)):
        p.error("a --concurrency level given twice needs one --num-prompts count for every level")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    mesh = None
    if args.tensor_parallel > 1 and "pallas" in args.kernels:
        p.error("--kernels pallas runs on one device; use --kernels xla with --tensor-parallel")
    if args.tensor_parallel > 1:
        if args.tensor_parallel > len(jax.devices()):
            p.error(f"--tensor-parallel {args.tensor_parallel} needs that many devices, this host has "
                    f"{len(jax.devices())}")
        mesh = make_mesh(tensor=args.tensor_parallel, devices=jax.devices()[:args.tensor_parallel])
    if args.target == "smollm2":
        from dspark_jax.checkpoints.smollm2 import smollm2_gguf

        target = load_target(smollm2_gguf(), dtype=args.dtype, mesh=mesh)
    elif "/" not in args.target and not args.target.endswith(".gguf"):
        target = Target.random(preset(args.target), dtype=args.dtype, mesh=mesh)
    else:
        target = load_target(args.target, dtype=args.dtype, mesh=mesh)
    prompts = workload(target, args)
    draft = draft_from_spec(args.draft, target, args.dtype) if set(args.modes) - {"ar"} else None
    temperatures = None if args.draft.startswith("random:") else load_sts(args.draft)  # as serve.py uses them
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True)
    mean_prompt = int(np.mean([len(x) for x in prompts]))
    results = {"command": command, "device": jax.devices()[0].device_kind, "tensor_parallel": args.tensor_parallel,
               "target": args.target, "draft": args.draft,
               "max_tokens": args.max_tokens, "temperature": args.temperature, "mean_prompt": mean_prompt,
               "rows": earlier.get("rows", [])}
    levels, context = sorted(set(args.concurrency)), mean_prompt + args.max_tokens // 2
    schedulers = {}
    if {"sched", "async", "sched-always"} & set(args.modes):
        table = load_table(args.sps) if args.sps else earlier
        if table.get("sps"):
            results.update({key: table[key] for key in ("sps", "sps_rows", "draft_seconds", "round_seconds")
                            if table.get(key)})
            results["draft_seconds"] = list(table.get("draft_seconds") or profile_draft_seconds(draft, levels, context))
        else:  # calibrated to the rounds of the first engine setting run
            results.update(engine_table(target, draft, levels, context, num_rounds=args.scheduler_steps[0],
                                        page_size=args.page_size, kernels=args.kernels[0], mesh=mesh))
        with open(args.out, "w") as f:  # the table, for --sps of a later run, even if this one is cut short
            json.dump(results, f, indent=1)
        schedulers = {"sched": scheduler_from_table("prefix", results, temperatures),
                      "async": scheduler_from_table("async", results, temperatures),
                      "sched-always": dataclasses.replace(scheduler_from_table("prefix", results, temperatures),
                                                          draft_seconds=None)}
    if args.static_batch:
        results["static_tokens_per_s"] = earlier.get("static_tokens_per_s") or static_baseline(
            target, prompts, args.static_batch, args.max_tokens, args.temperature)
        log.info("static generate, batch %d: %.0f tokens/s", args.static_batch, results["static_tokens_per_s"])
    # what is loaded (as serve.py does; each engine below stays collectable, to free its pool)
    seconds, frozen = freeze_heap()
    results["heap_collect_ms"], results["heap_objects"] = 1e3 * seconds, frozen
    log.info("a full garbage collection over the loaded heap (%d objects, then frozen) took %.0f ms", frozen,
             1e3 * seconds)
    settings = list(itertools.product(args.kernels, args.modes, args.scheduling, args.scheduler_steps))
    if args.repeats == 1:  # one engine at a time, each through every level
        runs = [(setting, c, 0) for setting in settings for c in args.concurrency]
    else:  # every engine alive, each level's settings measured in turn, --repeats times
        runs = [(setting, c, rep) for c in args.concurrency for rep in range(args.repeats) for setting in settings]
    kv_memory = args.kv_memory if args.kv_memory <= 1 else int(args.kv_memory)
    if args.repeats > 1:  # the engines alive at once share the budget evenly, in bytes
        kv_memory = pages_for_budget(kv_memory, 1, jax.devices()[0] if mesh is None else mesh.devices.flat[0])
        kv_memory //= len(settings)
    engines, warm = {}, set()
    for setting, c, rep in runs[len(results["rows"]):]:  # in order: a resumed run's rows are the first ones
        kernels, mode, scheduling, rounds = setting
        if setting not in engines:
            if args.repeats == 1:
                for engine in engines.values():
                    engine.close()
                engines.clear()
                engine = None  # the last engine's KV pool freed, before the next engine sizes its own
            engines[setting] = Engine(
                target, None if mode == "ar" else draft,
                scheduler=scheduler_from_spec(mode) if mode.startswith("fixed:") else schedulers.get(mode),
                max_num_seqs=max(args.concurrency), page_size=args.page_size, kv_memory=kv_memory,
                max_num_batched_tokens=2048, async_scheduling=scheduling == "async", num_scheduler_steps=rounds,
                kernels=kernels, mesh=mesh)
        engine = engines[setting]
        total = requests[c]
        if (setting, c) not in warm:
            closed_loop(engine, prompts, c, total, params)  # the same loop first: it compiles the level's programs
            engine.wait_for_programs()  # and the shapes it ran padded meanwhile
            warm.add((setting, c))
        before = engine.stats()
        row = {"mode": mode, "kernels": engine.target.config.attention, "scheduling": scheduling,
               "scheduler_steps": rounds, "concurrency": c, "repeat": rep,
               **closed_loop(engine, prompts, c, total, params)}
        after = engine.stats()
        row["compiled_during"] = after.program_shapes - before.program_shapes
        row["compile_stalls"] = after.compile_stalls - before.compile_stalls
        row["tokens_per_round"] = (after.tokens - before.tokens) / max(after.rounds - before.rounds, 1)
        row["undrafted"] = (after.undrafted_rounds - before.undrafted_rounds) / max(after.rounds - before.rounds, 1)
        row["forecast_scale"] = after.forecast_scale
        row.update(step_profile(after.steps - before.steps, after.step_seconds - before.step_seconds,
                                row["seconds"], after.wait_seconds - before.wait_seconds))
        row["verify_length_histogram"] = [a - b for a, b in zip(after.verify_length_histogram,
                                                                before.verify_length_histogram)]
        results["rows"].append(row)
        log.info("%s", json.dumps(row))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    for engine in engines.values():
        engine.close()
    print(f"\n{results['device']} x {args.tensor_parallel} (tensor parallel), target {args.target}, "
          f"draft {args.draft}, {args.max_tokens} tokens per request at T = {args.temperature}, "
          f"mean prompt {mean_prompt}")
    print(f"a full garbage collection over the loaded heap ({results['heap_objects']} objects, then frozen): "
          f"{results['heap_collect_ms']:.0f} ms")
    if "static_tokens_per_s" in results:
        print(f"static generate at batch {args.static_batch}: {results['static_tokens_per_s']:.0f} tokens/s")
    print("| mode | attention | scheduling | rounds/step | concurrency | tokens/s | TTFT p50 ms | TTFT p99 ms | "
          "TPOT p50 ms | TPOT p99 ms | tokens/round | undrafted | step ms | waiting ms | stepping |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['mode']} | {r['kernels']} | {r['scheduling']} | {r['scheduler_steps']} | {r['concurrency']} | "
              f"{r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['tpot_p50_ms']:.2f} | "
              f"{r['tpot_p99_ms']:.2f} | {r['tokens_per_round']:.2f} | {r['undrafted']:.0%} | {r['step_ms']:.2f} | "
              f"{r.get('wait_ms', float('nan')):.2f} | {r['stepping']:.0%} |")
    if args.repeats > 1:
        print_repeats(list(zip(runs, results["rows"])))


def print_repeats(measured) -> None:
    """For each setting and level over the repeats ((setting, concurrency, repeat), row) pairs:
    the median tokens/s and TPOT p50, and each repeat's tokens/s over the AR engine's of the
    same repeat, level, attention, scheduling and rounds per step (when ar is among the modes)."""
    ar = {((k, s, n), c, rep): row["tokens_per_s"] for ((k, m, s, n), c, rep), row in measured if m == "ar"}
    groups = {}
    for ((k, m, s, n), c, rep), row in measured:
        groups.setdefault(((k, m, s, n), c), []).append((rep, row))
    print("\n| mode | attention | scheduling | rounds/step | concurrency | repeats | median tokens/s | "
          "median TPOT p50 ms | tokens/s over AR's, each repeat |\n|---|---|---|---|---|---|---|---|---|")
    for ((k, m, s, n), c), reps in groups.items():
        ratios = [row["tokens_per_s"] / ar[(k, s, n), c, rep] for rep, row in reps if ((k, s, n), c, rep) in ar]
        print(f"| {m} | {reps[0][1]['kernels']} | {s} | {n} | {c} | {len(reps)} | "
              f"{np.median([row['tokens_per_s'] for _, row in reps]):.0f} | "
              f"{np.median([row['tpot_p50_ms'] for _, row in reps]):.2f} | {' '.join(f'{x:.3f}' for x in ratios)} |")


if __name__ == "__main__":
    main()
