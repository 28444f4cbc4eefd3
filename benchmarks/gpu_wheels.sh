#!/usr/bin/env bash
# The wheels a lent GPU machine (Python 3.12, torch 2.11 and most of vlp's needs installed; no
# network) lacks for benchmarks/gpu_throughput.py, into .whl/ (git-ignored): .whl/vlp for vlp's
# side, .whl/peer for open_clip_train's (its webdataset<=0.2.86 conflicts with vlp's 1.0.2).
# Run here, with a network; then on the GPU machine (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/vlp/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer .whl/peer/*.whl
#   PYTHONPATH=/tmp/site python3 benchmarks/gpu_throughput.py --peer-python python3 --peer-path /tmp/peer
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)
get() {  # get FOLDER REQUIREMENT...
    local folder=$1; shift
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d ".whl/$folder" "$@"
}
get vlp open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.9.4
get peer webdataset==0.2.86
ls -l .whl/vlp .whl/peer
