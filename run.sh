#!/usr/bin/env bash
# One entry point for a fresh machine: installs what taskomatic needs (system
# packages, a virtualenv with the package and its test tools), then runs
#   ./run.sh demo   the demo on embedded defaults (private PostgreSQL, libvirt test nodes)
#   ./run.sh test   lint, type checks and the whole test suite
#   ./run.sh check  what the two above would install, installing nothing
# Debian/Ubuntu (apt) and Fedora (dnf) are supported. Extra arguments go to
# `taskomatic demo` or to pytest.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${TASKOMATIC_VENV:-.venv}
PYTHON=${PYTHON:-python3}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Each requirement: a check that passes when it is installed, then the apt and dnf
# packages that bring it. Only what fails its check is installed, so a second run
# costs nothing and needs neither network nor sudo.
have_tool() {  # on PATH, or in /usr/sbin where PATH of a non-root user does not reach
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}
have_initdb() {  # Debian: /usr/lib/postgresql/N/bin; Fedora: /usr/bin; PGDG: /usr/pgsql-N/bin
    local path
    for path in /usr/lib/postgresql/*/bin/initdb /usr/bin/initdb /usr/pgsql-*/bin/initdb; do
        [ -x "$path" ] && return 0
    done
    return 1
}
have_python_headers() {  # psycopg2 and libvirt-python build from source in the venv
    "$PYTHON" -c 'import sysconfig, os, venv, ensurepip
assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' 2>/dev/null
}
have_system_python() {  # the RPM tests: rpm's Python dependency generator and setup.py run on it
    # -I: not from the checkout, whose packaging/ directory would pass for the module
    [ -x /usr/bin/python3 ] && /usr/bin/python3 -I -c 'import packaging.version, setuptools' 2>/dev/null
}
have_ca_certificates() {  # pip reaches PyPI over TLS
    [ -e /etc/ssl/certs/ca-certificates.crt ] || [ -e /etc/pki/tls/certs/ca-bundle.crt ]
}
have_rpm_package() { rpm -q "$1" >/dev/null 2>&1; }
package_manager() {  # apt-get (Debian, Ubuntu), else dnf (Fedora), else none
    if command -v apt-get >/dev/null 2>&1; then echo apt-get
    elif command -v dnf >/dev/null 2>&1; then echo dnf
    else echo none
    fi
}

# Prints "CHECK|APT-PACKAGES|DNF-PACKAGES" (packages comma-separated, - for none) for
# every requirement that is missing; prints nothing when all is there.
missing_requirements() {
    local check apt dnf
    while IFS='|' read -r check apt dnf; do
        check=$(echo $check) apt=$(echo $apt) dnf=$(echo $dnf)  # trim the table's padding
        eval "$check" || echo "$check|$apt|$dnf"
    done <<'REQUIREMENTS'
have_tool libvirtd                  | libvirt-daemon           | libvirt-daemon,libvirt-daemon-driver-qemu
have_tool qemu-system-x86_64        | qemu-system-x86          | qemu-system-x86
have_tool pkg-config                | pkg-config               | pkgconf-pkg-config
pkg-config --exists libvirt         | libvirt-dev              | libvirt-devel
have_tool pg_config                 | libpq-dev                | libpq-devel
have_initdb                         | postgresql               | postgresql-server
have_tool gcc                       | gcc                      | gcc
have_python_headers                 | python3-dev,python3-venv | python3-devel
have_ca_certificates                | ca-certificates          | ca-certificates
have_tool ps                        | procps                   | procps-ng
have_tool git                       | git                      | git
have_tool rpmbuild                  | rpm                      | rpm-build
have_tool rpm2cpio                  | rpm2cpio                 | rpm
have_tool cpio                      | cpio                     | cpio
have_tool rpmlint                   | rpmlint                  | rpmlint
have_tool groff                     | groff-base               | groff-base
have_tool man                       | man-db                   | man-db
have_tool systemd-analyze           | systemd                  | systemd
have_system_python                  | python3-packaging,python3-setuptools | python3-packaging,python3-setuptools
REQUIREMENTS
    if [ "$(package_manager)" = dnf ]; then  # the spec's Fedora branch uses Fedora's RPM macros
        have_rpm_package systemd-rpm-macros || echo "have_rpm_package systemd-rpm-macros|-|systemd-rpm-macros"
        have_rpm_package pyproject-rpm-macros || echo "have_rpm_package pyproject-rpm-macros|-|pyproject-rpm-macros"
    fi
}

# The packages that bring the missing requirements, one a line, for this machine's
# package manager (nothing without one).
packages_to_install() {
    local column
    case "$(package_manager)" in
        apt-get) column=2 ;;
        dnf) column=3 ;;
        *) return 0 ;;
    esac
    missing_requirements | cut -d'|' -f"$column" | tr ',' '\n' | { grep -vx -- - || :; } | sort -u
}

# Install only what is missing.
setup_system() {
    local missing packages
    missing=$(missing_requirements)
    [ -z "$missing" ] && return 0
    packages=$(packages_to_install | tr '\n' ' ')
    case "$(package_manager)" in
    apt-get)
        echo "installing system packages with apt-get: $packages" >&2
        as_root apt-get update -q
        # shellcheck disable=SC2086
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages
        ;;
    dnf)
        echo "installing system packages with dnf: $packages" >&2
        # shellcheck disable=SC2086
        as_root dnf install -y $packages
        ;;
    *)
        echo "run.sh: no apt-get or dnf; install these yourself (libvirt daemon and headers, QEMU," \
             "PostgreSQL server binaries, libpq headers, gcc, Python headers, rpm tools):" >&2
        echo "$missing" | cut -d'|' -f1 | sed 's/^/  missing: /' >&2
        exit 1
        ;;
    esac
    missing=$(missing_requirements)
    if [ -n "$missing" ]; then
        echo "run.sh: still missing after installing:" >&2
        echo "$missing" | cut -d'|' -f1 | sed 's/^/  /' >&2
        exit 1
    fi
}

# The venv is (re)installed only when the package definition changed: the stamp
# names a hash of pyproject.toml (and setup.py, where there is one).
venv_stamp() {
    echo "$VENV/.installed-$(cat pyproject.toml setup.py 2>/dev/null | sha1sum | cut -c1-12)"
}

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp
    stamp=$(venv_stamp)
    if [ ! -e "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e '.[test,bench]'
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

# `./run.sh check`: what demo/test would install, installing nothing (no network, no
# sudo). Exit 0 when there is nothing to do, 1 otherwise.
check() {
    local missing status=0
    missing=$(missing_requirements)
    if [ -z "$missing" ]; then
        echo "system: nothing to install"
    else
        status=1
        echo "$missing" | cut -d'|' -f1 | sed 's/^/system: missing: /'
        if [ "$(package_manager)" = none ]; then
            echo "system: no apt-get or dnf: install the missing pieces by hand"
        else
            echo "system: would run: $(package_manager) install" $(packages_to_install)
        fi
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        status=1
        echo "venv $VENV: would be created and the package installed (pip, needs network)"
    elif [ ! -e "$(venv_stamp)" ]; then
        status=1
        echo "venv $VENV: package definition changed: would run pip install -e '.[test,bench]' (needs network)"
    else
        echo "venv $VENV: up to date"
    fi
    return "$status"
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
    check)
        check
        ;;
    *)
        echo "usage: ./run.sh demo [demo options] | ./run.sh test [pytest options] | ./run.sh check" >&2
        exit 2
        ;;
esac
