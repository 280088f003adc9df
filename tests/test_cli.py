"""The front door: every entry point run as a user would (a subprocess from the repository
root), bad input ending in one `error:` line without a traceback, and the same input through
the Python API raising the typed exception; the README's CPU commands run as written (there,
generation with a random draft reports tau against plain decoding, and chat takes two turns on
stdin)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny", "qwen3_mha_tied")


def run(*args, stdin=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "DSPARK_DEBUG"}
    env["PYTHONPATH"] = ROOT  # this checkout, whatever the environment has installed
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc, *names):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr
    for name in names:
        assert name in last, last
    return last


@pytest.mark.parametrize("args, names", [
    (["-m", "dspark_jax", "generate", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["-m", "dspark_jax", "generate", "--prompt", ""], ["--prompt"]),
    (["-m", "dspark_jax", "generate", "--model", "no/such/dir"], ["no/such/dir"]),
    (["-m", "dspark_jax", "generate", "--prompt-file", "no/such/prompts.txt"], ["no/such/prompts.txt"]),
    (["-m", "dspark_jax", "generate", "--draft", "random:dspark", "--scheduler", "bogus"], ["--scheduler 'bogus'"]),
    (["-m", "dspark_jax", "generate", "--scheduler", "threshold:0.5"], ["--scheduler needs --draft"]),
    (["-m", "dspark_jax", "chat", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["-m", "dspark_jax", "simulate", "--trace", "no_trace.npz", "--concurrency", "1", "--sps", "x.json"],
     ["no_trace.npz"]),
    (["-m", "dspark_jax", "simulate", "--trace", "t.npz", "--concurrency", "1", "8", "--sps", "x.json"],
     ["one --sps table per --concurrency"]),
    (["train.py", "--config", "no_recipe.py"], ["no_recipe.py"]),
    (["train.py", "--set", "no_such_key=1"], ["no_such_key"]),
    (["train.py", "--set", "max_steps=abc"], ["max_steps"]),
    (["eval.py", "--draft", "random:dspark", "--data-dir", "no/such/prompts", "--max-new-tokens", "0"],
     ["--max-new-tokens"]),
    (["scripts/repro_smollm2.py", "report", "--work", "no/such/run"], ["no/such/run"]),
    (["serve.py", "--scheduler", "prefix"], ["--scheduler needs --draft"]),
    (["serve.py", "--api-server-count", "2", "--no-engine-process"], ["--api-server-count > 1 needs the engine"]),
    (["serve.py", "--model", "no/such/model.gguf", "--port", "0"], ["no/such/model.gguf"]),
    (["-m", "dspark_jax", "serve", "--tensor-parallel", "0"], ["--tensor-parallel"]),
])
def test_bad_input_is_one_line(args, names):
    assert_one_line_error(run(*args), *names)


def test_run_cli_in_process(capsys, monkeypatch):
    from dspark_jax.console import run_cli

    def fails(error):
        def main(argv):
            raise error
        return main

    monkeypatch.delenv("DSPARK_DEBUG", raising=False)
    assert run_cli(fails(KeyError("sps")), []) == 1
    assert capsys.readouterr().err == "error: missing key 'sps'\n"
    assert run_cli(fails(ValueError("two\nlines")), []) == 1
    assert capsys.readouterr().err == "error: two; lines\n"
    assert run_cli(lambda argv: None, []) == 0 and run_cli(lambda argv: 3, []) == 3
    with pytest.raises(ValueError):
        run_cli(fails(ValueError("x")), ["--debug"])
    with pytest.raises(RuntimeError):  # not an expected failure: a bug keeps its traceback
        run_cli(fails(RuntimeError("x")), [])
    monkeypatch.setenv("DSPARK_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_cli(fails(FileNotFoundError("x")), [])


def test_debug_shows_the_traceback():
    proc = run("train.py", "--config", "no_recipe.py", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_help_shows_defaults():
    for args in (["-m", "dspark_jax", "generate", "--help"], ["train.py", "--help"], ["eval.py", "--help"],
                 ["serve.py", "--help"]):
        proc = run(*args)
        assert proc.returncode == 0 and "(default:" in proc.stdout, args


def test_train_default_recipe_from_another_directory(tmp_path):
    from dspark_jax.training.cli import DEMO_RECIPE

    assert os.path.isabs(DEMO_RECIPE) and os.path.exists(DEMO_RECIPE)


def test_same_inputs_through_the_api_raise_typed_errors():
    from dspark_jax import generate, load_target
    from dspark_jax.decoding.scheduler import scheduler_from_spec
    from dspark_jax.models.config import ConfigError
    from dspark_jax.training.config import load_config

    with pytest.raises(FileNotFoundError):
        load_config(os.path.join(ROOT, "no_recipe.py"))
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(os.path.join(ROOT, "configs", "demo_tiny.py"), ["no_such_key=1"])
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(os.path.join(ROOT, "configs", "demo_tiny.py"), ["max_steps=abc"])
    with pytest.raises(OSError, match="no/such/dir"):
        load_target("no/such/dir")
    with pytest.raises(ValueError, match="expected none, fixed:<g>, threshold"):
        scheduler_from_spec("bogus")
    target = load_target(TINY, dtype="float32")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(target, None, [[1, 2, 3]], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(target, None, [[]], max_new_tokens=4)


def test_console_scripts_resolve():
    import importlib
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == {"dspark-jax", "dspark-train", "dspark-eval"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target


def test_eval_prompt_file_without_prompts(tmp_path):
    (tmp_path / "empty.jsonl").write_text("{not json\n\n")
    last = assert_one_line_error(run("eval.py", "--draft", "random:dspark", "--data-dir", str(tmp_path)),
                                 "empty.jsonl")
    assert "empty.jsonl:1: invalid JSON" in last
    assert_one_line_error(run("eval.py", "--draft", "random:dspark", "--data-dir", str(tmp_path / "none")), "none")


def readme_cpu_commands() -> list[str]:
    """The commands of the README's code blocks marked `<!-- cpu-test -->`, continuation lines joined."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"<!-- cpu-test -->\n```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                commands.append(line)
    return commands


README_COMMANDS = ["generate", "chat", "eval", "train"]  # the marked blocks' commands, in order


def test_the_readme_marks_its_commands():
    commands = readme_cpu_commands()
    assert len(commands) == len(README_COMMANDS), commands
    for command, kind in zip(commands, README_COMMANDS):
        assert kind in command, (kind, command)


# The README's own generate command (speculative, with the scheduler's report) runs in CI; the
# chat, train and eval commands, half a minute each, with the slow tests.
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k != "generate" else k
                                  for k in README_COMMANDS])
def test_readme_cpu_command_runs(tmp_path, kind):
    """A marked README command, as written, with the sizes cut down (new tokens, steps,
    prompts) and placeholders filled: the documented front door cannot rot unnoticed."""
    command = readme_cpu_commands()[README_COMMANDS.index(kind)]
    for name in ("gsm8k", "mt-bench"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"turns": ["What is 2+2?"]}) + "\n")
    fill = {"DRAFT_DIR": "random:dspark", "PROMPT_DIR": str(tmp_path), "results.json": str(tmp_path / "r.json")}
    for key, value in fill.items():
        command = command.replace(key, value)
    command = re.sub(r"--max-new-tokens \d+", "--max-new-tokens 4", command)
    command = re.sub(r"--limit \d+", "--limit 1", command)
    if kind == "train":
        command += f" --set max_steps=2 log_every=1 output_dir={tmp_path / 'train'}"
    stdin = None
    if command.startswith("printf"):
        printed, _, command = command.partition(" | ")
        stdin = shlex.split(printed)[1].encode().decode("unicode_escape")
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/python", command
    proc = run(*argv[1:], stdin=stdin)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    if kind == "chat":
        assert len([line for line in proc.stdout.splitlines() if line.strip()]) == 2, proc.stdout
    if kind == "generate":
        assert "--draft" in command and "tau" in proc.stderr and "autoregressive" in proc.stderr and proc.stdout.strip()
    if kind == "eval":
        assert json.load(open(tmp_path / "r.json"))["datasets"]["gsm8k"]["prompts"] == 1
    if kind == "train":
        assert os.path.exists(tmp_path / "train" / "draft" / "config.json")


def test_training_data_rejected_by_min_loss_tokens_names_the_key(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello there."}]}) + "\n{broken\n")
    proc = run("train.py", "--config", "configs/dspark_smollm2.py", "--set", f"train_files={data}",
               "min_loss_tokens=1000", "max_steps=1", f"output_dir={tmp_path / 'run'}")
    last = assert_one_line_error(proc, "min_loss_tokens=1000", "--set min_loss_tokens=N", f"{data}:2: invalid JSON")
    assert f"{data}:1:" in last
