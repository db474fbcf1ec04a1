#!/usr/bin/env bash
# Makes (once) a virtualenv with paramd's Python package, torch and the test
# tools, and prints the path of its python on stdout.
#
#   client/python/ci/venv.sh [DIR]     # DIR: default $CARGO_TARGET_DIR/python or target/python
#
# The virtualenv is keyed by a hash of ci/requirements.txt, so a warm run
# installs nothing; other keys' virtualenvs are removed when a new one is
# made. The package itself is reinstalled when its sources or the proto
# change (built from a copy, so the work tree gets no build/ or egg-info).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PKG=$(dirname "$HERE")
REPO=$(cd "$PKG/../.." && pwd)
PROTO=$REPO/proto/proto/paramd/v1/paramd.proto
ROOT=${1:-${CARGO_TARGET_DIR:-$REPO/target}/python}
PYTHON=${PYTHON:-python3}
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)

# One installer at a time (two test binaries may start together).
exec 9>"$ROOT/.lock"
flock -w 1800 9

KEY=$( (cat "$HERE/requirements.txt"; "$PYTHON" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
VENV=$ROOT/venv-$KEY
if [ ! -f "$VENV/.complete" ]; then
    echo "venv.sh: installing $VENV (torch and its CUDA packages: a few minutes)" >&2
    rm -rf "$VENV"
    for old in "$ROOT"/venv-*; do
        [ -e "$old" ] && rm -rf "$old"
    done
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt" >&2
    touch "$VENV/.complete"
fi

PKGKEY=$( (cd "$PKG" && find paramd setup.py pyproject.toml README.md -type f \
    ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum; sha256sum "$PROTO") |
    sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.paramd" 2>/dev/null || true)" != "$PKGKEY" ]; then
    echo "venv.sh: installing the paramd package into $VENV" >&2
    SRC=$(mktemp -d)
    trap 'rm -rf "$SRC"' EXIT
    # The same relative layout as the repository: setup.py finds the proto
    # at ../../proto/proto.
    mkdir -p "$SRC/client/python" "$SRC/proto/proto/paramd/v1"
    cp -r "$PKG/paramd" "$PKG/setup.py" "$PKG/pyproject.toml" "$PKG/README.md" "$SRC/client/python/"
    cp "$PROTO" "$SRC/proto/proto/paramd/v1/"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation \
        --no-deps --force-reinstall "$SRC/client/python" >&2
    echo "$PKGKEY" >"$VENV/.paramd"
fi
echo "$VENV/bin/python"
