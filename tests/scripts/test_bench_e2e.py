"""scripts/bench_e2e.py on a tiny chat model: AR against a draft under several schedulers."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import bench_e2e  # noqa: E402


@pytest.mark.slow  # about 35 s of compilation; CI tests the fixed scheduler in generate (test_speculative)
def test_each_scheduler_is_a_row_and_the_sps_table_follows_the_batch(tmp_path, tiny_chat_target):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"Say {w}."]}) + "\n" for w in ("yes", "no")))
    (tmp_path / "sps_r2.json").write_text(json.dumps({"sps": [1.0] * 64}))  # flat: verifying more is free
    out = tmp_path / "speed.json"
    bench_e2e.main(["--target", tiny_chat_target, "--draft", "dspark=random:dspark", "--prompts", str(prompts),
                    "--num-prompts", "2", "--batch-sizes", "2", "--max-new-tokens", "6", "--dtype", "float32",
                    "--schedulers", "none", "fixed:1", f"prefix:{tmp_path}/sps_r{{batch}}.json", "--out", str(out)])
    rows = json.loads(out.read_text())["batches"]["2"]["drafts"]
    assert list(rows) == ["dspark", "dspark fixed:1", "dspark prefix"]
    assert rows["dspark fixed:1"]["verified_per_round"] == 1.0
    assert rows["dspark"]["verified_per_round"] == 7.0  # the whole block
    assert rows["dspark"]["ideal_speedup"] > 0 and "ideal_speedup" not in rows["dspark prefix"]
    assert all(r["tokens_per_s"] > 0 and r["tau"] >= 1 for r in rows.values())
