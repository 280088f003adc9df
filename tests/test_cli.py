"""The front door: every entry point run as a user would (a subprocess from the repository
root), bad input ending in one `error:` line without a traceback, and the same input through
the Python API raising the typed exception."""

import os
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
    (["train.py", "--config", "no_recipe.py"], ["no_recipe.py"]),
    (["train.py", "--set", "no_such_key=1"], ["no_such_key"]),
    (["train.py", "--set", "max_steps=abc"], ["max_steps"]),
    (["eval.py", "--draft", "random:dspark", "--data-dir", "no/such/prompts", "--max-new-tokens", "0"],
     ["--max-new-tokens"]),
    (["scripts/repro_smollm2.py", "report", "--work", "no/such/run"], ["no/such/run"]),
])
def test_bad_input_is_one_line(args, names):
    assert_one_line_error(run(*args), *names)


def test_debug_shows_the_traceback():
    proc = run("train.py", "--config", "no_recipe.py", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_help_shows_defaults():
    for args in (["-m", "dspark_jax", "generate", "--help"], ["train.py", "--help"], ["eval.py", "--help"]):
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
    with pytest.raises(ValueError, match="expected none, threshold"):
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


QUESTION = ["--prompt", "What is 2+2?", "--max-new-tokens", "6", "--temperature", "0"]


def test_generate_with_a_draft_gives_the_targets_greedy_text():
    plain = run("-m", "dspark_jax", "generate", *QUESTION)
    assert plain.returncode == 0, plain.stderr
    speculative = run("-m", "dspark_jax", "generate", *QUESTION, "--draft", "random:dspark", "--no-ar-baseline")
    assert speculative.returncode == 0, speculative.stderr
    assert speculative.stdout == plain.stdout and plain.stdout.strip()
    assert "tau" in speculative.stderr and "tokens per round" in speculative.stderr


def test_chat_through_stdin(tmp_path):
    proc = run("-m", "dspark_jax", "chat", "--max-new-tokens", "6", "--system", "Answer briefly.",
               stdin="What is 2+2?\nAnd 3+3?\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    answers = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(answers) == 2, proc.stdout
