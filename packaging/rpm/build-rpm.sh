#!/usr/bin/env bash
# Build the taskomatic RPM and source RPM from this checkout with plain rpmbuild.
#
#   packaging/rpm/build-rpm.sh [--worktree] OUTDIR
#
# The tarball is `git archive` of HEAD, and the spec, unit, sysusers and
# configuration files are HEAD's too, so the package is exactly a commit;
# --worktree uses the uncommitted changes to tracked files as well (untracked
# files never go in). OUTDIR receives taskomatic-VERSION-RELEASE.noarch.rpm and
# the .src.rpm; their paths are all that goes to stdout, one per line (rpmbuild's
# log goes to stderr).
#
# Needs git, rpmbuild and python3 with setuptools (Fedora: rpm-build, git,
# python3-devel, systemd-rpm-macros, pyproject-rpm-macros; Debian: rpm, git,
# python3-setuptools). Where rpm's database does not know rpm-build (Debian's
# rpm keeps no record of the system's packages) BuildRequires cannot be checked
# and rpmbuild runs with --nodeps; RPMBUILD_NODEPS=0 or 1 forces the choice.
set -euo pipefail

usage() { echo "usage: $0 [--worktree] OUTDIR" >&2; exit 2; }

worktree=0
while [ $# -gt 0 ]; do
    case "$1" in
        --worktree) worktree=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) usage ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || usage

for tool in git rpmbuild python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$0: $tool not found" >&2; exit 1; }
done

here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
mkdir -p "$1"
out=$(cd "$1" && pwd)

rev=HEAD
if [ "$worktree" -eq 1 ]; then
    # A commit object holding the working tree's tracked changes (no ref, no stash entry).
    stash=$(git -C "$repo" stash create)
    rev=${stash:-HEAD}
elif [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
    echo "$0: note: building HEAD; uncommitted changes are not in the package (--worktree adds them)" >&2
fi

topdir=$(mktemp -d "${TMPDIR:-/tmp}/taskomatic-rpmbuild.XXXXXX")
trap 'rm -rf "$topdir"' EXIT
mkdir -p "$topdir"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}

show() { git -C "$repo" show "$rev:$1"; }
show packaging/rpm/taskomatic.spec >"$topdir/SPECS/taskomatic.spec"
for file in taskomatic.service taskomatic.sysusers taskomatic.conf; do
    show "packaging/rpm/$file" >"$topdir/SOURCES/$file"
done

spec_version=$(awk '$1 == "Version:" { print $2; exit }' "$topdir/SPECS/taskomatic.spec")
code_version=$(show taskomatic/__init__.py | sed -n 's/^__version__ = "\(.*\)"$/\1/p')
if [ "$spec_version" != "$code_version" ]; then
    echo "$0: spec Version $spec_version differs from taskomatic.__version__ $code_version" >&2
    exit 1
fi
git -C "$repo" archive --format=tar.gz --prefix="taskomatic-$spec_version/" \
    -o "$topdir/SOURCES/taskomatic-$spec_version.tar.gz" "$rev"

nodeps=()
case "${RPMBUILD_NODEPS:-auto}" in
    1) nodeps=(--nodeps) ;;
    0) ;;
    *) rpm -q rpm-build >/dev/null 2>&1 || nodeps=(--nodeps) ;;
esac
[ ${#nodeps[@]} -eq 0 ] || echo "$0: rpm's database does not list rpm-build: building with --nodeps" >&2

# Reproducible: file times and build time come from the commit.
SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct "$rev")
export SOURCE_DATE_EPOCH
rpmbuild -ba "${nodeps[@]}" \
    --define "_topdir $topdir" \
    --define "use_source_date_epoch_as_buildtime 1" \
    --define "clamp_mtime_to_source_date_epoch 1" \
    "$topdir/SPECS/taskomatic.spec" >&2

find "$topdir/RPMS" "$topdir/SRPMS" -name '*.rpm' -exec cp -p {} "$out/" \;
find "$topdir/RPMS" "$topdir/SRPMS" -name '*.rpm' -printf "$out/%f\n" | sort
