#!/usr/bin/env bash
# The GPU check of issue #4, prepared to fit one device call (one H200, about 8 minutes of its 10):
#   1. the device's facts and the CUDA paths of the tests (greedy tokens of the model and of every single-process
#      executor on CUDA equal to CPU references, the CUDA-event timer against a synchronized clock, NVML facts),
#   1b. Splitwiser's two processes on one GPU (weights and KV hand-off slots by CUDA IPC, gloo, MPS shares): greedy
#      tokens equal to single-request greedy decoding on the GPU, whether MPS was active, and the interference
#      profiler's GPU path (MPS percentages) on tiny,
#   2. a profile of a 1B-class preset on the GPU (python -m profiler), written to $OUT,
#   3. the paper's task S planned on that profile and on the device's roofline model (exegpt sweep),
#   4. the fidelity table on that GPU from that profile (benchmarks/fidelity.py --profile), written to $OUT.
# Every stage has its own time limit and the next one runs even when one fails, so what was measured comes back.
#
# Here (the machine without a GPU), once per checkout: fetch the wheels the GPU image lacks (ortools for the
# search, and what it needs) into .whl, which git ignores:
#   bash benchmarks/gpu_check.sh --prepare
# Then one call of the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590)  (stage limits sum to 560 s)
# Commit $OUT's profile as a built-in one (exegpt/data/profiles/, with its provenance) and put the tables in the
# closing note.
#
# Without a GPU the same stages run on the CPU (MODEL=tiny bash benchmarks/gpu_check.sh: a dry run of the flow,
# where the planning stages refuse task S, longer than tiny's context, and fidelity stops at its limit; its runs
# so far are logged).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # The GPU image (KINDS.md) is Python 3.12 with numpy, scipy, pandas, absl-py, tqdm, safetensors and
    # nvidia-ml-py; the search needs ortools, which needs immutabledict and a protobuf of 6.33.x.
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "ortools==${ORTOOLS_VERSION:-9.15.6755}" \
        immutabledict "protobuf==${PROTOBUF_VERSION:-6.33.6}"
    ls -l .whl
    exit
fi

export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: could not install the carried wheels" >&2; exit 2; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
MODEL=${MODEL:-llama-3.2-1b}
PROFILE="$OUT/profile-$MODEL.json"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$OUT/$name.txt"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

stage facts 30 $PY -c "
import json, torch
from profiler.device import describe_device
d = describe_device(None)
print(json.dumps({'name': d.name, 'model': d.model, 'memory_gib': d.memory_bytes / 2**30, 'torch': torch.__version__,
                  'cuda': torch.version.cuda, 'facts': d.facts}, indent=1, default=str))"
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# The runner's single-process tests run on CUDA when it is present (run_plan picks it) against CPU references.
stage tests 110 $PY -m pytest -q -x -p no:cacheprovider -m "not slow" tests/runner/test_model.py \
    tests/runner/test_executors.py tests/profiler/test_grid_timer_device.py
# Splitwiser on the GPU: the test prints whether an MPS daemon enforced the shares (without one the two processes
# time-slice the GPU); then the interference profiler's GPU path, a pair of processes per MPS split, briefly.
stage splitwiser 60 $PY -m pytest -q -s -p no:cacheprovider tests/runner/test_splitwiser.py -k on_a_gpu
stage interference 45 $PY -c "
from profiler.interference import InterferenceOptions, measure, table
from runner.colocate import colocated_device, mps_status
print(mps_status(colocated_device(None)))
print(table(measure('tiny', InterferenceOptions(batches=(1, 16), repeats=2, window_s=0.1))))"
# One torch thread, as the fidelity runs use (profiler.loop.THREADS): on a GPU it only paces the host.
stage profile 185 $PY -m profiler --model "$MODEL" --tp 1 2 --quick --threads 1 --no-progress -o "$PROFILE"
if [ -f "$PROFILE" ]; then
    # The paper's task S planned on the measured profile, then on the roofline model of the same device.
    DEVICE=$($PY -c "from exegpt import Profile; print(Profile.load('$PROFILE').device)")
    stage plan-measured 25 $PY -m exegpt sweep --task S --model "$MODEL" --profile "$PROFILE" --bounds 1 2 5 inf
    stage plan-modelled 25 $PY -m exegpt sweep --task S --model "$MODEL" --devices "1x$DEVICE" --bounds 1 2 5 inf
    TAIL=60 stage fidelity 80 $PY -m benchmarks.fidelity --profile "$PROFILE" --rounds 2 \
        --requests "${REQUESTS:-400}" --save "$OUT/fidelity.json"
fi
ls -l "$OUT"
