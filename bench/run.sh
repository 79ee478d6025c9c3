#!/usr/bin/env bash
# The imgproxy benchmark in one command: installs what it needs (nginx, wrk and
# curl from Debian; the Python requirements with pip), then runs bench/run.py.
#   bench/run.sh            full run (about 5 minutes), writes bench/RESULTS.md
#   bench/run.sh --quick    smoke test, a few seconds per measurement
#   bench/run.sh --help     every option
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
if ((${#need[@]})); then
    SUDO=
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "bench: installing ${need[*]} with apt-get" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
if ! "$PYTHON" -c 'import aiohttp, aiosqlite, PIL' >/dev/null 2>&1; then
    echo "bench: installing requirements.txt with pip" >&2
    "$PYTHON" -m pip install -q -r requirements.txt >&2
fi
case " $* " in
    *" --profile "*)
        command -v py-spy >/dev/null 2>&1 || "$PYTHON" -m pip install -q py-spy >&2 ;;
esac
exec "$PYTHON" bench/run.py "$@"
