#!/usr/bin/env bash
# Builds paramd's image without a container registry.
#
#   deploy/build-image.sh [--profile release|dev|NAME] [--bin-dir DIR] [--tag TAG]
#
# `docker build -f deploy/Dockerfile .` needs the Rust and Debian base images
# from a registry. This script needs neither:
#
#   1. The runtime base, debian:bookworm-slim, is made locally when the engine
#      lacks it: a minbase debootstrap of the same Debian release into a
#      temporary folder (debootstrap's default mirror; debootstrap itself is
#      installed with apt-get when missing), imported under that same tag.
#      Once the image exists this step is skipped.
#   2. paramd and paramctl are built on the host with cargo (--profile,
#      release by default) or taken from --bin-dir (e.g. the debug binaries
#      `cargo test` already built). The host must not have a newer glibc than
#      bookworm's 2.36; the smoke test at the end catches it if it has.
#   3. The image is built from a generated Dockerfile: a `build` stage that
#      only copies those binaries to /out, then the runtime stage of
#      deploy/Dockerfile, copied line for line. Users and this script build
#      the same runtime stage.
#
# Needs docker (the legacy builder is enough: no BuildKit feature is used)
# and, to make the base image, root. Work files live under
# $CARGO_TARGET_DIR/paramd-image (target/paramd-image by default).
set -euo pipefail

die() {
    echo "build-image.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
}

profile=release
bin_dir=
tag=paramd:latest
while [[ $# -gt 0 ]]; do
    case "$1" in
    --profile | --bin-dir | --tag)
        [[ $# -ge 2 ]] || die "$1 needs a value"
        case "$1" in
        --profile) profile=$2 ;;
        --bin-dir) bin_dir=$2 ;;
        --tag) tag=$2 ;;
        esac
        shift 2
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        echo "build-image.sh: unknown argument '$1'" >&2
        exit 64
        ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
work=$target/paramd-image
base=debian:bookworm-slim
release=bookworm
# The first line of the runtime stage in deploy/Dockerfile.
marker='FROM debian:bookworm-slim AS runtime'

command -v docker >/dev/null || die "docker is not installed"
timeout 60 docker version --format '{{.Server.Version}}' >/dev/null ||
    die "the docker engine does not answer (is the daemon running?)"
mkdir -p "$work"
# One build at a time per target dir: two debootstraps or two imports under
# one tag would race.
exec 9>"$work/lock"
flock -w 1200 9 || die "another build-image.sh still holds $work/lock after 20 minutes"

tmp=$(mktemp -d "$work/tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

ensure_base() {
    if docker image inspect "$base" >/dev/null 2>&1; then
        echo "build-image.sh: $base is present"
        return
    fi
    [[ $(id -u) == 0 ]] || die "$base is missing and making it (debootstrap) needs root"
    if ! command -v debootstrap >/dev/null; then
        echo "build-image.sh: installing debootstrap"
        # apt's lists may be missing or stale on a new machine.
        # Another installer (the tests install Prometheus meanwhile) may
        # be running: take turns with it (tests/scripts/install-prometheus.sh
        # uses the same lock file) and wait for dpkg's lock rather than fail.
        local apt=(flock -w 900 /tmp/paramd-apt.lock apt-get -o DPkg::Lock::Timeout=900)
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends debootstrap ||
            { "${apt[@]}" update && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends debootstrap; } ||
            die "cannot install debootstrap with apt-get"
    fi
    local rootfs=$tmp/rootfs
    echo "build-image.sh: making $base with debootstrap (minbase $release)"
    debootstrap --variant=minbase "$release" "$rootfs" >"$tmp/debootstrap.log" 2>&1 || {
        tail -n 30 "$tmp/debootstrap.log" >&2
        die "debootstrap of $release failed (log above)"
    }
    # What Debian's slim images leave out: package lists, downloaded
    # packages, documentation and man pages.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
    tar --numeric-owner -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
        docker import --change 'CMD ["bash"]' \
            --message "debootstrap --variant=minbase $release (deploy/build-image.sh)" - "$base" >/dev/null ||
        die "docker import of the $release root filesystem failed"
    echo "build-image.sh: imported $base"
}

binaries() {
    if [[ -z $bin_dir ]]; then
        local dir
        case "$profile" in
        dev | test) dir=debug ;;
        bench) dir=release ;;
        *) dir=$profile ;;
        esac
        echo "build-image.sh: cargo build --profile $profile"
        (cd "$root" && cargo build --locked --profile "$profile" -p paramd -p paramd-client --bins) ||
            die "cargo build --profile $profile failed"
        bin_dir=$target/$dir
    fi
    mkdir -p "$tmp/context/out"
    local b
    for b in paramd paramctl; do
        [[ -x $bin_dir/$b ]] || die "$bin_dir/$b is missing (build it, or pass another --bin-dir)"
        # The same treatment as the build stage of deploy/Dockerfile.
        objcopy --strip-debug "$bin_dir/$b" "$tmp/context/out/$b" || die "cannot copy $bin_dir/$b"
    done
}

dockerfile() {
    local n
    n=$(grep -cxF "$marker" "$root/deploy/Dockerfile" || true)
    [[ $n == 1 ]] || die "deploy/Dockerfile must have the line '$marker' exactly once (found $n)"
    {
        echo "# Generated by deploy/build-image.sh: host-built binaries, then"
        echo "# deploy/Dockerfile's runtime stage unchanged."
        echo "FROM scratch AS build"
        echo "LABEL io.paramd.build-image.stage=binaries"
        echo "COPY out/ /out/"
        sed -n "/^${marker}\$/,\$p" "$root/deploy/Dockerfile"
    } >"$tmp/context/Dockerfile"
}

ensure_base
binaries
dockerfile
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
echo "build-image.sh: building $tag"
docker build --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    -t "$tag" "$tmp/context" >"$tmp/build.log" 2>&1 || {
    cat "$tmp/build.log" >&2
    die "docker build of $tag failed (log above)"
}
# The legacy builder keeps the binaries stage as an untagged image; it is
# only a copy of them.
docker image prune -f --filter label=io.paramd.build-image.stage=binaries >/dev/null || true
# The binaries run on the image's glibc.
got=$(timeout 60 docker run --rm --entrypoint paramd "$tag" --version) ||
    die "paramd does not run in $tag (a host glibc newer than $release's?)"
echo "build-image.sh: built $tag ($got)"
