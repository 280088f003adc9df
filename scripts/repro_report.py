"""docs/results.md from the results folder of `scripts/repro_smollm2.py run`.

    python scripts/repro_smollm2.py report [--work runs/repro_smollm2] [--docs docs]

Copies the result files the page cites into <docs>/results/ (with the run machine's folders
written as $WORK and $GGUF, as in the commands) and draws two figures there:
per-position conditional acceptance per eval set, and the training curves. Every number on
the page is read from those files; the page names the command and device behind each table.
Results without the schedule or live stage give the page without that stage's table, saying so; a
live run cut short is tabled as far as it went.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import numpy as np

ALGORITHMS = ("dspark", "dflash", "eagle3")
NAMES = {"dspark": "DSpark", "dflash": "DFlash", "eagle3": "Eagle3"}
TEMPERATURES = ("1.0", "0.0")
ANALYSIS = "## Analysis"  # from this heading on, the page is written by hand and kept


def load(results: str, name: str):
    with open(os.path.join(results, name)) as f:
        return json.load(f)


def run_folders(configs: dict, speed: dict) -> dict[str, str]:
    """The run machines' folders, named as the commands name them: each drafter's work folder (two
    above its output_dir) as $WORK, its target file as $GGUF, and the prompt folder a speed run
    read ($DATA/eval/<set>.jsonl) as $DATA."""
    names = {os.path.dirname(os.path.dirname(sp["prompts"])): "$DATA" for sp in speed.values()
             if os.path.isabs(sp.get("prompts", ""))}
    for c in configs.values():
        if c.get("output_dir"):
            names[os.path.dirname(os.path.dirname(c["output_dir"]))] = "$WORK"
        if os.path.isabs(c.get("target", "")):
            names[c["target"]] = "$GGUF"
    return names


def copy_result(path: str, out_dir: str, names: dict[str, str]) -> None:
    """Copies a result file into out_dir, with the run machines' folders written as their names."""
    with open(path) as f:
        text = f.read()
    for real, name in sorted(names.items(), key=lambda item: -len(item[0])):  # a folder inside another first
        text = re.sub(r'(?<![\w.-])' + re.escape(real) + r'(?=[/"]|$)', lambda _: name, text)  # whole folders only
    with open(os.path.join(out_dir, os.path.basename(path)), "w") as f:
        f.write(text)


def training_curve(path: str) -> list[dict]:
    """metrics.jsonl rows by step; a resumed run logs the steps after its last checkpoint
    again, and the later row of a step wins."""
    with open(path) as f:
        rows = {row["step"]: row for row in map(json.loads, filter(str.strip, f))}
    return [rows[step] for step in sorted(rows)]


def tau_table(evals: dict) -> tuple[list[str], dict]:
    """Rows of the Table-1 analogue for one temperature, and the mean tau per drafter."""
    datasets = list(evals["dspark"]["datasets"])
    taus = {a: [evals[a]["datasets"][d]["speculative"]["tau"] for d in datasets] for a in ALGORITHMS}
    rows = []
    for i, d in enumerate(datasets):
        t = {a: taus[a][i] for a in ALGORITHMS}
        n = evals["dspark"]["datasets"][d]["prompts"]
        rows.append(f"| {d} | {n} | " + " | ".join(f"{t[a]:.3f}" for a in ALGORITHMS)
                    + f" | {t['dspark'] / t['dflash']:.3f} | {t['dspark'] / t['eagle3']:.3f} |")
    mean = {a: float(np.mean(taus[a])) for a in ALGORITHMS}
    rows.append("| **mean** | | " + " | ".join(f"**{mean[a]:.3f}**" for a in ALGORITHMS)
                + f" | **{mean['dspark'] / mean['dflash']:.3f}** | **{mean['dspark'] / mean['eagle3']:.3f}** |")
    return rows, mean


def acceptance_figure(evals: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(evals["dspark"]["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(2.8 * len(datasets), 2.8), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for a in ALGORITHMS:
            cond = evals[a]["datasets"][d]["speculative"]["conditional_acceptance"]
            ax.plot(range(1, len(cond) + 1), cond, "o-", ms=3, label=NAMES[a])
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("draft position", fontsize=8)
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel("P(accept | earlier accepted)", fontsize=8)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_figure(curves: dict, heldout: dict, path: str) -> None:
    """Expected tau per step: on the training batches (solid) and on the held-out
    conversations (dashed, with markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for a, rows in curves.items():
        line, = ax.plot([r["step"] for r in rows], [r["tau_probabilistic"] for r in rows],
                        label=f"{NAMES[a]}, training")
        ax.plot([r["step"] for r in heldout[a]], [r["tau_probabilistic"] for r in heldout[a]], "o--", ms=3,
                color=line.get_color(), label=f"{NAMES[a]}, held out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("expected tau")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_over_sets(rows) -> np.ndarray:
    """Per-position mean over eval sets, NaN where no set reached a position."""
    rows = np.asarray(rows, float)
    counts = np.sum(~np.isnan(rows), 0)
    return np.where(counts > 0, np.nansum(rows, 0) / np.maximum(counts, 1), np.nan)


def fmt(values, digits: int = 3) -> str:
    return " | ".join("n/a" if v is None or v != v else f"{v:.{digits}f}" for v in values)


def live_name(mode: str, gamma: int) -> str:
    """A bench_engine.py mode as the live table names it."""
    if mode == "fixed":
        mode = f"fixed:{gamma}"
    return {"ar": "AR", "sched": "prefix (Algorithm 1)", "async": "async"}.get(mode, mode.replace("fixed:", "fixed "))


def live_run(results: str) -> tuple[str | None, bool]:
    """The live stage's bench_engine.py file: live.json when the run finished, else the rows of a
    run cut short (live.json.tmp, which it rewrites after every level); (None, False) if neither."""
    for name, finished in (("live.json", True), ("live.json.tmp", False)):
        if os.path.exists(os.path.join(results, name)):
            return name, finished
    return None, False


def live_table(results: str, commands: dict, gamma: int) -> list[str]:
    """The scheduler live (the `live` stage's bench_engine.py run): each mode's tokens/s at each
    concurrency against AR's; per concurrency, the schedulers against the best fixed length
    measured; a row whose measured loop waited for a compilation says so (its tokens/s then
    holds the wait). A run of several repeats (bench_engine.py --repeats: the engines measured
    in turn) gives each mode's medians over them, and each ratio as the median of its ratios
    within a repeat. A run cut short is tabled as far as it went, saying so."""
    name, finished = live_run(results)
    if name is None:
        return ["", "## The scheduler live", "", "Not measured yet: the study's live stage has not run."]
    run = load(results, name)
    measured = {}  # (concurrency, mode) -> {repeat: row}
    for row in run["rows"]:
        measured.setdefault((row["concurrency"], row["mode"]), {})[row.get("repeat", 0)] = row
    repeats = max((len(reps) for reps in measured.values()), default=1)
    each = (f" It ran {repeats} repeats, the engines measured in turn in each (`--repeats`): each number is the "
            "median over the repeats, and each ratio the median of the ratios within a repeat." if repeats > 1 else "")
    lines = ["", "## The scheduler live", "",
             f"The serving engine under a closed loop of c requests at a time on mt-bench prompts ({run['max_tokens']} "
             f"tokens each, T = {run['temperature']}, {run['device']}): AR, DSpark verifying a fixed number of draft "
             "tokens in every round, and Algorithm 1 (prefix) and its asynchronous form with the draft's cost, which "
             f"also skip drafting where it does not pay, each against AR in the same run.{each} Command: "
             f"`{commands['live']}`.", ""]
    if not finished:
        lines += [f"The run was cut short after {len(run['rows'])} rows ({name}); the modes it did not reach are "
                  "missing below, and \"best fixed\" is the best of the fixed lengths it measured.", ""]
    kernels = sorted({row["kernels"] for row in run["rows"]})
    lines += [f"Attention: {' and '.join(kernels)}. The forecast scale is what the engine measured at the level's "
              "end: draft tokens accepted per token the confidences forecast, by which the drafting decision scales "
              "its forecast.", "",
              "| concurrency | decoder | tokens/s | vs AR | TPOT p50 ms | tokens/round | rounds undrafted | "
              "forecast scale | steps that waited for a compile |", "|---|---|---|---|---|---|---|---|---|"]
    summary = ["", "| concurrency | AR tokens/s | best fixed (tokens/s) | prefix / best fixed | async / best fixed | "
               "prefix / AR | async / AR |", "|---|---|---|---|---|---|---|"]
    median = lambda reps, key: float(np.median([row[key] for row in reps.values()]))

    def over(reps, base) -> float | None:  # the median of reps' tokens/s over base's, repeat by repeat
        ratios = [row["tokens_per_s"] / base[k]["tokens_per_s"] for k, row in reps.items() if k in base]
        return float(np.median(ratios)) if ratios else None

    for c in sorted({c for c, _ in measured}):
        modes = {mode: reps for (level, mode), reps in measured.items() if level == c}
        if "ar" not in modes:  # a run cut short before AR at this level
            continue
        ar = modes["ar"]
        for mode, reps in modes.items():
            undrafted = "" if mode == "ar" else f"{median(reps, 'undrafted'):.0%}"
            scale = f"{median(reps, 'forecast_scale'):.2f}" if mode in ("sched", "async") and all(
                "forecast_scale" in row for row in reps.values()) else ""
            vs_ar = over(reps, ar)
            lines.append(f"| {c} | {live_name(mode, gamma)} | {median(reps, 'tokens_per_s'):.1f} | "
                         f"{'-' if vs_ar is None else f'{vs_ar:.2f}'} | {median(reps, 'tpot_p50_ms'):.2f} | "
                         f"{median(reps, 'tokens_per_round'):.2f} | {undrafted} | {scale} | "
                         f"{sum(row['compile_stalls'] for row in reps.values())} |")
        fixed = {mode: median(reps, "tokens_per_s") for mode, reps in modes.items() if mode.startswith("fixed")}
        best = max(fixed, key=fixed.get) if fixed else None
        def ratio(mode, base) -> str:
            value = over(modes[mode], base) if mode in modes and base is not None else None
            return "-" if value is None else f"{value:.3f}"

        summary.append(f"| {c} | {median(ar, 'tokens_per_s'):.1f} | " +
                       (f"{live_name(best, gamma)} ({fixed[best]:.1f})" if best else "-") +
                       f" | {ratio('sched', modes.get(best))} | {ratio('async', modes.get(best))} | "
                       f"{ratio('sched', ar)} | {ratio('async', ar)} |")
    return lines + summary


def scheduler_tables(results: str, commands: dict, gamma: int, simulated: bool) -> list[str]:
    """The scheduler in simulation (the schedule stage) and live (the live stage), each table or a
    line saying its stage has not finished."""
    if not simulated:
        lines = ["", "## Scheduler in simulation", "", "Not measured yet: the study's schedule stage (the SPS tables "
                 "and the scheduler simulated on DSpark's trace) has not finished."]
        return lines + live_table(results, commands, gamma)
    simulation = load(results, "simulation.json")
    tables = sorted(glob.glob(os.path.join(results, "sps_r*.json")))
    sps_device = ", ".join(sorted({load(results, os.path.basename(t))["device"] for t in tables}))
    lines = ["", "## Scheduler in simulation", "",
             f"DSpark's T = 1.0 rounds ({simulation['rounds']} of them, every draft token verified) replayed against "
             f"SPS tables measured on the {sps_device} (`{commands['profile_sps']}`); tokens/s of the target-verify "
             "steps.", "",
             "| concurrency | no speculation | best fixed length | Algorithm 1 | async (2 steps old) | "
             "Algorithm 1 / best fixed |", "|---|---|---|---|---|---|"]
    for r in simulation["rows"]:
        lines.append(f"| {r['concurrency']} | {r['no_speculation']:.1f} | {r['best_fixed']:.1f} "
                     f"(L={r['best_fixed_length']}) | {r['prefix']:.1f} | {r['async']:.1f} | "
                     f"{r['prefix'] / r['best_fixed']:.3f} |")
    return lines + live_table(results, commands, gamma)


def write_report(results: str, docs: str) -> str:
    out_dir = os.path.join(docs, "results")
    os.makedirs(out_dir, exist_ok=True)
    commands = load(results, "commands.json")
    split = load(results, "split.json")
    evals = {t: {a: load(results, f"eval_{a}_T{t}.json") for a in ALGORITHMS} for t in TEMPERATURES}
    curves = {a: training_curve(os.path.join(results, f"train_{a}.jsonl")) for a in ALGORITHMS}
    heldout = {a: training_curve(os.path.join(results, f"heldout_{a}.jsonl")) for a in ALGORITHMS}
    configs = {a: load(results, f"train_{a}_config.json") for a in ALGORITHMS}
    sts = load(results, "sts_fit.json")
    # DSpark's speed is required; another drafter's exists when the run that trained it reached its speed stage
    # (a speed run needs the trained draft on its machine)
    speed = {a: load(results, f"speed_{a}.json") for a in ALGORITHMS
             if a == "dspark" or os.path.exists(os.path.join(results, f"speed_{a}.json"))}
    simulated = os.path.exists(os.path.join(results, "simulation.json"))  # the schedule stage ran
    for name in ["commands.json", "split.json", "sts_fit.json", *(["simulation.json"] if simulated else []),
                 *[f"speed_{a}.json" for a in speed],
                 *[f"eval_{a}_T{t}.json" for a in ALGORITHMS for t in TEMPERATURES],
                 *[f"{kind}_{a}.jsonl" for a in ALGORITHMS for kind in ("train", "heldout")],
                 *[f"train_{a}_config.json" for a in ALGORITHMS],
                 *[os.path.basename(p) for p in glob.glob(os.path.join(results, "sps_r*.json"))],
                 *[name for name in [live_run(results)[0]] if name]]:
        copy_result(os.path.join(results, name), out_dir, run_folders(configs, speed))
    if live_run(results)[1] and os.path.exists(os.path.join(out_dir, "live.json.tmp")):
        os.remove(os.path.join(out_dir, "live.json.tmp"))  # an earlier page's rows of a run now finished
    for png in glob.glob(os.path.join(results, "calibration", "*.png")):
        shutil.copy(png, out_dir)
    acceptance_figure(evals["1.0"], os.path.join(out_dir, "acceptance.png"))
    training_figure(curves, heldout, os.path.join(out_dir, "training.png"))
    devices = sorted({speed[a]["device"] for a in speed})
    gamma = evals["1.0"]["dspark"]["gamma"]
    c = configs["dspark"]
    steps = {a: curves[a][-1]["step"] for a in ALGORITHMS}
    if len(set(steps.values())) > 1:
        raise ValueError(f"the drafters were trained for different numbers of steps: {steps}")

    lines = [
        "# Results: DSpark vs DFlash vs Eagle3 drafters for SmolLM2-135M-Instruct",
        "",
        "Every number below comes from `python scripts/repro_smollm2.py run` (one drafter per run where a run "
        f"cannot hold all three; devices: {', '.join(devices)}, named with each speed run below), "
        "written into this page by `python scripts/repro_smollm2.py report`; the raw files are in "
        "[results/](results/). Commands are shown from the repository root, with $WORK, $DATA and $GGUF "
        "standing for the run's --work, --data and --target; results/commands.json lists them all.",
        "",
        "## Setup",
        "",
        f"- Training prompts: the {', '.join(split['sets'])} sets of $DATA/train, shuffled; "
        f"{split['heldout_prompts']} held out for STS, {split['train_prompts']} answered by SmolLM2 itself "
        "(`python -m dspark_jax regenerate`, T=0.7, top-p 0.8, top-k 20).",
        f"- One budget for the three drafters: {steps['dspark']} optimizer steps of {c['global_batch_size']} "
        f"sequences ({'' if c.get('max_steps') else str(c['num_epochs']) + ' epochs, '}max length "
        f"{c['max_length']}), AdamW {c['learning_rate']}, "
        f"{c['warmup_ratio']:.0%} warmup then cosine, {c['num_anchors']} anchors, block {c['block_size']}; "
        "5 draft layers for DSpark and DFlash, 1 for Eagle3 (TTT 7); the target runs inside the train step.",
        f"- Evaluation: the first user turn of n prompts per set (picked by the reference's seeded shuffle "
        f"when a set holds more), chat template, chain drafting, gamma {gamma}, every draft token verified.",
        "",
        "## Acceptance length tau (the paper's Table 1)",
        "",
        "tau counts the tokens committed per verify round, bonus token included.",
        "",
    ]
    for t in TEMPERATURES:
        rows, _ = tau_table(evals[t])
        lines += [f"T = {t} (`{commands[f'eval_dspark_T{t}']}`)", "",
                  "| dataset | n | DSpark | DFlash | Eagle3 | DSpark/DFlash | DSpark/Eagle3 |",
                  "|---|---|---|---|---|---|---|", *rows, ""]
    lines += ["## Per-position acceptance", "",
              "Conditional acceptance of draft position j given positions 1..j-1 were accepted, T = 1.0:", "",
              "![conditional acceptance](results/acceptance.png)", "",
              "| drafter | " + " | ".join(f"pos {j + 1}" for j in range(gamma)) + " |",
              "|---|" + "---|" * gamma]
    for a in ALGORITHMS:
        sets = evals["1.0"][a]["datasets"].values()
        cond = mean_over_sets([e["speculative"]["conditional_acceptance"] for e in sets])
        lines.append(f"| {NAMES[a]} (mean over sets) | {fmt(cond)} |")
    lines += ["", "Training curves: expected tau from the drafters' own probabilities, on the training batches and "
              f"on the conversations SmolLM2 wrote for the {split['heldout_prompts']} held-out prompts (never "
              "trained on; the same anchors at every evaluation):", "",
              "![training curves](results/training.png)", "",
              "| drafter | final loss | final expected tau | held-out loss | held-out expected tau | "
              + " | ".join(f"held-out accept@{j + 1}" for j in range(gamma)) + " |",
              "|---|---|---|---|---|" + "---|" * gamma]
    for a in ALGORITHMS:
        last, held = curves[a][-1], heldout[a][-1]
        lines.append(f"| {NAMES[a]} | {last['loss']:.4f} | {last['tau_probabilistic']:.3f} | {held['loss']:.4f} | "
                     f"{held['tau_probabilistic']:.3f} | {fmt([held.get(f'accept_rate@{j}') for j in range(gamma)])} |")

    held = sts["datasets"]["heldout"]
    lines += ["", "## Calibration of DSpark's confidence head, before and after STS", "",
              f"STS temperatures fitted on all held-out rounds and saved beside the draft: "
              f"{', '.join(f'{t:.2f}' for t in sts['saved_sts']['temperatures'])}.", "",
              f"Held-out split ({held['prompts']} prompts; fitted on even-numbered sequences, measured on the odd "
              f"ones; `{commands['sts']}`):", "",
              "| ECE per position | " + " | ".join(f"pos {j + 1}" for j in range(gamma)) + " |",
              "|---|" + "---|" * gamma,
              f"| before STS | {fmt(held['sts']['ece_before'])} |",
              f"| after STS | {fmt(held['sts']['ece_after'])} |", "",
              "Eval sets at T = 1.0 with the saved temperatures (prompts the fit never saw), mean over sets:", "",
              "| metric | " + " | ".join(f"pos {j + 1}" for j in range(gamma)) + " |",
              "|---|" + "---|" * gamma]
    cal = [e["calibration"] for e in evals["1.0"]["dspark"]["datasets"].values() if e["calibration"].get("rounds")]
    for key, label in [("ece", "ECE before"), ("ece_sts", "ECE after"), ("auroc", "AUROC before"),
                       ("auroc_sts", "AUROC after"), ("brier", "Brier before"), ("brier_sts", "Brier after")]:
        if cal and key in cal[0]:
            lines.append(f"| {label} | {fmt(mean_over_sets([x[key] for x in cal]))} |")
    lines += ["", "Reliability diagrams: " + ", ".join(
        f"[{os.path.basename(p)}](results/{os.path.basename(p)})"
        for p in sorted(glob.glob(os.path.join(results, "calibration", "*.png")))) + ".", ""]

    lines += ["## End-to-end speed", "",
              "One run of `scripts/bench_e2e.py` per drafter, each against autoregressive decoding measured in the "
              "same run (so each speedup is a ratio of one run); Ideal = tau x T_AR / (T_draft + T_verify) from step "
              "times measured at the same batch size and mean context."
              + "".join(f" {NAMES[a]} has no speed run: the run that trained it did not finish its speed stage, and a "
                        "speed run needs the trained draft on its machine." for a in ALGORITHMS if a not in speed),
              ""]
    for a in speed:
        sp = speed[a]
        lines.append(f"- {NAMES[a]}: `{commands[f'speed_{a}']}` ({sp['num_prompts']} mt-bench prompts, "
                     f"{sp['max_new_tokens']} new tokens, T = {sp['temperature']}, {sp['device']})")
    lines += ["", "| batch | decoder | tokens/s | AR tokens/s (same run) | speedup | ideal | tau | T_draft ms | "
              "T_verify ms | T_AR ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in speed["dspark"]["batches"]:
        for a in speed:
            ar, d = speed[a]["batches"][b]["autoregressive"], speed[a]["batches"][b]["drafts"][a]
            lines.append(f"| {b} | {NAMES[a]} | {d['tokens_per_s']:.1f} | {ar['tokens_per_s']:.1f} | "
                         f"{d['speedup']:.2f} | {d['ideal_speedup']:.2f} | {d['tau']:.2f} | {d['draft_ms']:.3f} | "
                         f"{d['verify_ms']:.3f} | {ar['step_ms']:.3f} |")

    lines += scheduler_tables(results, commands, gamma, simulated)
    path = os.path.join(docs, "results.md")
    analysis = ""  # the hand-written part of an earlier page survives a rewrite
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if ANALYSIS in old:
            analysis = old[old.index(ANALYSIS):]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n\n" + analysis)
    return path
