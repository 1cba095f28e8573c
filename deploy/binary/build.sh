#!/usr/bin/env bash
# Build dist/upgradeproxy: one executable for Linux x86-64 that needs no Python on the target
# (PyInstaller one-file; see docs/deployment.md, "Standalone binary").
#
#   bash deploy/binary/build.sh     # python3 builds dist/upgradeproxy
#   PYTHON=python3.12 DIST_DIR=/tmp/out bash deploy/binary/build.sh
#
# Everything it installs goes into a throw-away venv that is deleted afterwards, and
# PyInstaller's cache lives there too: every build starts from nothing, so a broken build can
# not hide behind a cached one. A missing prerequisite fails at once with one line naming it.
set -euo pipefail
case ${DIST_DIR:-} in "" | /*) ;; *) DIST_DIR=$PWD/$DIST_DIR ;; esac  # relative to the caller
cd "$(dirname "$0")/../.."
ROOT=$PWD
# 6.10 or newer: a frozen program that starts sys.executable gets a sub-process of the same
# bundle (the unpacked files are reused), which is how `workers: N` starts its workers.
PYINSTALLER_SPEC=${PYINSTALLER_SPEC:-pyinstaller>=6.10,<7}
PYTHON=${PYTHON:-python3}
DIST_DIR=${DIST_DIR:-$ROOT/dist}

die() {
    echo "deploy/binary/build.sh: $*" >&2
    exit 1
}

[ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] || die "builds for Linux x86-64 only, not $(uname -sm)"
command -v "$PYTHON" >/dev/null 2>&1 \
    || die "missing: $PYTHON (Python 3.11 or newer; set PYTHON=... to pick another)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "missing: Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "missing: the venv module with ensurepip for $PYTHON (Debian: apt-get install python3-venv)"
# PyInstaller bundles the interpreter's shared library; a static-only build has none.
"$PYTHON" - <<'PY' || die "missing: a shared libpython for $PYTHON (build it with --enable-shared)"
import ctypes.util, os, sys, sysconfig
name = sysconfig.get_config_var("INSTSONAME") or ""
dirs = [sysconfig.get_config_var(v) or "" for v in ("LIBDIR", "LIBPL")]
dirs.append(os.path.join("/usr/lib", sysconfig.get_config_var("MULTIARCH") or ""))
found = any(os.path.exists(os.path.join(d, name)) for d in dirs if d and name)
sys.exit(0 if found or ctypes.util.find_library("python%d.%d" % sys.version_info[:2]) else 1)
PY
for tool in ldd objdump objcopy strip; do
    # ldd lists the libraries to bundle; objdump tells binaries from data; strip halves the
    # size (libpython's symbols); objcopy appends the archive to the bootloader.
    command -v "$tool" >/dev/null 2>&1 \
        || die "missing: $tool (Debian: apt-get install $([ "$tool" = ldd ] && echo libc-bin || echo binutils))"
done
# pip compiles any dependency that has no wheel for this machine (PyYAML's C extension,
# PyInstaller's bootloader); checked here so that its absence is one line, not a compiler log.
command -v "${CC:-cc}" >/dev/null 2>&1 \
    || die "missing: a C compiler (${CC:-cc}; Debian: apt-get install gcc)"

work=$(mktemp -d "${TMPDIR:-/tmp}/upgradeproxy-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PYINSTALLER_CONFIG_DIR="$work/pyinstaller-cache"

"$PYTHON" -m venv "$work/venv"
# A regular (not editable) install, from a copy of the sources: PyInstaller must see the
# package and its data files, and a build/ left in the tree by an earlier install (setuptools
# reuses it, deleted modules included) must not leak into the binary.
mkdir "$work/src"
cp -R pyproject.toml README.md upgradeproxy "$work/src/"
# The runtime dependencies at the versions the release was tested with (requirements.lock).
if ! "$work/venv/bin/python" -m pip install -q --disable-pip-version-check \
        -c requirements.lock "$PYINSTALLER_SPEC" "$work/src" >"$work/pip.log" 2>&1; then
    # pip's last ERROR line is the conclusion ("No matching distribution found for ...").
    why=$(grep -E '^ERROR' "$work/pip.log" | tail -n1 || true)
    why=${why:-$(tail -n1 "$work/pip.log")}
    die "pip could not install what the build needs: $why"
fi

if ! "$work/venv/bin/pyinstaller" --onefile --name upgradeproxy --noconfirm --clean \
        --log-level WARN --strip --collect-data upgradeproxy \
        --distpath "$DIST_DIR" --workpath "$work/build" --specpath "$work" \
        "$ROOT/deploy/binary/entry.py" >"$work/pyinstaller.log" 2>&1; then
    cat "$work/pyinstaller.log" >&2
    die "pyinstaller failed (its log is above)"
fi
echo "built $DIST_DIR/upgradeproxy ($(du -h "$DIST_DIR/upgradeproxy" | cut -f1))"
