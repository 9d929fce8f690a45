#!/usr/bin/env bash
# Builds .autobahn/venv: a Python 2.7 virtualenv with Autobahn|Testsuite (wstest) from the pins in
# tests/autobahn/requirements-py27.txt. Idempotent: does nothing when the venv exists, was built from the
# same pins and its wstest runs. Prints the path of wstest on its last line. Needs a Python 2.7 interpreter:
# $PYTHON27, else python2.7/python2 on PATH, else pyenv's newest 2.7.x. Takes about 35 s the first time
# (wsaccel and scandir are compiled), under a second after that.
set -euo pipefail
cd "$(dirname "$0")/../.."

here=tests/autobahn
root=.autobahn
venv=$root/venv
stamp=$venv/.pins.sha256
log=$root/setup.log
mkdir -p "$root"

pins_hash() { cat "$here/requirements-py27.txt" "$here/requirements-bootstrap.txt" | sha256sum | cut -d' ' -f1; }

if [[ -f $stamp && $(cat "$stamp") == "$(pins_hash)" ]] && "$venv/bin/wstest" --autobahnversion >/dev/null 2>&1; then
    echo "$venv/bin/wstest"
    exit 0
fi

is_py27() { [[ -x $1 ]] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; }

find_py27() {
    local candidate
    for candidate in "${PYTHON27:-}" "$(command -v python2.7 || true)" "$(command -v python2 || true)"; do
        if [[ -n $candidate ]] && is_py27 "$candidate"; then echo "$candidate"; return 0; fi
    done
    local pyenv_root=${PYENV_ROOT:-}
    if [[ -z $pyenv_root ]] && command -v pyenv >/dev/null 2>&1; then pyenv_root=$(pyenv root); fi
    pyenv_root=${pyenv_root:-$HOME/.pyenv}
    for candidate in $(ls -d "$pyenv_root"/versions/2.7* 2>/dev/null | sort -V -r); do
        if is_py27 "$candidate/bin/python"; then echo "$candidate/bin/python"; return 0; fi
    done
    return 1
}

py27=$(find_py27) || {
    echo "setup.sh: no Python 2.7 found (set PYTHON27, put python2.7 on PATH, or install it with pyenv)" >&2
    exit 1
}

echo "building $venv with $py27 (log: $log)" >&2
: >"$log"
rm -rf "$venv" "$root/bootstrap"
# The pip 2.7 comes with is enough to fetch virtualenv; --target keeps it out of the interpreter's own
# site-packages.
if ! "$py27" -m pip install --disable-pip-version-check --no-warn-script-location -q \
        --target "$root/bootstrap" -r "$here/requirements-bootstrap.txt" >>"$log" 2>&1 \
    || ! PYTHONPATH=$root/bootstrap "$py27" -m virtualenv --no-periodic-update --app-data "$root/app-data" \
        -q "$venv" >>"$log" 2>&1 \
    || ! "$venv/bin/pip" install --disable-pip-version-check -q -r "$here/requirements-py27.txt" >>"$log" 2>&1 \
    || ! "$venv/bin/wstest" --autobahnversion >>"$log" 2>&1; then
    grep -v 'is ignored: it is neither a file nor a directory' "$log" | tail -n 40 >&2
    echo "setup.sh: building $venv failed; the whole log is $log" >&2
    rm -rf "$venv"
    exit 1
fi
pins_hash >"$stamp"
echo "$venv/bin/wstest"
