#!/usr/bin/env bash
# Wheels for a machine without internet that already has PyTorch (a GPU node): the packages of requirements.lock
# that apply to one Python version on manylinux x86-64, except torch, torchvision, triton and the NVIDIA / CUDA
# packages, which come with the node's own torch. Run it where pip reaches a package index, carry the folder to the
# node, and there, in the repository root:
#     python3 -m pip install --no-index --find-links wheelhouse -e '.[test]'
# installs what the node lacks and keeps every package it already has (its torch above all).
#
#   bash scripts/wheelhouse.sh [--python 3.12] [--out wheelhouse] [--missing-only NODE_PACKAGES]
#     --python X.Y          the node's Python (default 3.12); the lock's markers pick the versions for it
#     --out DIR             the folder, emptied first (default wheelhouse/, which git ignores)
#     --missing-only FILE   only the locked packages FILE does not name: FILE is the node's
#                           `python3 -m pip list --format=freeze` (or one name a line); scripts/gpu_node_packages.txt
#                           is our GPU node's. setuptools, the project's build backend, is always included: pip
#                           builds the editable install in an isolated environment that it fills from the folder.
# Binary wheels only, except where a locked version is published as source alone and builds as pure Python
# (antlr4-python3-runtime 4.9.3, which hydra-core pins): that one is built here into a py3-none-any wheel.
# Prints each wheel and the folder's size, and warns when the folder passes 40 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh  # locked_pins, normalise, node_names
PYVER=3.12 OUT=wheelhouse HAVE=""
LIMIT_MB=40
while [ $# -gt 0 ]; do
    case $1 in
        --python) PYVER=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --missing-only) HAVE=$2; shift 2 ;;
        *) echo "wheelhouse.sh: unknown argument '$1' (see the header of scripts/wheelhouse.sh)" >&2; exit 2 ;;
    esac
done
[ -z "$HAVE" ] || [ -f "$HAVE" ] || { echo "wheelhouse.sh: --missing-only: no file '$HAVE'" >&2; exit 2; }
if [ -d "$OUT" ] && find "$OUT" -mindepth 1 ! -name '*.whl' | grep -q .; then
    echo "wheelhouse.sh: $OUT holds more than wheels: not emptying it (name a new folder with --out)" >&2
    exit 2
fi

# manylinux tags up to glibc 2.28 (pip matches each tag exactly): wheels that run on any node from about 2019 on.
PLATFORMS=(manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64)
for n in $(seq 17 28); do PLATFORMS+=("manylinux_2_${n}_x86_64"); done

PINS=$(locked_pins "$PYVER")
SKIP='^(torch|torchvision|triton|nvidia-.*|cuda-.*)$'
HAVE_NAMES=$( [ -z "$HAVE" ] || node_names "$HAVE")
WANT=()
while IFS= read -r pin; do
    name=$(printf '%s' "${pin%%==*}" | normalise)
    [[ $name =~ $SKIP ]] && continue
    if [ "$name" != setuptools ] && grep -qx -- "$name" <<<"$HAVE_NAMES"; then
        continue
    fi
    WANT+=("$pin")
done <<<"$PINS"

rm -rf "$OUT"
mkdir -p "$OUT"
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
PLATFORM_ARGS=()
for p in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$p"); done
echo "wheelhouse: ${#WANT[@]} packages for Python $PYVER, manylinux x86-64${HAVE:+, those $HAVE lacks}, into $OUT/"
# --no-deps (every dependency is a line of the lock) lets pip take a source archive where a version has no wheel.
python3 -m pip download --no-deps --python-version "$PYVER" --implementation cp "${PLATFORM_ARGS[@]}" -d "$OUT" \
    --progress-bar on "${WANT[@]}"
# Source archives: build each into a wheel here, kept only if it is pure Python (a compiled one would be for
# this machine's Python, not the node's).
for sdist in $(find "$OUT" -maxdepth 1 \( -name '*.tar.gz' -o -name '*.zip' \)); do
    python3 -m pip wheel -q --no-deps -w "$BUILD" "$sdist" >/dev/null
    built=$(ls "$BUILD"/*.whl)
    if [[ $built != *-none-any.whl ]]; then
        echo "wheelhouse.sh: $(basename "$sdist") has no wheel for Python $PYVER on manylinux x86-64, and built" \
             "here it gives $(basename "$built"), which would not run there" >&2
        exit 1
    fi
    echo "  $(basename "$sdist"): no wheel published, built $(basename "$built") (pure Python)"
    mv "$built" "$OUT/"
    rm "$sdist"
done

ls -l "$OUT" | awk 'NR > 1 { printf "  %8.1f MB  %s\n", $5 / 1e6, $9 }'
MB=$(du -sm "$OUT" | cut -f1)
echo "wheelhouse: $(ls "$OUT" | wc -l) wheels, ${MB} MB in $OUT/"
if [ "$MB" -ge "$LIMIT_MB" ]; then
    echo "wheelhouse: WARNING: over ${LIMIT_MB} MB. For a node that already has most packages, take only what it" \
         "lacks: --missing-only <its pip list --format=freeze> (our GPU node: scripts/gpu_node_packages.txt)" >&2
fi
