#!/usr/bin/env bash
# Reproduce Qwen's published 5-shot MMLU figure for a Qwen1.5 base model with `qwenlink eval`.
#
#   examples/reproduce_mmlu.sh MODEL_DIR [MMLU_DATA_DIR] [-- EXTRA_EVAL_OPTIONS...]
#
# MODEL_DIR      a Qwen1.5 HF model directory (config.json + safetensors), e.g. a download of Qwen/Qwen1.5-7B.
# MMLU_DATA_DIR  the MMLU CSVs in the original archive's layout (a folder with dev/ and test/, or its parent); without
#                it the archive https://people.eecs.berkeley.edu/~hendrycks/data.tar is downloaded once into
#                $MMLU_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/qwenlink/mmlu) and unpacked there.
# after `--`     passed to `qwenlink eval` as they are (e.g. `-- --limit 3` for a quick check).
#
# It scores all 57 subjects (14042 test questions) 5-shot, as lm-evaluation-harness and Qwen's published numbers do,
# prints qwenlink's per-subject table and comparison line, writes the results JSON and ends with the row of
# ModelLink's Qwen1.5 README table ("| MMLU | 57 | 14042 | reference | this run |").
#
# Environment (all optional):
#   QWENLINK_NPROC=N  score tensor-parallel on N GPUs (or Ascend NPUs) under torchrun (default 1)
#   OUTPUT=FILE       results JSON (default: ./mmlu-5shot-<model dir name>.json)
#   DTYPE, BATCH_SIZE, THREADS   override the choices below: on a GPU / NPU bf16 and batch 16; on a CPU fp32,
#                     batch 8 and all cores, or 1 thread when the machine is busy (load average above half the cores:
#                     two threads spinning against other jobs were many times slower there, docs/evaluation.md)
#   MMLU_CACHE=DIR    where the downloaded archive is unpacked
#   MMLU_URL=URL      another copy of the archive (a mirror, or file:///path/data.tar)
#
# qwenlink is run from this repository's .venv when there is one, else the `qwenlink` on PATH. Errors in the
# arguments are one line and exit status 2. Timings and what to expect: docs/evaluation.md.
set -euo pipefail

MMLU_URL="${MMLU_URL:-https://people.eecs.berkeley.edu/~hendrycks/data.tar}"  # a mirror (or file://) may replace it
SUBJECTS=57
QUESTIONS=14042

die() { echo "reproduce_mmlu.sh: $*" >&2; exit "${EXIT:-2}"; }
usage="usage: examples/reproduce_mmlu.sh MODEL_DIR [MMLU_DATA_DIR] [-- EXTRA_EVAL_OPTIONS...]"

# ---- arguments ------------------------------------------------------------------------------------------------------
positional=()
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; extra=("$@"); break ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) positional+=("$1"); shift ;;
    esac
done
[ ${#positional[@]} -ge 1 ] || die "MODEL_DIR is missing ($usage)"
[ ${#positional[@]} -le 2 ] ||
    die "too many arguments: ${positional[*]:2} (options for qwenlink eval go after --; $usage)"
model_dir="${positional[0]}"
data_dir="${positional[1]:-}"
[ -d "$model_dir" ] || die "$model_dir: MODEL_DIR is not a directory"
[ -f "$model_dir/config.json" ] || die "$model_dir: not an HF model directory (no config.json)"

# A folder in the archive's layout: DIR/{dev,test}/ or DIR/data/{dev,test}/ with one CSV per subject.
mmlu_root() {
    local d
    for d in "$1" "$1/data"; do
        if [ -d "$d/dev" ] && [ -d "$d/test" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}
check_layout() {  # DIR WHAT
    local dev test
    dev=$(find "$1/dev" -maxdepth 1 -name '*_dev.csv' | wc -l)
    test=$(find "$1/test" -maxdepth 1 -name '*_test.csv' | wc -l)
    [ "$dev" -eq $SUBJECTS ] && [ "$test" -eq $SUBJECTS ] ||
        die "$2: expected $SUBJECTS dev/*_dev.csv and $SUBJECTS test/*_test.csv files (the MMLU archive's data/" \
            "folder), found $dev and $test"
}

# ---- qwenlink -------------------------------------------------------------------------------------------------------
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$repo/.venv/bin/python" ]; then
    py="$repo/.venv/bin/python"
elif command -v qwenlink >/dev/null 2>&1; then
    # pip's console script names its interpreter on the first line; the same one runs torchrun and the summary.
    py="$(head -n 1 "$(command -v qwenlink)" | sed -n 's/^#! *\([^ ]*\).*/\1/p')"
    [ -x "$py" ] || py=python3
else
    EXIT=1 die "qwenlink not found: run \`make quickstart\` (creates $repo/.venv) or \`pip install qwenlink\`"
fi
"$py" -c "import qwenlink" 2>/dev/null || EXIT=1 die "$py cannot import qwenlink (pip install -e $repo)"

# ---- data -----------------------------------------------------------------------------------------------------------
if [ -n "$data_dir" ]; then
    [ -d "$data_dir" ] || die "$data_dir: MMLU_DATA_DIR is not a directory"
    root="$(mmlu_root "$data_dir")" ||
        die "$data_dir: no dev/ and test/ folders here or in $data_dir/data (the MMLU archive's layout)"
    check_layout "$root" "$data_dir"
else
    cache="${MMLU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qwenlink/mmlu}"
    if ! root="$(mmlu_root "$cache")"; then
        mkdir -p "$cache"
        part="$cache/data.tar.part"
        unpack=""
        trap 'rm -rf "$part" ${unpack:+"$unpack"}' EXIT  # a failed or interrupted download leaves nothing behind
        echo "downloading $MMLU_URL into $cache ..." >&2
        if command -v curl >/dev/null 2>&1; then
            curl -fsSL --retry 3 --connect-timeout 20 -o "$part" "$MMLU_URL" ||
                EXIT=1 die "could not download $MMLU_URL (no network?); pass a local copy as MMLU_DATA_DIR"
        elif command -v wget >/dev/null 2>&1; then
            wget -q --tries=3 --timeout=20 -O "$part" "$MMLU_URL" ||
                EXIT=1 die "could not download $MMLU_URL (no network?); pass a local copy as MMLU_DATA_DIR"
        else
            EXIT=1 die "neither curl nor wget is installed; download $MMLU_URL and pass its data/ folder as" \
                "MMLU_DATA_DIR"
        fi
        unpack="$(mktemp -d "$cache/unpack.XXXXXX")"
        tar -xf "$part" -C "$unpack" 2>/dev/null ||
            EXIT=1 die "$MMLU_URL: not a tar archive (a proxy's error page?); check the address and retry"
        check_layout "$unpack/data" "$MMLU_URL"
        rm -rf "$cache/data"
        mv "$unpack/data" "$cache/data"
        root="$cache/data"
    fi
    check_layout "$root" "$cache"
fi

# ---- device, dtype, threads -----------------------------------------------------------------------------------------
nproc_tp="${QWENLINK_NPROC:-1}"
[[ "$nproc_tp" =~ ^[1-9][0-9]*$ ]] || die "QWENLINK_NPROC=$nproc_tp: expected a positive number of GPUs"
gpus=0
if compgen -G '/dev/nvidia[0-9]*' >/dev/null || compgen -G '/dev/davinci[0-9]*' >/dev/null; then
    # Only where an accelerator's device files exist: asking torch costs an import (seconds) on a plain CPU machine.
    gpus="$("$py" - 2>/dev/null <<'PY' || echo 0
import torch
if torch.cuda.is_available():
    print(torch.cuda.device_count())
else:
    try:
        import torch_npu  # noqa: F401  (Ascend)
        print(torch.npu.device_count())
    except ImportError:
        print(0)
PY
)"
fi
if [ "$nproc_tp" -gt 1 ] && [ "$gpus" -lt "$nproc_tp" ]; then
    die "QWENLINK_NPROC=$nproc_tp but $gpus GPU(s) are visible"
fi
opts=()
if [ "$gpus" -gt 0 ]; then
    opts+=(--dtype "${DTYPE:-bf16}" --batch-size "${BATCH_SIZE:-16}")
else
    cores="$(nproc 2>/dev/null || echo 1)"
    load="$(cut -d ' ' -f 1 /proc/loadavg 2>/dev/null || echo 0)"
    busy="$(awk -v l="$load" -v c="$cores" 'BEGIN { print (l > c / 2) ? 1 : 0 }')"
    threads="${THREADS:-$([ "$busy" = 1 ] && echo 1 || echo "$cores")}"
    opts+=(--dtype "${DTYPE:-fp32}" --batch-size "${BATCH_SIZE:-8}" --threads "$threads")
    echo "CPU: $cores cores, load average $load -> --threads $threads" >&2
fi

output="${OUTPUT:-$PWD/mmlu-5shot-$(basename "$(cd "$model_dir" && pwd)").json}"
eval_args=(eval --model "$model_dir" --task mmlu --data "$root" --shots 5 --compare --output "$output" "${opts[@]}"
           ${extra[@]+"${extra[@]}"})
if [ "$nproc_tp" -gt 1 ]; then
    cmd=("$py" -m torch.distributed.run --standalone --nproc-per-node "$nproc_tp" -m qwenlink.cli "${eval_args[@]}")
else
    cmd=("$py" -m qwenlink.cli "${eval_args[@]}")
fi
echo "+ ${cmd[*]}" >&2
"${cmd[@]}"

# ---- the README row -------------------------------------------------------------------------------------------------
"$py" - "$output" "$model_dir" "$SUBJECTS" "$QUESTIONS" <<'PY'
"""The row of ModelLink's Qwen1.5 README table from the results JSON, with Qwen's published figure beside it."""
import json
import sys

from pathlib import Path
from types import SimpleNamespace

from qwenlink.evaluation.report import PUBLISHED, model_size  # no torch import: this part takes a moment

output, model_dir, subjects, questions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
report = json.loads(Path(output).read_text(encoding="utf-8"))
overall = report["results"]["overall"]
# The size is recognised by the architecture in config.json, as `qwenlink eval --compare` recognises it.
size = model_size(SimpleNamespace(**json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))))
reference = (f"{PUBLISHED['mmlu'][size] / 100:.3f} (Qwen1.5-{size.upper()}, published)"
             if size in PUBLISHED["mmlu"] else "- (not a Qwen1.5 size)")
print()
print("| dataset | subjects | questions | reference accuracy | this run |")
print("| :----: | :------: | :------: | :------: | :------: |")
print(f"| MMLU | {overall['subjects']} | {overall['n']} | {reference} | {overall['acc']:.3f} |")
if overall["subjects"] != subjects or overall["n"] != questions:
    print(f"note: {overall['n']} of MMLU's {questions} questions ({overall['subjects']} of {subjects} subjects): "
          f"a subset, not the published benchmark")
timing = report["timing"]
print(f"results: {output} ({timing['questions']} questions, {timing['questions_per_second']} questions/s)")
PY
