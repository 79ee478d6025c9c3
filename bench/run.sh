#!/usr/bin/env bash
# The imgproxy benchmark in one command: installs what it needs (nginx, wrk and
# curl from Debian; the Python requirements with pip, into a venv when the
# system Python is externally managed), then runs bench/run.py.
#   bench/run.sh            full run (6-8 minutes), writes bench/RESULTS.md
#   bench/run.sh --quick    smoke test, a few seconds per measurement
#   bench/run.sh --help     every option
# Environment: PYTHON (default python3), BENCH_VENV (default /tmp/imgproxy-bench/venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${BENCH_VENV:-/tmp/imgproxy-bench/venv}
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
apt_updated=
apt_install() {
    echo "bench: installing $* with apt-get" >&2
    if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >&2
}

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
if ((${#need[@]})); then apt_install "${need[@]}"; fi

if ! "$PYTHON" -c 'import aiohttp, aiosqlite, PIL' >/dev/null 2>&1; then
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import aiohttp, aiosqlite, PIL' >/dev/null 2>&1; then
        PYTHON=$VENV/bin/python
    elif "$PYTHON" -m pip install -q -r requirements.txt >&2 2>/dev/null; then
        :
    else
        # Debian's own Python refuses system-wide pip installs (PEP 668): use a venv.
        echo "bench: installing requirements.txt into $VENV" >&2
        "$PYTHON" -m venv "$VENV" >/dev/null 2>&1 || { apt_install python3-venv; "$PYTHON" -m venv "$VENV"; }
        "$VENV/bin/python" -m pip install -q -r requirements.txt >&2
        PYTHON=$VENV/bin/python
    fi
fi
case " $* " in
    *" --profile "*)
        pybin=$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')
        PATH=$pybin:$PATH
        command -v py-spy >/dev/null 2>&1 || "$PYTHON" -m pip install -q py-spy >&2
        ;;
esac
exec "$PYTHON" bench/run.py "$@"
