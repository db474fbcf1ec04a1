#!/usr/bin/env bash
# Installs Debian's `prometheus` package (the server and promtool) for the
# tests that scrape a live paramd, unless both are on PATH already.
# Idempotent; needs root or passwordless sudo, and apt's configured sources.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi

sudo=""
if [ "$(id -u)" != 0 ]; then
    sudo="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
# The package would start a system service; the tests start their own
# server, so service starts are refused while installing.
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [ -n "$created_policy" ]; then $sudo rm -f "$policy"; fi; }
trap cleanup EXIT

# Tests install packages side by side (this, and debootstrap for the
# Docker base image): every apt-get of ours takes turns (apt's own lock on
# its lists fails at once rather than waiting), and waits for dpkg's lock.
apt=(flock -w 900 /tmp/paramd-apt.lock apt-get -o DPkg::Lock::Timeout=900)
install() { $sudo "${apt[@]}" install -y --no-install-recommends prometheus; }
if ! install; then
    $sudo "${apt[@]}" update
    install
fi
command -v prometheus >/dev/null && command -v promtool >/dev/null
