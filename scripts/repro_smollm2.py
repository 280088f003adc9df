"""The paper's drafter comparison, reproduced on SmolLM2-135M-Instruct from data to report.

    python scripts/repro_smollm2.py run --data ../shared/data       # every stage (a GPU run)
    python scripts/repro_smollm2.py report                           # docs/results.md from the results

`run` goes through the stages below in order. Each skips what is already done (regenerated
chunks, a finished training, an evaluation file) and training resumes from its last
checkpoint, so rerunning the same command after an interruption continues where it stopped.
Everything lands under --work (default runs/repro_smollm2): results/ holds every number the
report uses, logs/ the output of every command, results/commands.json the commands.

  split       pool the training prompt sets of --data/train (gsm8k_train, lbpp, swe-bench,
              aime24) without the longest prompts, shuffle, hold some out for STS
  regenerate  SmolLM2 answers the training prompts (T=0.7, top-p 0.8, top-k 20), so the
              drafts learn the distribution they will be verified against, and the held-out
              prompts, for the held-out curves of training
  train       DSpark, DFlash and Eagle3 from configs/*_smollm2.py, one budget for all three:
              the same conversations, epochs, batch, sequence length and LR schedule; each
              measures its expected tau on the held-out conversations as it trains
  sts         DSpark over the held-out prompts with every draft token verified; STS fitted on
              those rounds and saved beside the draft (eval.py --fit-sts --save-sts)
  evaluate    eval.py over every prompt set of --data/eval at T=1 and T=0 for each drafter
              (the AR baseline runs with DSpark); DSpark at T=1 also writes reliability
              diagrams and the trace for the scheduler simulation
  speed       scripts/bench_e2e.py: AR against each drafter at batch 1 and 32 (one run per
              drafter, each with its own AR baseline)
  schedule    SPS tables of this device for SmolLM2 at concurrency 1, 4, 16, 64 and 256 (with
              DSpark's seconds per pass), and the scheduler simulated on DSpark's trace against each
  live        the scheduler live in the serving engine (scripts/bench_engine.py) at concurrency 1,
              4, 16 and 64: DSpark verifying a fixed 1..G tokens, and the prefix and async
              schedulers (which also skip drafting where it does not pay), against AR in the
              same run, every mode on the Pallas kernels, the engines measured in turn 3 times

`--stages train sts` (say) runs some stages only. `--algorithms` limits the stages to some
drafters (DSpark's STS and scheduler stages run with DSpark), so that the study can run one
drafter per GPU session: the results/ of earlier sessions, with runs/*/DONE, let a later `run`
skip what they hold. `report` needs all three.
`--scale smoke` runs every stage on a few prompts and steps (a CPU check of the pipeline).
scripts/remote_repro_smollm2.sh runs the study on a remote GPU machine that takes at most
64 MiB per job (the GGUF travels in two halves).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

from dspark_jax.console import HelpFormatter, run_cli

ALGORITHMS = ("dspark", "dflash", "eagle3")
STAGES = ("split", "regenerate", "train", "sts", "evaluate", "speed", "schedule", "live")  # Pipeline methods, in order
TRAIN_SETS = ("gsm8k_train", "lbpp", "swe-bench", "aime24")
# Prompt records longer than this (about 1,000 tokens) are left out: SmolLM2's context is 8,192
# tokens, and a few swe-bench issues come close to it.
MAX_PROMPT_CHARS = 4000
# Results of the stages after training a drafter (globs under results/): its evaluations and speed, and for
# DSpark the STS fit, the calibration, the trace and the scheduler simulation too.
STALE_AFTER_TRAINING = ("eval_{algorithm}_T*.json", "speed_{algorithm}.json")
STALE_AFTER_DSPARK = ("sts_fit.json", "simulation.json", "trace_dspark.npz", "calibration", "live.json*",
                      "sps_r*.json")  # the SPS tables hold the draft's seconds per pass
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Scale:
    heldout: int  # training prompts kept out of training, for STS
    regen_limit: int  # training prompts answered (0 = all)
    regen_new_tokens: int
    regen_batch: int
    train: tuple[str, ...]  # recipe overrides shared by the three drafters
    datasets: tuple[str, ...]  # eval sets (empty = every file in --data/eval)
    eval_limit: int  # prompts per eval set
    eval_new_tokens: int
    eval_batch: int
    speed_prompts: int
    speed_batches: tuple[int, ...]
    speed_new_tokens: int
    concurrency: tuple[int, ...]
    live_batches: tuple[int, ...]  # concurrency levels of the serving engine
    live_new_tokens: int  # tokens per request there
    live_kernels: str  # the engine's kernels there, the same for every mode
    live_repeats: int  # measurements of each mode at each level, the engines measured in turn
    live_kv_memory: float  # the engines' KV budget there: a fraction of free device memory, or bytes (a CPU's)
    sps_context: int
    dtype: str


SCALES = {
    # About 7,700 training conversations of up to 512 answer tokens; 8 epochs = 960 steps of 64 (2 epochs, the
    # first run's budget, left every drafter still rising), in micro-batches of 32. Drafts are
    # exported without SmolLM2's embedding and LM head (about 90 MB each instead of 200): every stage loads them
    # with the target.
    # Anchors scale with the sequence length as in the reference (512 per 4096 tokens).
    "full": Scale(heldout=256, regen_limit=0, regen_new_tokens=512, regen_batch=64,
                  train=("max_length=1024", "num_anchors=128", "num_epochs=8", "micro_batch_size=32",
                         "save_every=240", "eval_every=60", "export_frozen=false"),
                  datasets=(),
                  eval_limit=128, eval_new_tokens=512, eval_batch=64, speed_prompts=32, speed_batches=(1, 32),
                  speed_new_tokens=256,
                  concurrency=(1, 4, 16, 64, 256), live_batches=(1, 4, 16, 64), live_new_tokens=128,
                  live_kernels="pallas", live_repeats=3, live_kv_memory=0.5, sps_context=1024, dtype="bfloat16"),
    "smoke": Scale(heldout=4, regen_limit=12, regen_new_tokens=24, regen_batch=4,
                   train=("max_length=192", "num_anchors=16", "global_batch_size=4", "micro_batch_size=2",
                          "max_steps=2", "save_every=1", "log_every=1", "min_loss_tokens=4", "eval_every=1",
                          "export_frozen=false"),
                   datasets=("gsm8k", "mt-bench"), eval_limit=2, eval_new_tokens=16, eval_batch=2, speed_prompts=2,
                   speed_batches=(1, 2), speed_new_tokens=8, concurrency=(1, 2), live_batches=(1, 2),
                   live_new_tokens=8, live_kernels="xla", live_repeats=2, live_kv_memory=1e9, sps_context=64,
                   dtype="float32"),
}


def _lines(path: str) -> int:
    with open(path, "rb") as f:
        return f.read().count(b"\n")


class Pipeline:
    def __init__(self, args):
        self.args, self.scale = args, SCALES[args.scale]
        # Absolute, since every command runs from the repository root.
        self.work, self.data = os.path.abspath(args.work), os.path.abspath(args.data)
        self.algorithms = [a for a in ALGORITHMS if a in args.algorithms]
        self.target = os.path.abspath(args.target) if args.target else None
        self.results = os.path.join(self.work, "results")
        for sub in ("results", "logs", "prompts", "heldout", "runs"):
            os.makedirs(os.path.join(self.work, sub), exist_ok=True)
        self.commands_path = os.path.join(self.results, "commands.json")
        self.commands = {}
        if os.path.exists(self.commands_path):
            with open(self.commands_path) as f:
                self.commands = json.load(f)

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def draft_dir(self, algorithm: str) -> str:
        return self.path("runs", algorithm, "draft")

    def target_args(self) -> list[str]:
        return ["--target", self.target] if self.target else []

    def shown(self, argv: list[str]) -> str:
        """A command as the report prints it: `python`, and $WORK, $DATA and $GGUF for --work,
        --data and --target."""
        folders = {self.work: "$WORK", self.data: "$DATA", **({self.target: "$GGUF"} if self.target else {})}

        def token(arg: str) -> str:
            for real, name in folders.items():  # also inside key=value arguments
                arg = re.sub(re.escape(real) + r"(?=/|$)", lambda _: name, arg)
            return arg if re.fullmatch(r"[\w@%+=:,./${}-]+", arg) else '"' + arg.replace('"', '\\"') + '"'

        return " ".join(["python", *map(token, argv)])

    def command(self, name: str, argv: list[str], record: list[str] | None = None) -> None:
        """Runs argv (python prepended) from the repository root, output to logs/<name>.log;
        a failure stops the pipeline with the log's tail. `record` (default argv) is the command
        results/commands.json keeps for the report. A SIGTERM, SIGINT or SIGHUP stops the pipeline
        after the command, which gets one SIGTERM or SIGINT for them all: it runs in a session of
        its own, out of reach of signals to the pipeline's process group, and train.py can
        checkpoint before it stops, so the next `run` resumes."""
        self.commands[name] = self.shown(argv if record is None else record)
        with open(self.commands_path + ".tmp", "w") as f:
            json.dump(self.commands, f, indent=1)
        os.replace(self.commands_path + ".tmp", self.commands_path)
        argv = [sys.executable, *argv]
        log_path = self.path("logs", f"{name}.log")
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(argv)}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": self.path("jax_cache")}  # shared by the stages
        stop = {"signal": 0, "child": None, "sent": False}

        def forward():
            if stop["signal"] and stop["child"] is not None and not stop["sent"]:
                stop["sent"] = True
                stop["child"].send_signal(signal.SIGINT if stop["signal"] == signal.SIGINT else signal.SIGTERM)

        def caught(signum, frame):
            stop["signal"] = stop["signal"] or signum
            forward()

        previous = {s: signal.signal(s, caught) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            with open(log_path, "a") as log:
                stop["child"] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
                forward()  # a signal that came before the command existed
                code = stop["child"].wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if stop["signal"]:
            sys.exit(f"{name} stopped by {signal.Signals(stop['signal']).name} (exit {code}); `run` again to go on")
        if code:
            with open(log_path) as f:
                tail = f.read()[-3000:]
            sys.exit(f"{name} failed (exit {code}); the end of {log_path}:\n{tail}")
        print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {time.perf_counter() - start:.0f} s", flush=True)

    # Stages ---------------------------------------------------------------------------------

    def split(self) -> None:
        train, heldout = self.path("prompts", "train.jsonl"), self.path("heldout", "heldout.jsonl")
        if os.path.exists(train):
            return
        records, too_long = [], 0
        for name in TRAIN_SETS:
            with open(os.path.join(self.data, "train", f"{name}.jsonl")) as f:
                for line in filter(str.strip, f):
                    if len(line) > MAX_PROMPT_CHARS:
                        too_long += 1
                    else:
                        records.append(line)
        random.Random(0).shuffle(records)
        held, rest = records[: self.scale.heldout], records[self.scale.heldout :]
        if self.scale.regen_limit:
            rest = rest[: self.scale.regen_limit]
        with open(heldout, "w") as f:
            f.writelines(held)
        with open(train + ".tmp", "w") as f:
            f.writelines(rest)
        os.replace(train + ".tmp", train)
        with open(os.path.join(self.results, "split.json"), "w") as f:
            json.dump({"sets": TRAIN_SETS, "train_prompts": len(rest), "heldout_prompts": len(held),
                       "dropped_too_long": too_long}, f, indent=1)

    def regenerate(self) -> None:
        """SmolLM2's answers to the training prompts, then to the held-out prompts (an
        unfinished file is continued by the command)."""
        s = self.scale
        for name, prompts, out in (
                ("regenerate", self.path("prompts", "train.jsonl"), self.path("train_smollm2.jsonl")),
                ("regenerate_heldout", self.path("heldout", "heldout.jsonl"), self.path("heldout_smollm2.jsonl"))):
            if os.path.exists(out) and _lines(out) == _lines(prompts):
                continue
            self.command(name, ["-m", "dspark_jax", "regenerate", "--model", self.target or "smollm2",
                                "--input", prompts, "--output", out, "--max-new-tokens", str(s.regen_new_tokens),
                                "--batch-size", str(s.regen_batch), "--dtype", s.dtype])

    def train(self) -> None:
        """Trains each drafter not yet done (DONE records its overrides: a finished drafter
        trained with other ones is an error, not a silent mix of budgets). Training anything
        makes the later stages' results stale, so they are removed."""
        for algorithm in self.algorithms:
            out = self.path("runs", algorithm)
            overrides = [f"target={self.target or 'smollm2'}", f"train_files={self.path('train_smollm2.jsonl')}",
                         f"eval_files={self.path('heldout_smollm2.jsonl')}", f"output_dir={out}",
                         f"dtype={self.scale.dtype}", f"target_dtype={self.scale.dtype}",
                         *self.scale.train, *self.args.train_set]
            done = os.path.join(out, "DONE")
            if os.path.exists(done):
                with open(done) as f:
                    if json.load(f) != overrides:
                        sys.exit(f"{out} was trained with other settings than {overrides}; remove {self.work}/runs "
                                 "to retrain all three drafters on one budget")
                continue
            self.command(f"train_{algorithm}", ["train.py", "--config", f"configs/{algorithm}_smollm2.py", "--set",
                                                *overrides])
            shutil.copy(os.path.join(out, "metrics.jsonl"), os.path.join(self.results, f"train_{algorithm}.jsonl"))
            shutil.copy(os.path.join(out, "heldout.jsonl"), os.path.join(self.results, f"heldout_{algorithm}.jsonl"))
            shutil.copy(os.path.join(out, "train_config.json"),
                        os.path.join(self.results, f"train_{algorithm}_config.json"))
            with open(done, "w") as f:
                json.dump(overrides, f)
            stale = [n.format(algorithm=algorithm) for n in STALE_AFTER_TRAINING]
            for name in stale + list(STALE_AFTER_DSPARK if algorithm == "dspark" else ()):
                for path in glob.glob(os.path.join(self.results, name)):
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def once(self, name: str, out: str, argv: list[str], draft: str | None = None) -> None:
        """Runs a command that writes `out` (it is given out + ".tmp", renamed when the command
        succeeds), unless `out` exists. `draft`: the drafter whose draft the command reads; a
        drafter trained on another machine (its DONE came with a seed) needs its draft brought
        here (remote_repro_smollm2.sh send-draft / receive-draft) or training again."""
        if os.path.exists(out):
            return
        if draft and not os.path.isdir(self.draft_dir(draft)):
            sys.exit(f"{name}: {self.draft_dir(draft)} is missing ({draft} was trained on another machine and its "
                     f"results there were not finished); bring its draft here (remote_repro_smollm2.sh "
                     f"receive-draft) or remove {self.path('runs', draft, 'DONE')} to train it here")
        self.command(name, [out + ".tmp" if a == out else a for a in argv], record=argv)
        os.replace(out + ".tmp", out)

    def eval_args(self, algorithm: str, data_dir: str, limit: int, out: str, *extra: str) -> list[str]:
        s = self.scale
        return ["eval.py", *self.target_args(), "--draft", self.draft_dir(algorithm), "--data-dir", data_dir,
                "--limit", str(limit), "--max-new-tokens", str(s.eval_new_tokens), "--batch-size",
                str(s.eval_batch), "--dtype", s.dtype, "--out", out, *extra]

    def sts(self) -> None:
        if "dspark" not in self.algorithms:
            return
        out, draft = os.path.join(self.results, "sts_fit.json"), self.draft_dir("dspark")
        if os.path.isdir(draft) and not os.path.exists(os.path.join(draft, "sts.json")) and os.path.exists(out):
            os.remove(out)  # the fit belongs beside the draft
        self.once("sts", out, self.eval_args("dspark", self.path("heldout"), self.scale.heldout, out, "--sts", "none",
                                             "--fit-sts", "--save-sts", "--no-ar-baseline"), draft="dspark")

    def evaluate(self) -> None:
        datasets = ["--datasets", *self.scale.datasets] if self.scale.datasets else []
        for temperature in ("1.0", "0.0"):
            for algorithm in self.algorithms:
                name = f"eval_{algorithm}_T{temperature}"
                extra = ["--temperature", temperature, *datasets]
                if algorithm != "dspark":
                    extra.append("--no-ar-baseline")
                elif temperature == "1.0":
                    extra += ["--calibration-dir", os.path.join(self.results, "calibration"),
                              "--save-trace", os.path.join(self.results, "trace_dspark.npz")]
                out = os.path.join(self.results, f"{name}.json")
                data_dir = os.path.join(self.data, "eval")
                self.once(name, out, self.eval_args(algorithm, data_dir, self.scale.eval_limit, out, *extra),
                          draft=algorithm)

    def speed(self) -> None:
        s = self.scale
        for algorithm in self.algorithms:  # each against its own AR baseline, measured in the same run
            out = os.path.join(self.results, f"speed_{algorithm}.json")
            self.once(f"speed_{algorithm}", out, [
                "scripts/bench_e2e.py", *self.target_args(), "--draft", f"{algorithm}={self.draft_dir(algorithm)}",
                "--prompts", os.path.join(self.data, "eval", "mt-bench.jsonl"), "--num-prompts", str(s.speed_prompts),
                "--batch-sizes", *map(str, s.speed_batches), "--max-new-tokens", str(s.speed_new_tokens),
                "--dtype", s.dtype, "--out", out], draft=algorithm)

    def schedule(self) -> None:
        out = os.path.join(self.results, "simulation.json")
        if "dspark" not in self.algorithms or os.path.exists(out):
            return
        s = self.scale
        pattern = os.path.join(self.results, "sps_r{concurrency}.json")
        missing = [r for r in s.concurrency if not os.path.exists(pattern.format(concurrency=r))]
        model = ["--model", self.target] if self.target else []

        def profile(concurrency) -> list[str]:
            return ["-m", "dspark_jax", "profile-sps", *model, "--draft", self.draft_dir("dspark"), "--concurrency",
                    *map(str, concurrency), "--context", str(s.sps_context), "--gamma", "7", "--dtype", s.dtype,
                    "--out", pattern]

        if missing:  # the report cites the command for every table
            self.command("profile_sps", profile(missing), record=profile(s.concurrency))
        from dspark_jax.evaluation.simulate import Trace, simulate
        from dspark_jax.evaluation.sps import load_table

        trace = Trace.load(os.path.join(self.results, "trace_dspark.npz"))
        with open(os.path.join(self.results, "sts_fit.json")) as f:  # the STS saved beside the draft
            temperatures = tuple(json.load(f)["saved_sts"]["temperatures"])
        rows = [simulate(trace, load_table(pattern.format(concurrency=r))["sps"], r, temperatures)
                for r in s.concurrency]
        with open(out, "w") as f:
            json.dump({"rounds": len(trace.accepted), "sts_temperatures": temperatures, "rows": rows}, f, indent=1)

    def live(self) -> None:
        """The serving engine (scripts/bench_engine.py) at each concurrency of the scale's live
        batches, on mt-bench prompts at T = 1: AR, DSpark verifying a fixed 1..G tokens, and the
        prefix and async schedulers with the draft's cost (over an SPS table the run profiles for
        its concurrencies), which skip drafting on the host where it does not pay. A run cut short
        goes on from the levels it finished (bench_engine.py --resume); the modes run in the order
        AR, the two schedulers, then the fixed lengths longest first, so that one cut short for good
        still compares the schedulers with AR and with full-block verification. Every mode runs
        the scale's kernels (the Pallas ones on the GPU), so that AR and the drafted modes attend
        with the same kernel on any backend (`kernels="auto"` takes them on one GPU only) and a row's
        block table is a whole context wide whatever its length (fewer programs to compile). The
        engines stay alive and each level measures them in turn, the scale's `live_repeats` times
        (bench_engine.py --repeats): measured one after the other, two engines' tokens/s differed
        by more than the gap between them (docs/benchmarks.md, "eleventh measurement")."""
        if "dspark" not in self.algorithms:
            return
        s = self.scale
        with open(os.path.join(self.results, "train_dspark_config.json")) as f:
            gamma = json.load(f)["block_size"]
        out = os.path.join(self.results, "live.json")
        self.once("live", out, [
            "scripts/bench_engine.py", "--target", self.target or "smollm2", "--draft", self.draft_dir("dspark"),
            "--prompts", os.path.join(self.data, "eval", "mt-bench.jsonl"), "--concurrency",
            *map(str, s.live_batches), "--modes", "ar", "sched", "async", "fixed",
            *[f"fixed:{g}" for g in range(gamma - 1, 0, -1)], "--max-tokens", str(s.live_new_tokens), "--temperature", "1.0", "--scheduler-steps", "4",
            "--static-batch", "0", "--kernels", s.live_kernels, "--dtype", s.dtype, "--repeats", str(s.live_repeats),
            "--kv-memory", str(s.live_kv_memory), "--out", out, "--resume"],
            draft="dspark")

    def run(self) -> None:
        for name in STAGES:
            if name in self.args.stages:
                print(f"[{time.strftime('%H:%M:%S')}] stage {name}", flush=True)
                getattr(self, name)()
        done = "every stage" if set(self.args.stages) == set(STAGES) else "stages " + " ".join(self.args.stages)
        print(f"{done} done; results in {self.results}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", formatter_class=HelpFormatter, help="every stage, skipping what is done")
    run.add_argument("--data", required=True, help="folder with train/ and eval/ prompt sets")
    run.add_argument("--target", help="the SmolLM2 .gguf (default: the cached download)")
    run.add_argument("--work", default="runs/repro_smollm2")
    run.add_argument("--scale", default="full", choices=sorted(SCALES))
    run.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS,
                     help="the drafters whose stages run (the others' results, if any, are kept)")
    run.add_argument("--train-set", nargs="*", default=[], metavar="KEY=VALUE",
                     help="recipe overrides for all three drafters (e.g. num_epochs=4), after the scale's")
    run.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                     help="run only these stages (in the pipeline's order); a stage needs the earlier ones' results")
    report = sub.add_parser("report", formatter_class=HelpFormatter, help="write docs/results.md from a finished run's results")
    report.add_argument("--work", default="runs/repro_smollm2")
    report.add_argument("--docs", default="docs")
    args = parser.parse_args(argv)
    if args.command == "run":
        Pipeline(args).run()
    else:
        from repro_report import write_report

        results = os.path.join(args.work, "results")
        if not os.path.isdir(results):
            raise FileNotFoundError(f"{results} does not exist: give --work the directory of a finished run")
        write_report(results, args.docs)


if __name__ == "__main__":
    sys.exit(run_cli(main))
