#!/usr/bin/env bash
# Installs Debian's `chromium` package (headless use only) for the test that
# opens paramd's status page in a real browser, unless it is on PATH
# already. Idempotent; needs root or passwordless sudo, and apt's
# configured sources.
set -euo pipefail

if command -v chromium >/dev/null; then
    exit 0
fi

sudo=""
if [ "$(id -u)" != 0 ]; then
    sudo="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
# Every apt-get of the tests takes turns (see install-prometheus.sh).
apt=(flock -w 900 /tmp/paramd-apt.lock apt-get -o DPkg::Lock::Timeout=900)
install() { $sudo "${apt[@]}" install -y --no-install-recommends chromium; }
if ! install; then
    $sudo "${apt[@]}" update
    install
fi
command -v chromium >/dev/null
