#!/usr/bin/env bash
# Makes (once) a virtualenv with paramd's Python package, torch and the test
# tools, and prints the path of its python on stdout.
#
#   client/python/ci/venv.sh [DIR]     # DIR: default $CARGO_TARGET_DIR/python or target/python
#
# The virtualenv is keyed by a hash of ci/requirements.txt, so a warm run
# installs nothing; other keys' virtualenvs are removed when a new one is
# made. The package itself is reinstalled when its sources or the proto
# change.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PKG=$(dirname "$HERE")
REPO=$(cd "$PKG/../.." && pwd)
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

# The package is rebuilt when its Python or Rust sources change, or those of
# the crates its native core is built from.
PKGKEY=$( (cd "$REPO" && git ls-files -z -co --exclude-standard -- client/python/paramd client/python/src \
    client/python/Cargo.toml client/python/pyproject.toml client/python/README.md client/src client/Cargo.toml \
    proto Cargo.toml Cargo.lock 2>/dev/null | sort -z | xargs -0 sha256sum 2>/dev/null) | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.paramd" 2>/dev/null || true)" != "$PKGKEY" ]; then
    echo "venv.sh: building the paramd package (its native core with cargo) into $VENV" >&2
    # maturin's cargo build goes to its own target directory: not the one a
    # running `cargo test` holds, and kept between runs so a rebuild is
    # incremental.
    PATH="$VENV/bin:$PATH" CARGO_TARGET_DIR="$ROOT/cargo" "$VENV/bin/python" -m pip install --quiet \
        --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall "$PKG" >&2
    echo "$PKGKEY" >"$VENV/.paramd"
fi
echo "$VENV/bin/python"
