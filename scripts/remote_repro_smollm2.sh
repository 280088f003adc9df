#!/usr/bin/env bash
# The SmolLM2 study (scripts/repro_smollm2.py) on a remote GPU machine that takes at most
# 64 MiB of files per job and keeps files outside the job's folder while it stays up between
# back-to-back jobs. The 98 MB GGUF therefore travels in two halves, one per job.
#
#   bash scripts/remote_repro_smollm2.sh prepare DATA_DIR   # here, once: .repro/{a,b,data}, wheels in .whl
#   job 1, sending .repro/a:                  bash scripts/remote_repro_smollm2.sh receive
#   jobs 2.., sending .repro/b .repro/data .whl:  bash scripts/remote_repro_smollm2.sh run RESULTS_DIR [ARGS]
#   (.whl may stay behind on a machine that installed it in an earlier job: /tmp/site is kept)
#
# ARGS go to `repro_smollm2.py run` (e.g. --train-set num_epochs=4, --algorithms dspark for
# one drafter, --stages train sts for some stages). `run` stops the pipeline after
# STAGE_SECONDS (default 560; training checkpoints as it stops), so a job ends inside a
# 10-minute limit, and the next `run` continues where it stopped (it prints "every
# stage done" at the end). Each `run` packs the results, the logs, the regenerated data and
# the finished drafters' DONE markers into RESULTS_DIR/results.tgz; unpack that into
# runs/repro_smollm2 here and write the page with `python scripts/repro_smollm2.py report`. A
# planned stop exits with 124, "every stage done" with 0. Send the last results.tgz as
# .repro/seed.tgz to a fresh machine (after `receive` again): it starts from the regenerated
# data and skips what the seed holds, so the drafters can be done on different machines, one
# or two per machine (the drafts themselves do not travel).
# .repro/b, .repro/data, .whl and the repository come to about 60 MB, a seed adds about 5.
# The machine needs jax with CUDA, flax, optax, orbax, transformers and matplotlib; grain, its
# array-record and portpicker, gguf and tensorboardX come as wheels (prepare downloads them
# for CPython 3.12 on x86-64 Linux).
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
REMOTE=${REMOTE_DIR:-$HOME/repro}
PART=smollm2.gguf.part

case "${1:-}" in
prepare)
    data=${2:?usage: prepare DATA_DIR (with train/ and eval/ prompt sets)}
    mkdir -p .repro/a .repro/b .whl
    grep -qsx '/.repro/' .git/info/exclude || echo /.repro/ >> .git/info/exclude
    grep -qsx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    gguf=$(.venv/bin/python -m dspark_jax fetch-smollm2)
    split -n 2 -d "$gguf" ".repro/$PART"
    mv ".repro/${PART}00" .repro/a/ && mv ".repro/${PART}01" .repro/b/
    sha256sum < "$gguf" | cut -d' ' -f1 > .repro/b/sha256
    rm -rf .repro/data && mkdir .repro/data && cp -r "$data/train" "$data/eval" .repro/data/
    rm -f .repro/data/train/*_raw.jsonl  # unused by the study; keeps the job small
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 gguf==0.19.0 \
        tensorboardX==2.6.5
    du -sh .repro/a .repro/b .repro/data .whl
    ;;
receive)
    mkdir -p "$REMOTE" && cp ".repro/a/${PART}00" "$REMOTE/"
    echo "first half in $REMOTE"
    ;;
run)
    results=$(cd "$CALLER" && mkdir -p "${2:?usage: run RESULTS_DIR}" && cd "$2" && pwd)
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    elif [ ! -d /tmp/site ]; then
        echo "no wheels in .whl and none installed in /tmp/site: send .whl with this job" >&2; exit 1
    fi
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    gguf=$REMOTE/smollm2.gguf
    if [ ! -f "$gguf" ]; then
        [ -f "$REMOTE/${PART}00" ] || { echo "no first half in $REMOTE: run 'receive' in the job before" >&2; exit 1; }
        cat "$REMOTE/${PART}00" ".repro/b/${PART}01" > "$gguf.tmp"
        [ "$(sha256sum < "$gguf.tmp" | cut -d' ' -f1)" = "$(cat .repro/b/sha256)" ] \
            || { echo "the joined GGUF does not match its checksum" >&2; exit 1; }
        mv "$gguf.tmp" "$gguf"
    fi
    if [ -f .repro/seed.tgz ] && [ ! -d "$REMOTE/work" ]; then
        mkdir -p "$REMOTE/work" && tar xzf .repro/seed.tgz -C "$REMOTE/work"
    fi
    status=0
    timeout "${STAGE_SECONDS:-560}" python3 scripts/repro_smollm2.py run --data .repro/data --target "$gguf" \
        --work "$REMOTE/work" "${@:3}" || status=$?
    [ $status -eq 124 ] && echo "stopped after ${STAGE_SECONDS:-560} s; run again to continue"
    ( cd "$REMOTE/work" && tar czf "$results/results.tgz" --ignore-failed-read results logs prompts heldout \
        train_smollm2.jsonl heldout_smollm2.jsonl $(find runs -name DONE 2>/dev/null) )
    exit $status
    ;;
*)
    sed -n '/^set -euo/q;2,$p' "$0"
    exit 2
    ;;
esac
