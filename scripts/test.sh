#!/usr/bin/env bash
# Set up .venv in the repository root from requirements.lock and run the test suite.
#   bash scripts/test.sh                        the locked versions (what CI runs)
#   bash scripts/test.sh --latest               the newest versions pyproject allows, in .venv-latest: finds a
#                                               breaking upstream release before a new user does
# Further arguments go to pytest, e.g. `bash scripts/test.sh tests/test_gpt.py -x`.
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
"$PY" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"
