"""Evaluate a draft model with the reference protocol: acceptance, calibration, speed.

    python eval.py --draft DRAFT_DIR --data-dir PROMPT_DIR [--datasets gsm8k mt-bench] [--out results.json]

For each prompt set: speculative generation (chain drafting, T = 1.0 by default) over the
first user turns, reporting tau (tokens per round, bonus included), the mean number of
verified draft tokens, per-position prefix and conditional acceptance, and wall-clock
tokens/s against plain autoregressive decoding of the same prompts (compilation excluded).
With a confidence head and full verification it also reports per-position ECE, AUROC and
Brier score of the predicted survival, with `--fit-sts` fits Sequential Temperature Scaling
on half of each set and reports held-out ECE before and after, and with `--threshold-sweep`
reruns with static confidence thresholds (the paper's Figure 5). Results go to a JSON file
and a printed table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import jax

from dspark_jax.console import HelpFormatter, add_sampling_args, configure_logging, run_cli

from dspark_jax import load_target
from dspark_jax.evaluation import calibration
from dspark_jax.data.conversations import Counts, DataError
from dspark_jax.evaluation.evaluation import (acceptance_stats, chat_ids, draft_from_spec, json_ready, load_prompts,
                                              merge_results, skipped_lines, timed_generate)
from dspark_jax.decoding.scheduler import ThresholdScheduler, scheduler_from_spec
from dspark_jax.evaluation.simulate import trace_from_result

log = logging.getLogger(__name__)


def run(target, draft, prompts, args, scheduler=None, progress=None):
    """(merged GenerationResult, seconds), compilation excluded."""
    return timed_generate(target, draft, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, scheduler=scheduler,
                          progress=progress)


def _rate(amount, seconds):
    return amount / seconds if seconds else float("nan")


def read_prompt_sets(data_dir: str, datasets, limit) -> dict[str, list[str]]:
    """{name: prompts} of <data_dir>/<name>.jsonl for each dataset (default: every .jsonl file);
    skipped lines are reported with their file and line."""
    names = datasets or sorted(f[:-6] for f in os.listdir(data_dir) if f.endswith(".jsonl"))
    if not names:
        raise DataError(f"{data_dir}: no <dataset>.jsonl prompt files")
    texts = {}
    for name in names:
        counts = Counts()
        path = os.path.join(data_dir, f"{name}.jsonl")
        texts[name] = load_prompts(path, limit, counts)
        if counts.malformed:
            log.warning("%s: %s", path, skipped_lines(counts))
    return texts


def calibration_report(result, temperatures, directory, name):
    """Per-position ECE, AUROC and Brier of the raw confidences and, with STS temperatures,
    of the scaled ones too (keys suffixed _sts); reliability diagrams of both."""
    try:
        logits, label, mask = calibration.survival_records(*_records(result))
    except ValueError as e:  # e.g. every sequence finished in one round
        return {"rounds": 0, "note": str(e)}
    report = {"rounds": int(len(logits))}
    for suffix, temps in [("", None)] + ([("_sts", temperatures)] if temperatures else []):
        pred = calibration.predicted_survival(logits, temps)
        report.update({f"ece{suffix}": calibration.ece(pred, label, mask).tolist(),
                       f"auroc{suffix}": calibration.auroc(pred, label, mask).tolist(),
                       f"brier{suffix}": calibration.brier(pred, label, mask).tolist()})
        if directory:
            os.makedirs(directory, exist_ok=True)
            title = f"{name}, {'after STS' if suffix else 'raw confidence'}"
            path = os.path.join(directory, f"{name}{suffix}_reliability.png")
            calibration.reliability_diagram(pred, label, mask, path, title)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--target", help="transformers directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--draft", required=True, help="DeepSpec draft directory, or random:<dspark|dflash|eagle3>")
    p.add_argument("--data-dir", required=True, help="directory of <dataset>.jsonl prompt files")
    p.add_argument("--datasets", nargs="*", help="names of files in --data-dir (default: all)")
    p.add_argument("--limit", type=int, help="prompts per dataset (default: the reference caps)")
    add_sampling_args(p, max_new_tokens=2048, temperature=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--scheduler", default="none",
                   help="none | fixed:<g> | threshold:<t> | prefix:<sps.json> | async:<sps.json>")
    p.add_argument("--sts", default="auto", help="auto (sts.json beside the draft) | none | <sts.json directory>")
    p.add_argument("--fit-sts", action="store_true", help="fit STS on half of each set, report held-out ECE")
    p.add_argument("--save-sts", action="store_true", help="with --fit-sts: write the fit (all sets) beside the draft")
    p.add_argument("--threshold-sweep", type=float, nargs="*", default=[], help="static thresholds to rerun with")
    p.add_argument("--no-ar-baseline", action="store_true", help="skip the autoregressive speed baseline")
    p.add_argument("--calibration-dir", help="write reliability diagrams (PNG) here")
    p.add_argument("--save-trace", help="write the rounds of all sets as a trace (.npz) for `python -m dspark_jax simulate`")
    p.add_argument("--out", default="eval_results.json")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    configure_logging()

    from dspark_jax.checkpoints.smollm2 import smollm2_gguf

    texts = read_prompt_sets(args.data_dir, args.datasets, args.limit)  # bad prompt files stop before a model loads
    target = load_target(args.target or smollm2_gguf(), dtype=args.dtype)
    if target.tokenizer is None:
        raise ValueError("the target has no tokenizer to render prompts with")
    draft = draft_from_spec(args.draft, target, args.dtype)
    draft_dir = None if args.draft.startswith("random:") else args.draft
    temperatures = None
    if args.sts == "auto" and draft_dir:
        temperatures = calibration.load_sts(draft_dir)
    elif args.sts not in ("auto", "none"):
        temperatures = calibration.load_sts(args.sts)
    scheduler = scheduler_from_spec(args.scheduler, temperatures)
    gamma = draft.config.block_size
    report = {"device": jax.devices()[0].device_kind, "target": args.target or "SmolLM2-135M-Instruct",
              "draft": args.draft, "algorithm": draft.config.algorithm, "gamma": gamma,
              "temperature": args.temperature, "scheduler": args.scheduler,
              "sts_temperatures": list(temperatures) if temperatures else None, "datasets": {}}
    sts_records, all_results = [], []
    for name, text in texts.items():
        prompts = chat_ids(target.tokenizer, text)
        entry = {"prompts": len(prompts)}
        result, seconds = run(target, draft, prompts, args, scheduler, progress=f"{name} speculative")
        all_results.append(result)
        entry["speculative"] = {**acceptance_stats(result, gamma), "seconds": seconds}
        entry["speculative"]["tokens_per_s"] = _rate(entry["speculative"]["generated_tokens"], seconds)
        if not args.no_ar_baseline:
            ar, ar_seconds = run(target, None, prompts, args, progress=f"{name} autoregressive")
            ar_tokens = sum(len(t) for t in ar.tokens)
            entry["autoregressive"] = {"generated_tokens": ar_tokens, "seconds": ar_seconds,
                                       "tokens_per_s": _rate(ar_tokens, ar_seconds)}
            entry["speedup"] = _rate(entry["speculative"]["tokens_per_s"], entry["autoregressive"]["tokens_per_s"])
        if draft.config.confidence_head and scheduler is None:
            entry["calibration"] = calibration_report(result, temperatures, args.calibration_dir, name)
            if args.fit_sts:
                entry["sts"] = sts_split(result, gamma)
                sts_records.append(result)
        if args.threshold_sweep:
            entry["threshold_sweep"] = []
            for threshold in args.threshold_sweep:
                swept, _ = run(target, draft, prompts, args, ThresholdScheduler(threshold, temperatures),
                               progress=f"{name} threshold {threshold}")
                stats = acceptance_stats(swept, gamma)
                verified = sum(map(sum, swept.verify_lengths))
                entry["threshold_sweep"].append({"threshold": threshold, "tau": stats["tau"],
                                                 "mean_verified": stats["mean_verified"],
                                                 "acceptance_rate": sum(map(sum, swept.accepted_lengths)) / max(verified, 1)})
        report["datasets"][name] = entry
    if args.save_sts and sts_records and draft_dir:
        logits, label, mask = calibration.survival_records(*_records(merge_results(sts_records)))
        temps = calibration.fit_sts(logits, label, mask)
        report["saved_sts"] = {"path": calibration.save_sts(draft_dir, temps), "temperatures": temps.tolist()}
    if args.save_trace:
        trace_from_result(merge_results(all_results)).save(args.save_trace)
        report["trace"] = args.save_trace
    with open(args.out, "w") as f:
        json.dump(json_ready(report), f, indent=1, allow_nan=False)
    print_table(report)
    print(f"results: {args.out}")
    return 0


def _records(result):
    return result.confidence_logits, result.verify_lengths, result.accepted_lengths


def sts_split(result, gamma):
    """Fit STS on the even-indexed sequences, report ECE of the odd ones before and after."""
    fit = [x[0::2] for x in _records(result)]
    held = [x[1::2] for x in _records(result)]
    temps = calibration.fit_sts(*calibration.survival_records(*fit))
    logits, label, mask = calibration.survival_records(*held)
    return {"temperatures": temps.tolist(),
            "ece_before": calibration.ece(calibration.predicted_survival(logits), label, mask).tolist(),
            "ece_after": calibration.ece(calibration.predicted_survival(logits, temps), label, mask).tolist()}


def _fmt(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def print_table(report) -> None:
    gamma = report["gamma"]
    head = f"{'dataset':<12} {'n':>4} {'tau':>6} {'verified':>8} " + " ".join(f"{'acc@' + str(j + 1):>6}" for j in range(gamma))
    print(f"\n{report['algorithm']} draft, gamma {gamma}, T={report['temperature']}, scheduler {report['scheduler']}")
    print(head + f" {'tok/s':>8} {'AR tok/s':>8} {'speedup':>7}")
    for name, e in report["datasets"].items():
        s = e["speculative"]
        acc = " ".join(f"{a:>6.3f}" for a in s["accept_rate"])
        ar = e.get("autoregressive", {}).get("tokens_per_s", float("nan"))
        print(f"{name:<12} {e['prompts']:>4} {s['tau']:>6.3f} {s['mean_verified']:>8.2f} {acc} "
              f"{s['tokens_per_s']:>8.1f} {ar:>8.1f} {e.get('speedup', float('nan')):>7.3f}")
        cal = e.get("calibration", {})
        if "ece" in cal:
            for key, label in (("", "raw confidence"), ("_sts", "after STS")):
                if f"ece{key}" in cal:
                    row = "; ".join(f"{metric.upper()} " + " ".join(_fmt(x) for x in cal[f"{metric}{key}"])
                                    for metric in ("ece", "auroc", "brier"))
                    print(f"{'':<12} calibration per position, {label}: {row}")
        elif "note" in cal:
            print(f"{'':<12} calibration: {cal['note']}")
        if "sts" in e:
            before = " ".join(f"{x:.3f}" for x in e["sts"]["ece_before"])
            after = " ".join(f"{x:.3f}" for x in e["sts"]["ece_after"])
            print(f"{'':<12} held-out ECE per position before STS: {before}; after: {after}")


def cli(argv=None) -> int:
    """`python eval.py` / `dspark-eval`: main() under the one-line error convention."""
    return run_cli(main, argv)
