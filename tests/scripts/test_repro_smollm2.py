"""The SmolLM2 reproduction pipeline: the prompt split, and the report written from results."""

import json
import os
import signal
import sys
import threading
import time
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import repro_report  # noqa: E402
import repro_smollm2  # noqa: E402

GAMMA = 7


def test_split_holds_out_disjoint_prompts(tmp_path):
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    expected = set()
    for name in repro_smollm2.TRAIN_SETS:
        lines = [json.dumps({"turns": [f"{name} question {i}"]}) for i in range(5)]
        expected |= set(lines)
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n\n")  # a blank line is skipped
    args = SimpleNamespace(scale="smoke", work=str(tmp_path / "work"), data=str(tmp_path / "data"), target=None,
                           train_set=[], algorithms=repro_smollm2.ALGORITHMS)
    pipeline = repro_smollm2.Pipeline(args)
    pipeline.split()
    train = (tmp_path / "work" / "prompts" / "train.jsonl").read_text().splitlines()
    held = (tmp_path / "work" / "heldout" / "heldout.jsonl").read_text().splitlines()
    smoke = repro_smollm2.SCALES["smoke"]
    assert len(held) == smoke.heldout and len(train) == smoke.regen_limit
    assert not set(held) & set(train) and set(held) | set(train) <= expected
    assert json.loads((tmp_path / "work" / "results" / "split.json").read_text())["train_prompts"] == len(train)
    out = str(tmp_path / "work" / "results" / "x.json")
    shown = pipeline.shown(["eval.py", "--data-dir", str(data), "--out", out, f"dspark={tmp_path}/work/runs",
                            "--title", "a b"])
    assert shown == 'python eval.py --data-dir $DATA/train --out $WORK/results/x.json dspark=$WORK/runs --title "a b"'
    pipeline.command("probe", ["-c", "print('ran')"])
    assert (tmp_path / "work" / "logs" / "probe.log").read_text() == "ran\n"
    assert json.loads((tmp_path / "work" / "results" / "commands.json").read_text())["probe"] == \
        'python -c "print(\'ran\')"'
    with pytest.raises(SystemExit, match="fails failed"):
        pipeline.command("fails", ["-c", "raise SystemExit(3)"])
    pipeline.split()  # done: a rerun keeps the split
    assert (tmp_path / "work" / "prompts" / "train.jsonl").read_text().splitlines() == train


def _eval(tau: dict, cond: list, calibration=None, **extra) -> dict:
    datasets = {d: {"prompts": 4, "speculative": {"tau": t, "conditional_acceptance": cond},
                    **({"calibration": calibration} if calibration else {})} for d, t in tau.items()}
    return {"gamma": GAMMA, "datasets": datasets, **extra}


def _write_results(results):
    results.mkdir(parents=True)
    (results / "calibration").mkdir()
    (results / "calibration" / "gsm8k_reliability.png").write_bytes(b"png")
    w = lambda name, obj: (results / name).write_text(json.dumps(obj))
    commands = {f"eval_dspark_T{t}": f"eval {t}" for t in repro_report.TEMPERATURES}
    commands.update({"sts": "eval sts", "profile_sps": "profile",
                     **{f"speed_{a}": f"bench {a}" for a in repro_report.ALGORITHMS}})
    w("split.json", {"sets": ["gsm8k_train"], "train_prompts": 90, "heldout_prompts": 10})
    cal = {"rounds": 5, "ece": [0.2] * GAMMA, "ece_sts": [0.1] * GAMMA}
    taus = {"dspark": (3.0, 6.0), "dflash": (2.5, 4.0), "eagle3": (2.0, 3.0)}  # per dataset: gsm8k, mbpp
    for a, (t1, t2) in taus.items():
        for t in repro_report.TEMPERATURES:
            w(f"eval_{a}_T{t}.json", _eval({"gsm8k": t1, "mbpp": t2}, [0.5] * GAMMA, cal if a == "dspark" else None))
        (results / f"train_{a}.jsonl").write_text(
            "\n".join(json.dumps({"step": s, "loss": 1.0 / s, "tau_probabilistic": s / 10}) for s in (1, 2)))
        (results / f"heldout_{a}.jsonl").write_text("\n".join(
            json.dumps({"step": s, "sequences": 8, "loss": 2.0 / (s + 1), "tau_probabilistic": 1 + s / 20,
                        "accept_rate@0": 0.25 * s}) for s in (0, 2)))
        w(f"train_{a}_config.json", {"global_batch_size": 64, "num_epochs": 2, "max_length": 1024,
                                     "learning_rate": 6e-4, "warmup_ratio": 0.04, "num_anchors": 512, "block_size": 7})
    w("sts_fit.json", {"saved_sts": {"temperatures": [1.5] * GAMMA},
                       "datasets": {"heldout": {"prompts": 10, "sts": {"ece_before": [0.3] * GAMMA,
                                                                       "ece_after": [0.05] * GAMMA}}}})
    for a, (device, ar, drafted) in {"dspark": ("Test GPU", 100.0, 250.0), "dflash": ("Other GPU", 120.0, 180.0),
                                     "eagle3": ("Test GPU", 110.0, 165.0)}.items():  # one run per drafter
        w(f"speed_{a}.json", {"device": device, "num_prompts": 4, "max_new_tokens": 8, "temperature": 1.0, "batches": {
            "1": {"autoregressive": {"tokens_per_s": ar, "step_ms": 2.0},
                  "drafts": {a: {"tokens_per_s": drafted, "speedup": drafted / ar, "ideal_speedup": 3.0, "tau": 4.5,
                                 "draft_ms": 1.0, "verify_ms": 2.0}}}}})
    w("sps_r1.json", {"device": "SPS GPU", "sps": [1.0]})
    live = {1: {"ar": 80.0, "fixed:1": 130.0, "fixed:2": 160.0, "fixed": 150.0, "sched": 176.0, "async": 168.0},
            2: {"ar": 100.0, "fixed:1": 130.0, "fixed:2": 160.0, "fixed": 200.0, "sched": 176.0, "async": 168.0}}
    rows = [{"mode": mode, "concurrency": c, "tokens_per_s": t, "tpot_p50_ms": 1.5,
             "tokens_per_round": 1.0 if mode == "ar" else 2.5, "undrafted": 0.0 if mode == "ar" else 0.25,
             "compile_stalls": int(c == 2 and mode == "sched"), "kernels": "pallas", "forecast_scale": 0.5}
            for c, modes in live.items() for mode, t in modes.items()]
    w("live.json", {"device": "Test GPU", "max_tokens": 8, "temperature": 1.0, "rows": rows})  # as bench_engine writes
    commands["live"] = "bench live"
    w("simulation.json", {"rounds": 50, "rows": [{"concurrency": 1, "no_speculation": 10.0, "best_fixed": 30.0,
                                                   "best_fixed_length": 7, "prefix": 33.0, "async": 31.0}]})
    w("commands.json", commands)


def test_report_tables_hold_the_results(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    _write_results(results)
    page = open(repro_report.write_report(str(results), str(docs))).read()
    # DSpark/DFlash and DSpark/Eagle3 per set, and of the mean tau (4.5 / 3.25, 4.5 / 2.5)
    assert "| gsm8k | 4 | 3.000 | 2.500 | 2.000 | 1.200 | 1.500 |" in page
    assert "| mbpp | 4 | 6.000 | 4.000 | 3.000 | 1.500 | 2.000 |" in page
    assert "| **mean** | | **4.500** | **3.250** | **2.500** | **1.385** | **1.800** |" in page
    assert "| before STS | " + " | ".join(["0.300"] * GAMMA) + " |" in page
    assert "| after STS | " + " | ".join(["0.050"] * GAMMA) + " |" in page
    assert "| ECE after | " + " | ".join(["0.100"] * GAMMA) + " |" in page
    assert "| 1 | DSpark | 250.0 | 100.0 | 2.50 | 3.00 | 4.50 | 1.000 | 2.000 | 2.000 |" in page
    assert "| 1 | DFlash | 180.0 | 120.0 | 1.50 | 3.00 | 4.50 | 1.000 | 2.000 | 2.000 |" in page
    assert "devices: Other GPU, Test GPU" in page and "SPS tables measured on the SPS GPU" in page and "`bench eagle3` (4 mt-bench prompts" in page
    assert "| 1 | 10.0 | 30.0 (L=7) | 33.0 | 31.0 | 1.100 |" in page
    assert "| 1 | fixed 2 | 160.0 | 2.00 | 1.50 | 2.50 | 25% |  | 0 |" in page and "Command: `bench live`" in page
    assert "| 1 | prefix (Algorithm 1) | 176.0 | 2.20 | 1.50 | 2.50 | 25% | 0.50 | 0 |" in page  # with its scale
    assert "Attention: pallas." in page
    assert "| 1 | AR | 80.0 | 1.00 | 1.50 | 1.00 |  |  | 0 |" in page
    assert "| 1 | 80.0 | fixed 2 (160.0) | 1.100 | 1.050 | 2.200 | 2.100 |" in page
    assert f"| 2 | 100.0 | fixed {GAMMA} (200.0) | 0.880 | 0.840 | 1.760 | 1.680 |" in page  # the whole block
    assert "| 2 | prefix (Algorithm 1) | 176.0 | 1.76 | 1.50 | 2.50 | 25% | 0.50 | 1 |" in page
    assert "2 optimizer steps of 64 sequences" in page
    for name in ("acceptance.png", "training.png", "gsm8k_reliability.png", "speed_eagle3.json", "sps_r1.json",
                 "live.json"):
        assert (docs / "results" / name).exists()
    # a rewrite keeps the hand-written analysis
    with open(docs / "results.md", "a") as f:
        f.write("## Analysis\n\nDSpark wins because...\n")
    page = open(repro_report.write_report(str(results), str(docs))).read()
    assert page.count("## Analysis") == 1 and page.endswith("DSpark wins because...\n")


def test_report_names_a_missing_result(tmp_path):
    results = tmp_path / "results"
    _write_results(results)
    os.remove(results / "speed_dspark.json")
    with pytest.raises(FileNotFoundError, match="speed_dspark.json"):
        repro_report.write_report(str(results), str(tmp_path / "docs"))


def test_report_without_another_drafters_speed(tmp_path):
    """Only DSpark's speed run is required: a drafter without one is named as such and left out of the table."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    _write_results(results)
    os.remove(results / "speed_dflash.json")
    page = open(repro_report.write_report(str(results), str(docs))).read()
    assert "DFlash has no speed run" in page and "Eagle3 has no speed run" not in page
    assert "| 1 | DFlash |" not in page and "| 1 | Eagle3 |" in page and "`bench dflash`" not in page
    assert not (docs / "results" / "speed_dflash.json").exists()


def test_report_before_the_scheduler_stages(tmp_path):
    """Results without the schedule and live stages give the page without the scheduler's tables, saying so."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    _write_results(results)
    for name in ("simulation.json", "sps_r1.json", "live.json"):
        os.remove(results / name)
    page = open(repro_report.write_report(str(results), str(docs))).read()
    assert "Not measured yet: the study's schedule stage" in page and "Not measured yet: the study's live stage" in page
    assert "| 1 | 10.0 | 30.0 (L=7) |" not in page and "Command: `bench live`" not in page
    assert "| **mean** | | **4.500** | **3.250** | **2.500** | **1.385** | **1.800** |" in page
    assert not (docs / "results" / "simulation.json").exists()



def test_report_of_a_live_run_of_several_repeats_takes_medians_and_ratios_within_repeats(tmp_path):
    """With the engines measured in turn (bench_engine.py --repeats), each number is the median
    over the repeats and each ratio the median of the ratios within a repeat, not a ratio of
    medians: a drift between repeats that moves every engine alike cancels."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    _write_results(results)
    run = json.loads((results / "live.json").read_text())
    drift = {0: 1.0, 1: 2.0, 2: 1.5}  # the whole process twice as fast in the second repeat
    sched = {0: 1.3, 1: 1.05, 2: 1.0}  # the prefix scheduler over AR, repeat by repeat
    run["rows"] = [{**row, "repeat": rep, "tokens_per_s": row["tokens_per_s"] * drift[rep] * (
        sched[rep] * 80.0 / 176.0 if row["mode"] == "sched" else 1.0)}
        for rep in drift for row in run["rows"] if row["concurrency"] == 1]
    (results / "live.json").write_text(json.dumps(run))
    page = open(repro_report.write_report(str(results), str(docs))).read()
    assert "It ran 3 repeats, the engines measured in turn" in page
    assert "| 1 | AR | 120.0 | 1.00 | 1.50 | 1.00 |  |  | 0 |" in page  # median of 80, 160, 120
    # 104, 168 and 120 tokens/s: the median ratio is 1.05, where the ratio of the medians would be 1.00
    assert "| 1 | prefix (Algorithm 1) | 120.0 | 1.05 | 1.50 | 2.50 | 25% | 0.50 | 0 |" in page
    assert "| 1 | fixed 2 | 240.0 | 2.00 |" in page
    # prefix / best fixed (fixed 2) within each repeat: 104 / 160, 168 / 320, 120 / 240 (median 0.525, not 0.500)
    assert "| 1 | 120.0 | fixed 2 (240.0) | 0.525 | 1.050 | 1.050 | 2.100 |" in page


def test_report_of_a_live_run_cut_short(tmp_path):
    """A live run cut short (its rows in live.json.tmp) is tabled as far as it went, without the
    simulation; "best fixed" is the best fixed length it measured, and a missing scheduler is "-"."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    _write_results(results)
    os.remove(results / "simulation.json")
    run = json.loads((results / "live.json").read_text())
    os.remove(results / "live.json")
    run["rows"] = [r for r in run["rows"] if (r["concurrency"], r["mode"]) in
                   {(1, "ar"), (1, "sched"), (1, "async"), (1, "fixed"), (1, "fixed:2"), (2, "ar"), (2, "sched")}]
    (results / "live.json.tmp").write_text(json.dumps(run))
    page = open(repro_report.write_report(str(results), str(docs))).read()
    assert "Not measured yet: the study's schedule stage" in page and "cut short after 7 rows" in page
    assert "| 1 | 80.0 | fixed 2 (160.0) | 1.100 | 1.050 | 2.200 | 2.100 |" in page
    assert "| 2 | 100.0 | - | - | - | 1.760 | - |" in page
    assert (docs / "results" / "live.json.tmp").exists()
    (results / "live.json.tmp").rename(results / "live.json")  # the run finished: its page replaces the rows
    page = open(repro_report.write_report(str(results), str(docs))).read()
    assert "cut short" not in page and not (docs / "results" / "live.json.tmp").exists()

def test_report_copies_name_the_run_folders(tmp_path):
    """The copied results write the run machine's work folder, target and prompt folder as $WORK, $GGUF and
    $DATA."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    _write_results(results)
    config = json.loads((results / "train_dspark_config.json").read_text())
    config.update(output_dir="/remote/work/runs/dspark", target="/remote/smollm2.gguf")
    (results / "train_dspark_config.json").write_text(json.dumps(config))
    evaluation = json.loads((results / "eval_dspark_T1.0.json").read_text())
    evaluation.update(draft="/remote/work/runs/dspark/draft", target="/remote/smollm2.gguf")
    (results / "eval_dspark_T1.0.json").write_text(json.dumps(evaluation))
    speed = json.loads((results / "speed_dspark.json").read_text())
    (results / "speed_dspark.json").write_text(json.dumps({**speed, "prompts": "/remote/data/eval/mt-bench.jsonl",
                                                           "other": "/elsewhere/remote/data/eval"}))
    repro_report.write_report(str(results), str(docs))
    copied = json.loads((docs / "results" / "speed_dspark.json").read_text())
    assert copied["prompts"] == "$DATA/eval/mt-bench.jsonl"
    assert copied["other"] == "/elsewhere/remote/data/eval"  # another folder ending in the same names stays
    copied = json.loads((docs / "results" / "eval_dspark_T1.0.json").read_text())
    assert copied["draft"] == "$WORK/runs/dspark/draft" and copied["target"] == "$GGUF"
    assert copied["datasets"] == evaluation["datasets"]
    config = json.loads((docs / "results" / "train_dspark_config.json").read_text())
    assert config["output_dir"] == "$WORK/runs/dspark" and config["target"] == "$GGUF"


def test_report_training_rows_after_a_resume(tmp_path):
    results = tmp_path / "results"
    _write_results(results)
    with open(results / "train_dspark.jsonl", "a") as f:  # step 2 logged again after a resume
        f.write("\n" + json.dumps({"step": 2, "loss": 0.25, "tau_probabilistic": 0.9}))
    page = open(repro_report.write_report(str(results), str(tmp_path / "docs"))).read()
    assert "| DSpark | 0.2500 | 0.900 | 0.6667 | 1.100 | 0.500 | n/a" in page
    assert "| DFlash | 0.5000 | 0.200 | 0.6667 | 1.100 |" in page
    with open(results / "train_dflash.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": 3, "loss": 0.1, "tau_probabilistic": 0.3}))
    with pytest.raises(ValueError, match="different numbers of steps"):
        repro_report.write_report(str(results), str(tmp_path / "docs"))


def test_training_keeps_one_budget_and_clears_stale_results(tmp_path):
    """One drafter per run (as one GPU session each), then the rest: a drafter trains once, and
    training it removes its own later results (DSpark's: the STS fit and the simulation too)."""
    args = SimpleNamespace(scale="smoke", work=str(tmp_path / "work"), data=str(tmp_path), target=None, train_set=[],
                           algorithms=["dflash"])
    pipeline = repro_smollm2.Pipeline(args)
    ran = []

    def fake_train(name, argv, record=None):  # stands in for train.py: writes what a run leaves
        ran.append(name)
        out = next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir="))
        for file in ("metrics.jsonl", "heldout.jsonl", "train_config.json"):
            (tmp_path / "work" / "runs" / os.path.basename(out)).mkdir(exist_ok=True)
            open(os.path.join(out, file), "w").close()

    pipeline.command = fake_train
    results = tmp_path / "work" / "results"
    kept = ["eval_dspark_T1.0.json", "sts_fit.json", "speed_eagle3.json", "live.json.tmp"]  # a live run cut short
    for name in kept + ["eval_dflash_T1.0.json", "speed_dflash.json"]:
        (results / name).write_text("{}")
    pipeline.train()
    assert ran == ["train_dflash"]
    assert all((results / name).exists() for name in kept)
    assert not (results / "eval_dflash_T1.0.json").exists() and not (results / "speed_dflash.json").exists()
    pipeline.sts(), pipeline.schedule()  # DSpark's stages: nothing to do in a DFlash run
    assert ran == ["train_dflash"]
    pipeline = repro_smollm2.Pipeline(SimpleNamespace(**{**vars(args), "algorithms": repro_smollm2.ALGORITHMS}))
    pipeline.command = fake_train
    pipeline.train()
    assert ran == ["train_dflash", "train_dspark", "train_eagle3"]
    assert not any((results / name).exists() for name in kept)
    (results / "eval_dspark_T1.0.json").write_text("{}")
    pipeline.train()  # all done: nothing runs, nothing is removed
    assert ran == ["train_dflash", "train_dspark", "train_eagle3"] and (results / "eval_dspark_T1.0.json").exists()
    pipeline.args.train_set = ["num_epochs=4"]
    with pytest.raises(SystemExit, match="trained with other settings"):
        pipeline.train()


def test_a_drafter_from_a_seed_keeps_its_results_and_names_what_is_missing(tmp_path):
    """A seed brings a finished drafter's DONE and results but not its draft: nothing is rerun
    or removed, and a missing result stops the run with a message saying how to redo it."""
    args = SimpleNamespace(scale="smoke", work=str(tmp_path / "work"), data=str(tmp_path), target=None, train_set=[],
                           algorithms=["dspark"])
    pipeline = repro_smollm2.Pipeline(args)
    ran = []

    def fake(name, argv, record=None):  # train.py's outputs, without the draft (it stayed on the other machine)
        ran.append(name)
        for file in ("metrics.jsonl", "heldout.jsonl", "train_config.json"):
            open(tmp_path / "work" / "runs" / "dspark" / file, "w").close()

    (tmp_path / "work" / "runs" / "dspark").mkdir(parents=True)
    pipeline.command = fake
    pipeline.train()
    assert ran == ["train_dspark"] and not os.path.isdir(pipeline.draft_dir("dspark"))
    results = tmp_path / "work" / "results"
    (results / "sts_fit.json").write_text("{}")
    pipeline.train(), pipeline.sts()
    assert ran == ["train_dspark"] and (results / "sts_fit.json").exists()
    with pytest.raises(SystemExit, match="eval_dspark_T1.0: .* was trained on another machine.*runs/dspark/DONE"):
        pipeline.evaluate()
    for t in ("1.0", "0.0"):
        (results / f"eval_dspark_T{t}.json").write_text("{}")
    pipeline.evaluate()
    assert ran == ["train_dspark"]


def test_stages_run_only_the_ones_named_in_the_pipelines_order(tmp_path, capsys):
    args = SimpleNamespace(scale="smoke", work=str(tmp_path / "work"), data=str(tmp_path), target=None, train_set=[],
                           algorithms=["dspark"], stages=["sts", "train"])
    pipeline = repro_smollm2.Pipeline(args)
    ran = []
    for name in repro_smollm2.STAGES:
        setattr(pipeline, name, lambda name=name: ran.append(name))
    pipeline.run()
    assert ran == ["train", "sts"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("stages sts train done")


def test_a_signal_to_the_pipeline_reaches_its_command_once(tmp_path):
    """Two SIGTERMs to the pipeline's process reach the running command as one (it runs in a
    session of its own, so a signal to the whole process group does not reach it directly), and
    the pipeline stops even though the command then exits cleanly."""
    args = SimpleNamespace(scale="smoke", work=str(tmp_path / "work"), data=str(tmp_path), target=None, train_set=[],
                           algorithms=["dspark"])
    pipeline = repro_smollm2.Pipeline(args)
    ready = tmp_path / "ready"
    child = ("import os, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: print('caught', flush=True))\n"
             "assert os.getsid(0) == os.getpid()\n"
             f"open({str(ready)!r}, 'w').close()\n"
             "time.sleep(2)")

    def signal_when_ready():
        while not ready.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=signal_when_ready, daemon=True).start()
    with pytest.raises(SystemExit, match=r"probe stopped by SIGTERM \(exit 0\)"):
        pipeline.command("probe", ["-c", child])
    assert (tmp_path / "work" / "logs" / "probe.log").read_text() == "caught\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_live_runs_the_engine_with_every_fixed_length_and_both_schedulers(tmp_path):
    args = SimpleNamespace(scale="smoke", work=str(tmp_path / "work"), data=str(tmp_path), target=None, train_set=[],
                           algorithms=["dspark"])
    pipeline = repro_smollm2.Pipeline(args)
    os.makedirs(pipeline.draft_dir("dspark"))
    (tmp_path / "work" / "results" / "train_dspark_config.json").write_text('{"block_size": 3}')
    ran = {}

    def fake(name, argv, record=None):
        ran[name] = argv
        open(argv[argv.index("--out") + 1], "w").close()

    pipeline.command = fake
    pipeline.live()
    [(name, argv)] = ran.items()
    assert name == "live" and argv[0] == "scripts/bench_engine.py"
    assert argv[argv.index("--modes") + 1: argv.index("--max-tokens")] == ["ar", "sched", "async", "fixed", "fixed:2",
                                                                           "fixed:1"]  # fixed verifies all 3
    assert argv[argv.index("--concurrency") + 1: argv.index("--modes")] == ["1", "2"]
    assert argv[argv.index("--kernels") + 1] == "xla"  # the full scale's "pallas" would run interpreted here
    assert argv[argv.index("--repeats") + 1] == "2"  # the engines measured in turn, twice
    assert argv[argv.index("--kv-memory") + 1] == "1000000000.0"  # bytes: a CPU reports no free memory
    assert argv[argv.index("--temperature") + 1] == "1.0" and argv[argv.index("--draft") + 1] == pipeline.draft_dir(
        "dspark")
    pipeline.live()  # done: not run again
    assert len(ran) == 1
