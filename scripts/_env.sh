# Sourced by scripts/test.sh and scripts/quickstart.sh: make a virtual environment and install the project into it.
#   setup_env .venv locked [extra]   the exact set in requirements.lock (what the suite last passed on), then the
#                                    project itself without dependencies
#   setup_env .venv-latest latest    the newest versions pyproject's ranges allow (torch / torchvision stay pinned)
# Sets PY to the environment's python.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)  # pinned together; keep in step with scripts/lock.sh

setup_env() {
    local dir=$1 mode=$2 extra=${3:-}
    if [ ! -x "$dir/bin/python" ]; then
        python3 -m venv "$dir"
    fi
    PY=$dir/bin/python
    if [ "$mode" = locked ]; then
        "$PY" -m pip install -q -r requirements.lock
        "$PY" -m pip install -q --no-deps -e ".$extra"
    else
        "$PY" -m pip install -q "${TORCH_PINS[@]}"
        "$PY" -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" "${TORCH_PINS[@]}"
    fi
    "$PY" - <<'PY'
from importlib.metadata import version
print("environment:", ", ".join(f"{p} {version(p)}" for p in
      ("torch", "accelerate", "transformers", "torch-fidelity", "hydra-core", "numpy")))
PY
}
