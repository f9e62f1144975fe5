#!/usr/bin/env bash
# One entry point for a fresh machine: installs what taskomatic needs (system
# packages, a virtualenv with the package and its test tools), then runs
#   ./run.sh demo   the demo on embedded defaults (private PostgreSQL, libvirt test nodes)
#   ./run.sh test   lint, type checks and the whole test suite
# Debian/Ubuntu (apt) and Fedora (dnf) are supported. Extra arguments go to
# `taskomatic demo` or to pytest.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${TASKOMATIC_VENV:-.venv}
PYTHON=${PYTHON:-python3}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Install only what is missing, so a second run costs nothing.
setup_system() {
    local missing=0
    for tool in libvirtd qemu-system-x86_64 pkg-config pg_config gcc ps git rpmbuild rpmlint rpm2cpio cpio \
                systemd-analyze; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing=1
    done
    ls /usr/lib/postgresql/*/bin/initdb /usr/bin/initdb /usr/pgsql-*/bin/initdb >/dev/null 2>&1 || missing=1
    pkg-config --exists libvirt 2>/dev/null || missing=1
    # rpm's Python dependency generator (the RPM tests) runs on the system Python.
    [ -x /usr/bin/python3 ] && { /usr/bin/python3 -c 'import packaging' 2>/dev/null || missing=1; }
    "$PYTHON" -c 'import sysconfig, os, venv; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' \
        2>/dev/null || missing=1
    [ "$missing" -eq 0 ] && return 0
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing system packages with apt-get ..." >&2
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            libvirt-dev pkg-config libvirt-daemon qemu-system-x86 libpq-dev gcc python3-dev python3-venv \
            procps ca-certificates git rpm rpm2cpio cpio rpmlint python3-packaging systemd
        ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
    elif command -v dnf >/dev/null 2>&1; then
        echo "installing system packages with dnf ..." >&2
        as_root dnf install -y libvirt-devel libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 \
            postgresql-server libpq-devel gcc python3-devel pkgconf-pkg-config procps-ng git rpm-build rpmlint \
            cpio systemd systemd-rpm-macros pyproject-rpm-macros
    else
        echo "run.sh: no apt-get or dnf; install libvirt (daemon + headers), qemu-system-x86," \
             "PostgreSQL server binaries, libpq headers, gcc and Python headers yourself" >&2
        exit 1
    fi
}

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    # Reinstall only when the package definition changed.
    local stamp="$VENV/.installed-$(sha1sum setup.py | cut -c1-12)"
    if [ ! -e "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e '.[test,bench]'
        touch "$stamp"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)
        setup_system
        setup_venv
        exec "$VENV/bin/taskomatic" demo "$@"
        ;;
    test)
        setup_system
        setup_venv
        "$VENV/bin/ruff" check taskomatic tests bench
        "$VENV/bin/mypy" taskomatic bench
        exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: ./run.sh demo [demo options] | ./run.sh test [pytest options]" >&2
        exit 2
        ;;
esac
