#!/bin/bash
# Build cid's Debian packages out of tree: build/deb/{cid-head,cid-node,python3-hostlist}_*.deb
#   packaging/build-debs.sh [OUTDIR]          (make deb)
# Copies the source (tracked and new files, not ignored ones) to OUTDIR/src and runs dpkg-buildpackage there,
# so the working tree gets no build debris. python-hostlist is not in Debian 12: its upstream release is taken
# from PyPI (pip download, checked against a pinned sha256) and built with packaging/python3-hostlist/debian.
# Needs: dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel
#        python3-argparse-manpage python3-shtab and cid's runtime python3-* packages (debian/control).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/build/deb}
case $out in /*) ;; *) out=$(pwd)/$out ;; esac
# Debian's own python3 and tools, never a pyenv or virtualenv one first on PATH.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
unset VIRTUAL_ENV PYTHONPATH PYENV_VERSION || true
HOSTLIST_VERSION=2.3.0
HOSTLIST_SHA256=e1a0b18e525a5fca573cb9862799f11b3f2bd3ba7aec70c4ecd8b95341bb71ea
PIP=${PIP:-}
if [ -z "$PIP" ]; then
  if [ -x "$top/.venv/bin/pip" ]; then PIP="$top/.venv/bin/pip"; else PIP="python3 -m pip"; fi
fi

rm -rf "$out/src" "$out"/*.deb "$out"/*.buildinfo "$out"/*.changes
mkdir -p "$out/src/cid" "$out/src/hostlist"

# cid
cd "$top"
git ls-files -z --cached --others --exclude-standard | \
  while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done | \
  tar --null -T - -cf - | tar -xf - -C "$out/src/cid"
cd "$out/src/cid"
dpkg-buildpackage -us -uc -b >"$out/cid-build.log" 2>&1 || { tail -40 "$out/cid-build.log"; exit 1; }

# python3-hostlist
tarball=python_hostlist-$HOSTLIST_VERSION.tar.gz
cache=$top/build/deb-cache
mkdir -p "$cache"
if ! echo "$HOSTLIST_SHA256  $cache/$tarball" | sha256sum -c --status 2>/dev/null; then
  $PIP download --quiet --no-deps --no-binary :all: --dest "$cache" "python-hostlist==$HOSTLIST_VERSION"
  echo "$HOSTLIST_SHA256  $cache/$tarball" | sha256sum -c --quiet
fi
cp "$cache/$tarball" "$out/src/hostlist/python-hostlist_$HOSTLIST_VERSION.orig.tar.gz"
tar -xzf "$cache/$tarball" -C "$out/src/hostlist"
cp -r "$top/packaging/python3-hostlist/debian" "$out/src/hostlist/python_hostlist-$HOSTLIST_VERSION/"
cd "$out/src/hostlist/python_hostlist-$HOSTLIST_VERSION"
dpkg-buildpackage -us -uc -b >"$out/hostlist-build.log" 2>&1 || { tail -40 "$out/hostlist-build.log"; exit 1; }

mv "$out"/src/*.deb "$out"/src/hostlist/*.deb "$out/"
ls "$out"/*.deb
