#!/bin/bash
# Guest side of the VM lab (runs as root inside the virtme-ng guest).
#
#   bash guest-init.sh RESULTS_DIR
#
# RESULTS_DIR is the host folder shared read-write with the guest (vng --rwdir).
# It holds job.env (written by tests/lab/vm.py): what to run and with which environment.
# This wrapper loads the kernel modules, finds the scratch disks by their virtio serial,
# runs the script with its output in RESULTS_DIR/output.log and finally writes the
# script's exit status to RESULTS_DIR/status (atomically, after everything else).
# Exit statuses of its own: 124 = script timed out (from timeout(1)),
# 125 = the wrapper could not set the guest up (see guest-init.log / the console log).
set -u

RW=${1:?usage: guest-init.sh RESULTS_DIR}

log() {
    echo "lab-guest: $*" >>"$RW/guest-init.log"
    echo "lab-guest: $*"
}

finish() {
    local rc=$1
    dmesg >"$RW/dmesg.log" 2>&1
    echo "$rc" >"$RW/status.tmp" && mv -f "$RW/status.tmp" "$RW/status"
    sync
    log "done: status $rc (uptime $(cut -d' ' -f1 /proc/uptime)s)"
    exit "$rc"
}

echo "uptime $(cut -d' ' -f1 /proc/uptime)" >"$RW/started"
log "wrapper started on $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime)s"

# Defaults first; job.env may override them.
export LANG=C.UTF-8 LC_ALL=C.UTF-8
export HOME=/tmp/lab-home TMPDIR=/tmp
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export HYPOTHESIS_STORAGE_DIRECTORY=/tmp/lab-hypothesis
mkdir -p "$HOME" "$HYPOTHESIS_STORAGE_DIRECTORY"

# shellcheck disable=SC1091
if ! source "$RW/job.env"; then
    log "cannot read $RW/job.env"
    finish 125
fi
export FIESNAP_LAB=1
export FIESNAP_LAB_RESULTS=$RW
export VIRTUAL_ENV=$FIESNAP_LAB_VENV
export PATH="$FIESNAP_LAB_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Speed: the guest root is the host's over 9p *without* caching, so every stat() is a round
# trip (python -c pass: 2.7 s). vm.py also exports the host root as 9p tag "fiesnaproot";
# mounted with cache=loose and bind-mounted over the Python install and the venv, imports get
# ~3x faster. Read-only, and the host does not change these during a run. Best effort.
if grep -qs fiesnaproot /sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag; then
    home=$(sed -n 's/^home *= *//p' "$FIESNAP_LAB_VENV/pyvenv.cfg" 2>/dev/null)
    pyprefix=${home%/bin}
    mkdir -p /run/lab-hostroot
    if mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000 fiesnaproot /run/lab-hostroot; then
        for d in "$pyprefix" "$FIESNAP_LAB_VENV"; do
            case $d in "" | / | /usr | /usr/local) continue ;; esac
            [[ -d /run/lab-hostroot$d ]] && mount --bind "/run/lab-hostroot$d" "$d" && log "cached: $d" ||
                log "could not bind the cached $d (continuing uncached)"
        done
    else
        log "could not mount the cached host root (continuing uncached)"
    fi
fi

for m in $FIESNAP_LAB_MODULES; do
    if ! out=$(modprobe "$m" 2>&1); then
        log "modprobe $m failed: $out"
        finish 125
    fi
done

# Scratch disks: virtio-blk with serial fiesnap-lab-<i>, whatever vdX name they got.
disks=()
for ((try = 0; try < 150; try++)); do
    disks=()
    for ((i = 0; i < FIESNAP_LAB_NDISKS; i++)); do
        for s in /sys/block/vd*/serial; do
            [[ -e $s ]] || continue
            if [[ $(<"$s") == "fiesnap-lab-$i" ]]; then
                d=${s%/serial}
                disks+=("/dev/${d##*/}")
            fi
        done
    done
    ok=1
    ((${#disks[@]} == FIESNAP_LAB_NDISKS)) || ok=0
    for d in "${disks[@]}"; do [[ -b $d ]] || ok=0; done
    ((ok)) && break
    sleep 0.2
done
if ((${#disks[@]} != FIESNAP_LAB_NDISKS)); then
    log "expected $FIESNAP_LAB_NDISKS scratch disks, found: ${disks[*]:-none} ($(ls /sys/block | tr '\n' ' '))"
    finish 125
fi
export FIESNAP_LAB_DISKS="${disks[*]}"
echo "$FIESNAP_LAB_DISKS" >"$RW/disks"
if [[ ! -c /dev/mapper/control ]]; then
    log "/dev/mapper/control missing after loading dm_mod"
    finish 125
fi

cd "$FIESNAP_REPO" || finish 125
script=$FIESNAP_LAB_SCRIPT
if [[ -x $script ]]; then
    cmd=("$script")
elif [[ $script == *.py ]]; then
    cmd=(python "$script")
else
    cmd=(bash "$script")
fi
log "running ${cmd[*]} ${FIESNAP_LAB_ARGS[*]} (disks: ${FIESNAP_LAB_DISKS:-none}, timeout ${FIESNAP_LAB_TIMEOUT}s)"
timeout --kill-after=15 "$FIESNAP_LAB_TIMEOUT" "${cmd[@]}" "${FIESNAP_LAB_ARGS[@]}" \
    </dev/null >"$RW/output.log" 2>&1
rc=$?
((rc == 124)) && log "script timed out after ${FIESNAP_LAB_TIMEOUT}s"
finish "$rc"
