# Sourced by scripts/test.sh and scripts/quickstart.sh: make a virtual environment and install the project into it.
#   setup_env .venv locked [extra]   the exact set in requirements.lock (what the suite last passed on), then the
#                                    project itself without dependencies
#   setup_env .venv-latest latest    the newest versions pyproject's ranges allow (torch / torchvision stay pinned)
# Sets PY to the environment's python.
#   tools_uv                         uv in .venv-tools (a tool here, not a dependency: lock.sh, wheelhouse.sh); sets UV
#   locked_pins 3.12                 the lock's name==version lines for that Python on Linux x86-64
#   normalise < names                package names in PEP 503 form (Foo_Bar.baz -> foo-bar-baz)
#   node_names FILE                  the names in a `pip list --format=freeze` file (or one name a line), normalised
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

tools_uv() {
    if [ ! -x .venv-tools/bin/uv ]; then
        python3 -m venv .venv-tools
        .venv-tools/bin/python -m pip install -q uv
    fi
    UV=.venv-tools/bin/uv
}

locked_pins() {  # the lock's markers evaluated by uv; --no-deps: the lines as they are, nothing re-resolved
    tools_uv
    "$UV" pip compile requirements.lock --no-deps --python-version "$1" --python-platform x86_64-manylinux_2_28 \
        --no-python-downloads --no-header --no-annotate --quiet
}

normalise() { tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g'; }

node_names() { sed -E 's/#.*//; s/[ =<>;[].*//' "$1" | grep -v '^$' | normalise; }
