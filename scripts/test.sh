#!/usr/bin/env bash
# Set up .venv in the repository root from requirements.lock and run the test suite.
#   bash scripts/test.sh                        the locked versions (what CI runs)
#   bash scripts/test.sh --latest               the newest versions pyproject allows, in .venv-latest: finds a
#                                               breaking upstream release before a new user does
# Further arguments go to pytest, e.g. `bash scripts/test.sh tests/test_gpt.py -x`; `-n 0` runs in one process.
#
# The tests run on one pytest-xdist worker per core, each with one torch thread (OMP_NUM_THREADS, unless already
# set): most tests are small ops and Python, which a second thread barely speeds up and a second worker halves.
# On the 2-core CI machine that took the suite from 12-13 minutes to 5.5.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh

if [ "${1:-}" = --latest ]; then
    shift
    setup_env .venv-latest latest
else
    setup_env .venv locked "[test]"
fi

set +e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest -q -n auto "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"
