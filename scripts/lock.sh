#!/usr/bin/env bash
# Refresh requirements.lock: the exact versions scripts/test.sh and scripts/quickstart.sh install, resolved from
# pyproject's ranges (with the test extra) and the torch / torchvision pair below, for every Python the project
# supports (one universal file with environment markers). uv does the resolving; it is a tool here, not a
# dependency, and is installed into .venv-tools on first use.
#
#   bash scripts/lock.sh          # then run `bash scripts/test.sh` and commit requirements.lock with what it passed on
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh  # TORCH_PINS: torch and torchvision, pinned together
tools_uv
printf '%s\n' "${TORCH_PINS[@]}" | "$UV" pip compile pyproject.toml - --extra test --universal \
    --python-version 3.10 --no-emit-package mgvq-gpt --custom-compile-command "bash scripts/lock.sh" \
    -o requirements.lock
