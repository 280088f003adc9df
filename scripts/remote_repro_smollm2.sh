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
# or two per machine.
# A trained draft (about 90 MB) can travel too, so that its later stages run on another
# machine without training it again (GPU training is not bit-reproducible, so a second training
# is a second draft):
#   jobs after its training:  bash scripts/remote_repro_smollm2.sh send-draft ALGORITHM RESULTS_DIR
#     (3 parts of 15 MiB per job, into RESULTS_DIR, until it says "all sent")
#   here:  bash scripts/remote_repro_smollm2.sh collect-draft ALGORITHM JOB_FOLDER...
#     (the parts, checked, in .repro/draft_ALGORITHM/p1, p2, ...: one folder to send per job)
#   on a fresh machine, one job per folder:  bash scripts/remote_repro_smollm2.sh receive-draft ALGORITHM
#     (sending one .repro/draft_ALGORITHM/pN), then `run` with a seed whose DONE names the drafter.
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
    for received in "$REMOTE"/drafts/*/draft; do  # drafts that came with receive-draft
        [ -d "$received" ] || continue
        algorithm=$(basename "$(dirname "$received")")
        [ -e "$REMOTE/work/runs/$algorithm/draft" ] || { mkdir -p "$REMOTE/work/runs/$algorithm" \
            && mv "$received" "$REMOTE/work/runs/$algorithm/draft"; }
    done
    status=0
    timeout "${STAGE_SECONDS:-560}" python3 scripts/repro_smollm2.py run --data .repro/data --target "$gguf" \
        --work "$REMOTE/work" "${@:3}" || status=$?
    [ $status -eq 124 ] && echo "stopped after ${STAGE_SECONDS:-560} s; run again to continue"
    ( cd "$REMOTE/work" && tar czf "$results/results.tgz" --ignore-failed-read results logs prompts heldout \
        train_smollm2.jsonl heldout_smollm2.jsonl $(find runs -name DONE 2>/dev/null) )
    exit $status
    ;;
send-draft)
    algorithm=${2:?usage: send-draft ALGORITHM RESULTS_DIR}
    results=$(cd "$CALLER" && mkdir -p "${3:?usage: send-draft ALGORITHM RESULTS_DIR}" && cd "$3" && pwd)
    out=$REMOTE/outgoing/$algorithm
    if [ ! -f "$out/draft_$algorithm.sha256" ]; then
        [ -f "$REMOTE/work/runs/$algorithm/DONE" ] || { echo "$algorithm has no finished draft here" >&2; exit 1; }
        mkdir -p "$out"
        tar cf - -C "$REMOTE/work/runs/$algorithm" draft | split -b 15M -d -a 2 - "$out/draft_$algorithm.tar.part"
        cat "$out"/draft_"$algorithm".tar.part?? | sha256sum | cut -d' ' -f1 > "$out/draft_$algorithm.sha256"
    fi
    cp "$out/draft_$algorithm.sha256" "$results/"
    sent=0
    for part in "$out"/draft_"$algorithm".tar.part??; do
        if [ ! -f "$part.sent" ] && [ $sent -lt 3 ]; then
            cp "$part" "$results/" && touch "$part.sent" && sent=$((sent + 1))
        fi
    done
    left=$(for part in "$out"/draft_"$algorithm".tar.part??; do [ -f "$part.sent" ] || echo "$part"; done | wc -l)
    [ "$left" -eq 0 ] && echo "$algorithm: all sent" || echo "$algorithm: $left parts left; send-draft again"
    ;;
collect-draft)
    algorithm=${2:?usage: collect-draft ALGORITHM JOB_FOLDER...}
    into=.repro/draft_$algorithm
    rm -rf "$into" && mkdir -p "$into"
    for folder in "${@:3}"; do
        (cd "$CALLER" && cp "$folder"/draft_"$algorithm".* "$OLDPWD/$into/")
    done
    [ "$(cat "$into"/draft_"$algorithm".tar.part?? | sha256sum | cut -d' ' -f1)" = "$(cat "$into/draft_$algorithm.sha256")" ] \
        || { echo "the parts in $into do not match their checksum (a part missing?)" >&2; exit 1; }
    n=0
    for part in "$into"/draft_"$algorithm".tar.part??; do  # 3 parts per folder, each with the checksum
        folder="$into/p$((n / 3 + 1))" && mkdir -p "$folder" && mv "$part" "$folder/" && n=$((n + 1))
        cp "$into/draft_$algorithm.sha256" "$folder/"
    done
    rm "$into/draft_$algorithm.sha256"
    ls "$into"
    ;;
receive-draft)
    algorithm=${2:?usage: receive-draft ALGORITHM}
    incoming=$REMOTE/incoming/$algorithm
    mkdir -p "$incoming"
    for folder in .repro/draft_"$algorithm"/p*; do
        [ -d "$folder" ] && cp "$folder"/draft_"$algorithm".* "$incoming/"
    done
    if [ "$(cat "$incoming"/draft_"$algorithm".tar.part?? | sha256sum | cut -d' ' -f1)" \
         = "$(cat "$incoming/draft_$algorithm.sha256")" ]; then
        rm -rf "$REMOTE/drafts/$algorithm" && mkdir -p "$REMOTE/drafts/$algorithm"
        cat "$incoming"/draft_"$algorithm".tar.part?? | tar xf - -C "$REMOTE/drafts/$algorithm"
        echo "$algorithm: draft received"
    else
        echo "$algorithm: $(ls "$incoming" | grep -c part) parts here; receive-draft again with the next folder"
    fi
    ;;
*)
    sed -n '/^set -euo/q;2,$p' "$0"
    exit 2
    ;;
esac
