#!/usr/bin/env bash
# Remove the imgproxy service that units/install.sh installed.
# Keeps /etc/imgproxy (config) and /var/lib/imgproxy (data) unless --purge.
set -euo pipefail

PROG=uninstall.sh
PREFIX=/opt/imgproxy
CONF_DIR=/etc/imgproxy
DATA_DIR=/var/lib/imgproxy
LOG_DIR=/var/log/imgproxy
UNIT_DIR=/etc/systemd/system
SERVICE_USER=imgproxy
UNITS=(imgproxy-cleanup.timer imgproxy-cleanup.service imgproxy.service)

usage() {
    cat <<EOF
Usage: sudo units/uninstall.sh [--purge]

Stops and disables imgproxy, removes its units from $UNIT_DIR
and the program and venv in $PREFIX. Keeps the config ($CONF_DIR)
and the images and database ($DATA_DIR), so install.sh can bring it back.

Options:
  --purge      also delete $CONF_DIR, $DATA_DIR, $LOG_DIR and the system
               user '$SERVICE_USER': every image is gone for good
  -h, --help   show this help

Environment:
  DESTDIR=DIR    act on a tree staged under DIR instead of /: no root needed,
                 no userdel, systemctl skipped unless SYSTEMCTL is set
  SYSTEMCTL=CMD  the systemctl to run (default: systemctl), e.g. a fake that
                 records its arguments; called as CMD VERB UNIT
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

PURGE=0
while (($#)); do
    case $1 in
        --purge) PURGE=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

DESTDIR=${DESTDIR:-}
if [[ -n $DESTDIR ]]; then
    DESTDIR=$(realpath -m -- "$DESTDIR")
fi
if [[ -n ${SYSTEMCTL:-} ]]; then
    read -r -a SYSTEMCTL_CMD <<<"$SYSTEMCTL"
elif [[ -n $DESTDIR ]]; then
    SYSTEMCTL_CMD=()
else
    SYSTEMCTL_CMD=(systemctl)
fi

[[ -n $DESTDIR || $EUID -eq 0 ]] || die "run as root: sudo $0 (or DESTDIR=DIR for a staged tree)"

run_systemctl() {
    say "systemctl $*"
    "${SYSTEMCTL_CMD[@]}" "$@"
}

remove() {
    if [[ -e $DESTDIR$1 || -L $DESTDIR$1 ]]; then
        rm -rf -- "$DESTDIR$1"
        say "removed $1"
    fi
}

if ((${#SYSTEMCTL_CMD[@]})); then
    for unit in "${UNITS[@]}"; do
        if "${SYSTEMCTL_CMD[@]}" is-active --quiet "$unit" >/dev/null 2>&1; then
            run_systemctl stop "$unit"
        fi
        # imgproxy-cleanup.service has no [Install]: it is "static", never enabled.
        if [[ $unit != imgproxy-cleanup.service ]] &&
            "${SYSTEMCTL_CMD[@]}" is-enabled --quiet "$unit" >/dev/null 2>&1; then
            run_systemctl disable "$unit"
        fi
    done
else
    say "DESTDIR set and no SYSTEMCTL: not stopping or disabling anything"
fi

units_removed=0
for unit in "${UNITS[@]}"; do
    if [[ -e $DESTDIR$UNIT_DIR/$unit ]]; then
        remove "$UNIT_DIR/$unit"
        units_removed=1
    fi
done
if ((units_removed && ${#SYSTEMCTL_CMD[@]})); then
    run_systemctl daemon-reload
fi
remove "$PREFIX"

if ((PURGE)); then
    # Local overrides made with `systemctl edit imgproxy` go too.
    for unit in "${UNITS[@]}"; do
        remove "$UNIT_DIR/$unit.d"
    done
    remove "$CONF_DIR"
    remove "$DATA_DIR"
    remove "$LOG_DIR"
    if [[ -z $DESTDIR ]] && getent passwd "$SERVICE_USER" >/dev/null; then
        userdel "$SERVICE_USER"
        say "removed system user $SERVICE_USER"
    fi
    say "imgproxy purged: program, config, images and database are gone"
else
    kept=()
    for dir in "$CONF_DIR" "$DATA_DIR"; do
        [[ ! -e $DESTDIR$dir ]] || kept+=("$dir")
    done
    if ((${#kept[@]})); then
        say "imgproxy removed; kept ${kept[*]} (install.sh reuses them; --purge deletes them)"
    else
        say "imgproxy removed"
    fi
fi
