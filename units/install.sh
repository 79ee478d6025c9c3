#!/usr/bin/env bash
# Install or upgrade imgproxy as a systemd service on a Debian/Ubuntu machine.
# Idempotent: a second run with nothing new changes no file and restarts nothing.
# Run `units/install.sh --help` for the options and the environment it reads.
set -euo pipefail

PROG=install.sh
SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The units name these paths, so they are fixed; DESTDIR only relocates them.
PREFIX=/opt/imgproxy
CONF_DIR=/etc/imgproxy
CONFIG=$CONF_DIR/config.json
DATA_DIR=/var/lib/imgproxy
UNIT_DIR=/etc/systemd/system
SERVICE_USER=imgproxy
SERVICE=imgproxy.service
CLEANUP_SERVICE=imgproxy-cleanup.service
TIMER=imgproxy-cleanup.timer
PROGRAM_FILES=(imgproxy.py cleanup.py client.py)

usage() {
    cat <<EOF
Usage: sudo units/install.sh [--timer | --no-timer] [--no-deps] [--no-wait]

Installs imgproxy as a systemd service, or upgrades it when run again after
'git pull'. Kept across runs: /etc/imgproxy/config.json and /var/lib/imgproxy.

  program   $PREFIX/{imgproxy.py,cleanup.py,client.py,requirements.txt}
  venv      $PREFIX/venv (requirements.txt installed with pip)
  config    $CONFIG (only when absent: the repository's config.json with
            server.data_dir=$DATA_DIR, server.host=127.0.0.1 and a new random
            password for every user that has a plain password)
  data      $DATA_DIR (created by systemd, StateDirectory=imgproxy)
  units     $UNIT_DIR/{$SERVICE,$CLEANUP_SERVICE,$TIMER}
  account   system user '$SERVICE_USER' (created when missing)

Then it enables and starts (or, after an upgrade, restarts) $SERVICE,
waits for /healthz and prints the URL and the next steps.

Options:
  --timer      also enable $TIMER (daily cleanup at cleanup.cleanup_time)
               and set cleanup.enable=false in the config, so the server's
               in-process schedule and the timer never both run
  --no-timer   disable that timer again and set cleanup.enable=true
               (without either option an enabled timer stays enabled)
  --no-deps    do not run pip (same as PIP_INSTALL=0): the venv must already
               have the requirements, e.g. VENV_OPTS=--system-site-packages
  --no-wait    do not wait for /healthz
  -h, --help   show this help

Environment:
  DESTDIR=DIR      stage everything under DIR instead of /: no root needed, no
                   useradd/chown, and systemctl is skipped unless SYSTEMCTL is
                   set; the /healthz wait is skipped unless HEALTH_URL is set
  SYSTEMCTL=CMD    the systemctl to run (default: systemctl), e.g. a fake that
                   records its arguments; called as CMD VERB UNIT
  PYTHON=PATH      the Python (>= 3.10) for the venv and for editing the
                   config (default: python3); the config is read by the
                   venv's Python with 'imgproxy.py check-config'
  PIP_INSTALL=0    as --no-deps; the venv is then made without pip
  VENV_OPTS=OPTS   extra 'python -m venv' options (e.g. --system-site-packages)
  HEALTH_URL=URL   where to wait for the server (default: from the config's
                   server.host and server.port, http://127.0.0.1:8000/healthz)
  HEALTH_TIMEOUT=S seconds to wait for /healthz (default: 30)
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

TIMER_WANTED=keep   # keep | yes | no
WAIT=1
while (($#)); do
    case $1 in
        --timer) TIMER_WANTED=yes ;;
        --no-timer) TIMER_WANTED=no ;;
        --no-deps) PIP_INSTALL=0 ;;
        --no-wait) WAIT=0 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

DESTDIR=${DESTDIR:-}
if [[ -n $DESTDIR ]]; then
    DESTDIR=$(realpath -m -- "$DESTDIR")
fi
PYTHON=${PYTHON:-python3}
PIP_INSTALL=${PIP_INSTALL:-1}
VENV_OPTS=${VENV_OPTS:-}
HEALTH_URL=${HEALTH_URL:-}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-30}
if [[ -n ${SYSTEMCTL:-} ]]; then
    read -r -a SYSTEMCTL_CMD <<<"$SYSTEMCTL"
elif [[ -n $DESTDIR ]]; then
    SYSTEMCTL_CMD=()
else
    SYSTEMCTL_CMD=(systemctl)
fi
if [[ -n $DESTDIR && -z $HEALTH_URL ]]; then
    WAIT=0
fi

# ---------------------------------------------------------------- helpers

# install_file SRC DEST MODE: replace DEST only when its content differs, so that
# a re-run leaves every file (and its mtime) alone. Succeeds only if DEST changed.
install_file() {
    local src=$1 dest=$2 mode=$3 tmp verb=installed
    if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
        [[ $(stat -c %a "$dest") == "${mode#0}" ]] || chmod "$mode" "$dest"
        return 1
    fi
    # Write beside the target, then rename: a running server or systemd never
    # sees a half-written file.
    [[ ! -e $dest ]] || verb=updated
    tmp=$(mktemp "$dest.new.XXXXXX")
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
    say "$verb ${dest#"$DESTDIR"}"
}

run_systemctl() {
    say "systemctl $*"
    "${SYSTEMCTL_CMD[@]}" "$@"
}

service_failed() {
    if [[ -z $DESTDIR ]] && command -v journalctl >/dev/null; then
        journalctl -u "$SERVICE" -n 15 --no-pager -o cat >&2 || true
    fi
    die "imgproxy.service did not start; fix the cause (often $CONFIG) and run this again. Logs: journalctl -u imgproxy -n 50 --no-pager"
}

unit_enabled() { "${SYSTEMCTL_CMD[@]}" is-enabled --quiet "$1" >/dev/null 2>&1; }
unit_active() { "${SYSTEMCTL_CMD[@]}" is-active --quiet "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- checks

[[ -n $DESTDIR || $EUID -eq 0 ]] || die "run as root: sudo $0 (or DESTDIR=DIR to stage)"
for f in imgproxy.py config.json requirements.txt units/$SERVICE units/$CLEANUP_SERVICE units/$TIMER; do
    [[ -f $SRC_DIR/$f ]] || die "$SRC_DIR/$f is missing: run this script from a complete checkout"
done

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: apt-get install python3 python3-venv"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "imgproxy needs Python >= 3.10, $PYTHON is $("$PYTHON" -V 2>&1); install a newer one and set PYTHON=/path/to/python3.x"
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# ---------------------------------------------------------------- account

if [[ -z $DESTDIR ]]; then
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "imgproxy image service" "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    fi
else
    say "DESTDIR set: skipping useradd and chown"
fi

# ---------------------------------------------------------------- venv

RESTART_NEEDED=0
ACTION=
mkdir -p "$DESTDIR$PREFIX"
VENV=$DESTDIR$PREFIX/venv
venv_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
VENV_CREATED=0
if [[ $venv_version != "$PY_VERSION" ]]; then
    # Missing, broken, or made by a Python that a dist-upgrade replaced.
    [[ -z $venv_version ]] || say "venv is Python $venv_version, $PYTHON is $PY_VERSION: recreating it"
    rm -rf "$VENV"
    venv_args=()
    read -r -a venv_args <<<"$VENV_OPTS"
    if [[ $PIP_INSTALL == 0 ]]; then
        venv_args+=(--without-pip)
    elif ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
        if [[ -z $DESTDIR ]] && command -v apt-get >/dev/null; then
            say "installing python3-venv (needed for the venv)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv ||
                { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; }
        else
            die "$PYTHON cannot make a venv with pip: apt-get install python3-venv"
        fi
    fi
    "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
    say "created venv $PREFIX/venv (Python $PY_VERSION)"
    VENV_CREATED=1
    RESTART_NEEDED=1
fi

REQUIREMENTS=$DESTDIR$PREFIX/requirements.txt
if [[ $PIP_INSTALL != 0 ]] && { ((VENV_CREATED)) || ! cmp -s "$SRC_DIR/requirements.txt" "$REQUIREMENTS"; }; then
    say "installing requirements.txt into the venv"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$SRC_DIR/requirements.txt" ||
        die "pip install failed (see above); the program was not replaced and nothing was restarted"
elif [[ $PIP_INSTALL == 0 ]]; then
    say "skipping pip install (--no-deps / PIP_INSTALL=0)"
fi
# The copy records what the venv holds: it is written only after pip succeeded.
if install_file "$SRC_DIR/requirements.txt" "$REQUIREMENTS" 0644; then
    RESTART_NEEDED=1
fi
"$VENV/bin/python" -c 'import aiohttp, aiosqlite, PIL' 2>/dev/null ||
    die "the venv $PREFIX/venv lacks aiohttp, aiosqlite or Pillow (pip install skipped or failed)"

# ---------------------------------------------------------------- program

# After the venv: if pip fails, the old program and packages are still in place.
for f in "${PROGRAM_FILES[@]}"; do
    if [[ -f $SRC_DIR/$f ]] && install_file "$SRC_DIR/$f" "$DESTDIR$PREFIX/$f" 0644; then
        RESTART_NEEDED=1
    fi
done

# ---------------------------------------------------------------- config

mkdir -p "$DESTDIR$CONF_DIR"
chmod 0750 "$DESTDIR$CONF_DIR"
FRESH_CONFIG=0
if [[ ! -e $DESTDIR$CONFIG ]]; then
    tmp=$(mktemp "$DESTDIR$CONFIG.new.XXXXXX")
    # Behind a reverse proxy on loopback, with data where the unit allows writes,
    # and without the example password anybody could read in the repository.
    "$PYTHON" - "$SRC_DIR/config.json" "$tmp" "$DATA_DIR" <<'PY'
import json, secrets, sys
src, dest, data_dir = sys.argv[1:]
with open(src, encoding="utf-8") as f:
    config = json.load(f)
server = config.setdefault("server", {})
server["data_dir"] = data_dir
server["host"] = "127.0.0.1"
new_passwords = {}
for user in config.get("users") or []:
    if "password" in user:
        user["password"] = new_passwords[user.get("username")] = secrets.token_urlsafe(12)
client = config.get("client")
if isinstance(client, dict) and client.get("username") in new_passwords:
    client["password"] = new_passwords[client["username"]]
with open(dest, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
    f.write("\n")
for name, password in new_passwords.items():
    print(f"  user {name!r}: password {password}")
PY
    chmod 0640 "$tmp"
    mv -f "$tmp" "$DESTDIR$CONFIG"
    say "installed $CONFIG (new random passwords above; they are also in that file)"
    FRESH_CONFIG=1
    RESTART_NEEDED=1
fi
if [[ -z $DESTDIR ]]; then
    # The service reads the config through its group; root keeps ownership.
    [[ $(stat -c %G "$CONF_DIR") == "$SERVICE_USER" ]] || chgrp "$SERVICE_USER" "$CONF_DIR"
    if [[ $(stat -c %G "$CONFIG") != "$SERVICE_USER" ]]; then
        chgrp "$SERVICE_USER" "$CONFIG"
        chmod g+r "$CONFIG"
        ((FRESH_CONFIG)) || say "made $CONFIG readable by group $SERVICE_USER"
    fi
fi

# check_config ARGS...: the server's own config reader (same defaults, same rules);
# a broken config stops the install with the server's one-line error.
check_config() {
    "$VENV/bin/python" "$DESTDIR$PREFIX/imgproxy.py" check-config --config "$DESTDIR$CONFIG" "$@" ||
        die "fix $CONFIG and run again"
}

# set_cleanup_enable true|false: switch the in-process schedule, keeping the rest.
# Succeeds only if the config changed.
set_cleanup_enable() {
    local current
    current=$(check_config --print cleanup.enable) || exit 1
    [[ $current != "$1" ]] || return 1
    "$PYTHON" - "$DESTDIR$CONFIG" "$1" <<'PY'
import json, os, sys
path, value = sys.argv[1], sys.argv[2] == "true"
with open(path, encoding="utf-8") as f:
    config = json.load(f)
config.setdefault("cleanup", {})["enable"] = value
tmp = path + ".new"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
    f.write("\n")
st = os.stat(path)
os.chmod(tmp, st.st_mode & 0o7777)
os.chown(tmp, st.st_uid, st.st_gid)
os.replace(tmp, path)
PY
}

if [[ $TIMER_WANTED == keep && ${#SYSTEMCTL_CMD[@]} -gt 0 ]] && unit_enabled "$TIMER"; then
    TIMER_WANTED=yes
fi
if [[ $TIMER_WANTED == yes ]] && set_cleanup_enable false; then
    say "set cleanup.enable=false in $CONFIG: $TIMER runs the cleanup instead"
    RESTART_NEEDED=1
elif [[ $TIMER_WANTED == no ]] && set_cleanup_enable true; then
    say "set cleanup.enable=true in $CONFIG: the server runs the cleanup itself again"
    RESTART_NEEDED=1
fi

# One read of the values the rest needs, by the server's own config reader
# (imgproxy.py check-config: same defaults, same rules); a broken config stops
# here with the server's one-line error.
config_values=$(check_config --print local_url cleanup.cleanup_time base_url example_password cleanup.enable \
    server.data_dir server.host listen_problem) || exit 1
mapfile -t values <<<"$config_values"
LOCAL_URL=${values[0]} CLEANUP_TIME=${values[1]} PUBLIC_URL=${values[2]} EXAMPLE_PASSWORD=${values[3]}
CLEANUP_ENABLED=${values[4]} CONFIG_DATA_DIR=${values[5]} CONFIG_HOST=${values[6]} LISTEN_PROBLEM=${values[7]:-}
CONFIG_WARNING=
# A relative data_dir is resolved beside the staged config, hence the DESTDIR strip.
CONFIG_DATA_DIR=${CONFIG_DATA_DIR#"$DESTDIR"}
if [[ $CONFIG_DATA_DIR != "$DATA_DIR" && $CONFIG_DATA_DIR != "$DATA_DIR"/* ]]; then
    CONFIG_WARNING="server.data_dir is $CONFIG_DATA_DIR: the unit only allows writes under $DATA_DIR"
elif [[ -n $LISTEN_PROBLEM ]]; then
    CONFIG_WARNING="server.host is $CONFIG_HOST and the server refuses to start: $LISTEN_PROBLEM"
fi
[[ -z $CONFIG_WARNING ]] || say "warning: $CONFIG_WARNING"

# ---------------------------------------------------------------- units

UNITS_CHANGED=0
mkdir -p "$DESTDIR$UNIT_DIR"
if install_file "$SRC_DIR/units/$SERVICE" "$DESTDIR$UNIT_DIR/$SERVICE" 0644; then
    UNITS_CHANGED=1
    RESTART_NEEDED=1
fi
if install_file "$SRC_DIR/units/$CLEANUP_SERVICE" "$DESTDIR$UNIT_DIR/$CLEANUP_SERVICE" 0644; then
    UNITS_CHANGED=1
fi
timer_src=$(mktemp)
trap 'rm -f "$timer_src"' EXIT
sed "s/^OnCalendar=.*/OnCalendar=*-*-* $CLEANUP_TIME/" "$SRC_DIR/units/$TIMER" >"$timer_src"
TIMER_CHANGED=0
if install_file "$timer_src" "$DESTDIR$UNIT_DIR/$TIMER" 0644; then
    UNITS_CHANGED=1
    TIMER_CHANGED=1
fi

# ---------------------------------------------------------------- systemd

if ((${#SYSTEMCTL_CMD[@]} == 0)); then
    say "DESTDIR set and no SYSTEMCTL: not enabling or starting anything"
else
    if ((UNITS_CHANGED)); then
        run_systemctl daemon-reload
    fi
    unit_enabled "$SERVICE" || run_systemctl enable "$SERVICE"
    # After a crash loop systemd refuses to start the unit until told to forget it.
    if "${SYSTEMCTL_CMD[@]}" is-failed --quiet "$SERVICE" >/dev/null 2>&1; then
        run_systemctl reset-failed "$SERVICE"
    fi
    if ! unit_active "$SERVICE"; then
        run_systemctl start "$SERVICE" || service_failed
        ACTION=started
    elif ((RESTART_NEEDED)); then
        run_systemctl restart "$SERVICE" || service_failed
        ACTION=restarted
    fi
    case $TIMER_WANTED in
        yes)
            unit_enabled "$TIMER" || run_systemctl enable "$TIMER"
            if ! unit_active "$TIMER"; then
                run_systemctl start "$TIMER"
            elif ((TIMER_CHANGED)); then
                run_systemctl restart "$TIMER"
            fi
            ;;
        no)
            if unit_enabled "$TIMER"; then
                run_systemctl disable "$TIMER"
            fi
            if unit_active "$TIMER"; then
                run_systemctl stop "$TIMER"
            fi
            ;;
    esac
fi

if [[ $CLEANUP_ENABLED == false && $TIMER_WANTED != yes ]]; then
    say "warning: cleanup.enable is false and $TIMER is not enabled, so expired images are never"
    say "  removed: run this with --timer, or set cleanup.enable to true in $CONFIG"
fi

# ---------------------------------------------------------------- health

if ((WAIT)); then
    url=${HEALTH_URL:-$LOCAL_URL/healthz}
    say "waiting up to ${HEALTH_TIMEOUT}s for $url"
    deadline=$((SECONDS + HEALTH_TIMEOUT))
    failed=
    until "$PYTHON" -c '
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via http_proxy
try:
    with opener.open(sys.argv[1], timeout=2) as response:
        sys.exit(response.status != 200)
except OSError:
    sys.exit(1)
' "$url"; do
        # Restart= retries on its own; once the start limit is hit it is failed for good.
        if ((${#SYSTEMCTL_CMD[@]})) && "${SYSTEMCTL_CMD[@]}" is-failed --quiet "$SERVICE" >/dev/null 2>&1; then
            failed=1
        elif ((SECONDS < deadline)); then
            sleep 1
            continue
        fi
        [[ -z $failed ]] || service_failed
        die "imgproxy did not answer $url within ${HEALTH_TIMEOUT}s; see: journalctl -u imgproxy -n 50 --no-pager"
    done
    say "imgproxy is up: $url"
fi

# ---------------------------------------------------------------- next steps

if ((FRESH_CONFIG)) || [[ $EXAMPLE_PASSWORD == yes ]]; then
    cat <<EOF

imgproxy listens on $LOCAL_URL (loopback only); image URLs start with $PUBLIC_URL.
Next steps:
  1. Replace each user's "password" in $CONFIG with a "password_hash":
       $PREFIX/venv/bin/python $PREFIX/imgproxy.py hash-password
  2. Point a domain at this machine and set server.domain and server.base_url
     (e.g. "https://img.example.com") in $CONFIG.
  3. Serve it over HTTPS with nginx or Caddy in front of $LOCAL_URL
     (snippets in the README, "Deploy on a VPS"), then: systemctl restart imgproxy
Logs: journalctl -u imgproxy -f    Upgrade: git pull && sudo units/install.sh
Uninstall: sudo units/uninstall.sh (keeps config and data; --purge deletes them)
EOF
elif [[ -n $ACTION ]]; then
    say "done: imgproxy $ACTION at $LOCAL_URL (public URLs: $PUBLIC_URL); config and data kept"
elif ((RESTART_NEEDED || UNITS_CHANGED)); then
    say "done: files updated; config and data kept"
else
    say "nothing to do: imgproxy is installed and up to date ($LOCAL_URL)"
fi
