#!/usr/bin/env bash
# Set up .venv in the repository root (when missing) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_gpt.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PY=.venv/bin/python
# torch and torchvision first, pinned together: a lone torchvision from PyPI may not match the torch wheel.
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
"$PY" -m pip install -q -e ".[test]"

set +e
"$PY" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"
