"""End-to-end generation speed: autoregressive decoding against each drafter, per batch size.

    python scripts/bench_e2e.py --draft dspark=runs/dspark_smollm2/draft dflash=runs/dflash_smollm2/draft \\
        --prompts ../shared/data/eval/mt-bench.jsonl --batch-sizes 1 32 --out speed.json

For each batch size b, the first --num-prompts prompts (chat template applied) are generated b
at a time, compilation excluded (`timed_generate`), with plain decoding and with every draft;
tokens/s counts generated tokens. Beside each measured speedup is the ideal one,
tau * T_AR / (T_draft + T_verify): tau from the same run, and step times measured with
`step_times` at batch b, the run's mean context (prompt plus half the new tokens) and the
cache capacity the loops allocate for the median batch (AR and speculative loops size their
caches differently): T_AR one decode step, T_verify a target step over gamma + 1 tokens,
T_draft one `Draft.propose`. The
ideal leaves out what a real round adds: sampling and rejection, cache bookkeeping, the
stop/length checks of the loop, and, at b > 1, rows that finished early but still ride along
until the whole batch is done.

`--schedulers` runs each draft once per verify-length scheduler (`none` verifies every draft
token; `fixed:<g>`, `prefix:<sps.json>`, `async:<sps.json>` as eval.py takes them, `{batch}` in
a path standing for the batch size, so that each batch uses the SPS table profiled at its
concurrency), with the STS temperatures saved beside the draft: the live form of the paper's
Figure 7 (the scheduler against every fixed gamma and AR). The ideal is given for `none` only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys

import jax
import numpy as np

from dspark_jax import load_target
from dspark_jax.decoding.batching import bucket
from dspark_jax.evaluation.evaluation import acceptance_stats, chat_ids, draft_from_spec, load_prompts, timed_generate
from dspark_jax.sampling import SamplingParams
from dspark_jax.console import configure_logging
from dspark_jax.decoding.scheduler import scheduler_from_spec
from dspark_jax.evaluation.calibration import load_sts
from dspark_jax.evaluation.step_times import draft_seconds, verify_seconds

logger = logging.getLogger(__name__)


def main(argv=None) -> None:
    configure_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="transformers directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--draft", nargs="+", required=True, metavar="NAME=DIR",
                   help="drafts to compare; DIR may be random:<algorithm>")
    p.add_argument("--prompts", required=True, help="a {\"turns\": [...]} prompt file")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--kernels", default="xla", choices=["xla", "pallas"],
                   help="generate's attention (pallas: paged caches and the kernel; the ideal's step times stay XLA's)")
    p.add_argument("--schedulers", nargs="+", default=["none"], metavar="SPEC",
                   help="none | fixed:<g> | prefix:<sps.json> | async:<sps.json>, {batch} in a path for the batch size")
    p.add_argument("--out", default="speed.json")
    args = p.parse_args(argv)
    drafts = dict(spec.split("=", 1) for spec in args.draft if "=" in spec)
    if len(drafts) != len(args.draft):
        p.error("--draft takes NAME=DIR pairs")

    from dspark_jax.checkpoints.smollm2 import smollm2_gguf

    target = load_target(args.target or smollm2_gguf(), dtype=args.dtype)
    if target.tokenizer is None:
        sys.exit("the target has no tokenizer to render prompts with")
    labels = [_short(spec) for spec in args.schedulers]
    if len(set(labels)) != len(labels):
        p.error(f"--schedulers {' '.join(args.schedulers)}: two of them would share a row ({', '.join(labels)})")
    for spec in args.schedulers:  # a bad spec or a missing table stops the run before it measures anything
        for b in args.batch_sizes:
            scheduler_from_spec(spec.replace("{batch}", str(b)))
    prompts = chat_ids(target.tokenizer, load_prompts(args.prompts, args.num_prompts))
    loaded = {name: draft_from_spec(spec, target, args.dtype) for name, spec in drafts.items()}
    sampling = SamplingParams(args.temperature)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, kernels=args.kernels)
    report = {"device": jax.devices()[0].device_kind, "target": args.target or "SmolLM2-135M-Instruct",
              "prompts": args.prompts, "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "kernels": args.kernels, "batches": {}}
    for b in args.batch_sizes:
        logger.info(f"batch {b}: autoregressive")
        ar, ar_seconds = timed_generate(target, None, prompts, batch_size=b, **kwargs)
        ar_tokens = sum(map(len, ar.tokens))
        context = int(np.mean([len(x) for x in prompts]) + args.max_new_tokens // 2)
        widths = sorted(bucket(max(map(len, prompts[i : i + b]))) for i in range(0, len(prompts), b))
        width = widths[len(widths) // 2]  # padded prompt width of the median batch
        t_ar = verify_seconds(target, batch=b, tokens=1, context=context,
                              capacity=bucket(width + args.max_new_tokens))  # as generate_autoregressive
        entry = {"context": context, "autoregressive": {"tokens_per_s": ar_tokens / ar_seconds,
                                                        "step_ms": t_ar * 1e3}, "drafts": {}}
        for (name, draft), spec in itertools.product(loaded.items(), args.schedulers):
            label = name if spec == "none" else f"{name} {_short(spec)}"  # the spec's draft, say "dspark fixed:3"
            logger.info(f"batch {b}: {label}")
            scheduler = scheduler_from_spec(spec.replace("{batch}", str(b)), load_sts(drafts[name]))
            result, seconds = timed_generate(target, draft, prompts, batch_size=b, scheduler=scheduler, **kwargs)
            gamma = draft.config.block_size
            tau = acceptance_stats(result, gamma)["tau"]
            tokens_per_s = sum(map(len, result.tokens)) / seconds
            row = {"tokens_per_s": tokens_per_s, "speedup": tokens_per_s / entry["autoregressive"]["tokens_per_s"],
                   "tau": tau,
                   "verified_per_round": float(np.mean([v for row in result.verify_lengths for v in row] or [0]))}
            if spec == "none":
                capacity = bucket(width + args.max_new_tokens + 2 * gamma + 2)  # as generate's speculative loop
                t_draft = draft_seconds(draft, batch=b, context=context, capacity=capacity, sampling=sampling)
                t_verify = verify_seconds(target, batch=b, tokens=gamma + 1, context=context, capacity=capacity)
                row.update(draft_ms=t_draft * 1e3, verify_ms=t_verify * 1e3,
                           ideal_speedup=tau * t_ar / (t_draft + t_verify))
            entry["drafts"][label] = row
        report["batches"][str(b)] = entry
        with open(args.out, "w") as f:  # after each batch size, so a cut-short run keeps what it measured
            json.dump(report, f, indent=1)
    print_table(report)
    print(f"results: {args.out}")


def _short(spec: str) -> str:
    """A scheduler's label: fixed:3 stays, prefix:/path/sps.json becomes prefix."""
    kind = spec.partition(":")[0]
    return spec if kind in ("fixed", "threshold") else kind


def print_table(report) -> None:
    print(f"\n{report['target']} on {report['device']}, T={report['temperature']}, "
          f"{report['num_prompts']} prompts of {report['prompts']}, {report['max_new_tokens']} new tokens, "
          f"{report.get('kernels', 'xla')} attention")
    print(f"{'batch':>5} {'decoder':<16} {'tok/s':>9} {'speedup':>8} {'ideal':>6} {'tau':>6} {'draft ms':>9} "
          f"{'verify ms':>9} {'AR step ms':>10}")
    for b, entry in report["batches"].items():
        ar = entry["autoregressive"]
        print(f"{b:>5} {'AR':<16} {ar['tokens_per_s']:>9.1f} {1:>8.2f} {'':>6} {'':>6} {'':>9} {'':>9} "
              f"{ar['step_ms']:>10.3f}")
        for name, e in entry["drafts"].items():
            ideal, draft_ms, verify_ms = (f"{e['ideal_speedup']:.2f}", f"{e['draft_ms']:.3f}",
                                          f"{e['verify_ms']:.3f}") if "ideal_speedup" in e else ("", "", "")
            ideal, draft_ms, verify_ms = f"{ideal:>6}", f"{draft_ms:>9}", f"{verify_ms:>9}"
            print(f"{b:>5} {name:<16} {e['tokens_per_s']:>9.1f} {e['speedup']:>8.2f} {ideal} {e['tau']:>6.2f} "
                  f"{draft_ms} {verify_ms} {ar['step_ms']:>10.3f}")


if __name__ == "__main__":
    main()
