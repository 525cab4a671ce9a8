#!/usr/bin/env bash
# The GPU node's install path, tried on a machine without a GPU: a virtual environment holding only the packages
# the node holds (torch and torchvision among them, at the lock's versions for that Python), the wheelhouse of what
# it lacks installed with --no-index and no pip configuration (as on an air-gapped node), torch checked unchanged,
# the project imported from outside the checkout, a CPU subset of the suite, then gpu_check.sh --dry-run.
# Needs package access (to fill the environment and the wheelhouse), python3.X here, and about 6 GB of disk.
#
#   bash scripts/wheelhouse_check.sh VENV_DIR [--python 3.11] [--node scripts/gpu_node_packages.txt]
# VENV_DIR goes outside the repository (it is made anew and left in place: delete it afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh  # locked_pins, normalise, node_names
VENV=${1:?usage: bash scripts/wheelhouse_check.sh VENV_DIR [--python 3.11] [--node FILE]}
shift
PYVER=3.11 NODE=scripts/gpu_node_packages.txt
while [ $# -gt 0 ]; do
    case $1 in
        --python) PYVER=$2; shift 2 ;;
        --node) NODE=$2; shift 2 ;;
        *) echo "wheelhouse_check.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
CPU_SUBSET=(tests/test_check_deps.py tests/test_configs.py tests/test_gpu.py
            "tests/test_evaluate.py::test_torch_fidelity_pre_releases_and_old_releases_are_refused"
            "tests/test_evaluate.py::test_sizes_are_checked_before_any_extraction")

rm -rf "$VENV"
"python$PYVER" -m venv "$VENV"
PY=$(cd "$VENV" && pwd)/bin/python
NODE_NAMES=$(node_names "$NODE")
while IFS= read -r pin; do
    if grep -qx -- "$(printf '%s' "${pin%%==*}" | normalise)" <<<"$NODE_NAMES"; then echo "$pin"; fi
done < <(locked_pins "$PYVER") > "$VENV/node-packages.txt"
echo "== a node-like environment: the $(wc -l < "$VENV/node-packages.txt") locked packages $NODE names, no others"
"$PY" -m pip install -q --no-deps -r "$VENV/node-packages.txt"
TORCH_BEFORE=$("$PY" -m pip freeze | grep -E '^(torch|torchvision)==')

echo "== the wheelhouse of what it lacks"
bash scripts/wheelhouse.sh --python "$PYVER" --missing-only "$NODE" --out "$VENV/wheelhouse"

echo "== pip install --no-index from the wheelhouse (no pip configuration, as on the node)"
PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --no-index --find-links "$VENV/wheelhouse" -e '.[test]' \
    | grep -E '^(Successfully|ERROR)' || true
TORCH_AFTER=$("$PY" -m pip freeze | grep -E '^(torch|torchvision)==')
[ "$TORCH_BEFORE" = "$TORCH_AFTER" ] || { echo "torch changed: $TORCH_BEFORE -> $TORCH_AFTER" >&2; exit 1; }
echo "torch kept: $(echo "$TORCH_AFTER" | tr '\n' ' ')"
PIP_CONFIG_FILE=/dev/null "$PY" -m pip check
(cd /tmp && "$PY" -c "import gpt, sampling, tokenizer, hydra, torch_fidelity; print('imported outside the checkout:',
    'gpt from', gpt.__file__, '| hydra', hydra.__version__, '| torch-fidelity', torch_fidelity.__version__)")

echo "== CPU subset of the suite"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest -q -p no:cacheprovider "${CPU_SUBSET[@]}"

echo "== gpu_check.sh --dry-run"
PYTHON=$PY bash scripts/gpu_check.sh --dry-run --report "$VENV/gpu_check_dry_run.txt"
