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
#
# Power-off convention: a script that exits with LAB_POWEROFF (99, also in the script's
# environment as $FIESNAP_LAB_POWEROFF) asks for a power cut. The wrapper then saves dmesg
# and writes "poweroff" to RESULTS_DIR/status (both on the 9p share, mounted sync: no guest
# block device is involved), and pulls the plug with sysrq o, WITHOUT sync: dirty page cache
# is lost, what was submitted to the virtual disks is in the images (vm.py: cache=unsafe).
#
# FIESNAP_LAB_UDEV=1 (lab option --udev): systemd-udevd from the unpacked udev package
# (tests/lab/udev.py) is started and the coldplug run before the script.
set -u

LAB_POWEROFF=99

RW=${1:?usage: guest-init.sh RESULTS_DIR}

log() {
    echo "lab-guest: $*" >>"$RW/guest-init.log"
    echo "lab-guest: $*"
}

poweroff_now() {
    # No sync, no umount, nothing that writes back or flushes the guest's block devices.
    dmesg >"$RW/dmesg.log" 2>&1
    echo poweroff >"$RW/status.tmp" && mv -f "$RW/status.tmp" "$RW/status"
    log "script exited $LAB_POWEROFF: power cut now (sysrq o, no sync; uptime $(cut -d' ' -f1 /proc/uptime)s)"
    echo 1 >/proc/sys/kernel/sysrq
    echo o >/proc/sysrq-trigger
    sleep 300 # the kernel powers off in a moment; the host kills qemu if it does not
    log "still running 300 s after sysrq o"
    exit "$LAB_POWEROFF"
}

start_udev() {
    local t0 src=$FIESNAP_LAB_UDEV_LIBEXEC udevadm=$FIESNAP_LAB_UDEVADM f out
    t0=$(cut -d' ' -f1 /proc/uptime)
    since() { awk -v a="$t0" '{printf "%.1fs", $1 - a}' /proc/uptime; }
    # Read the package files through the cached host-root mount when there is one (~4x faster).
    if [[ -d /run/lab-hostroot$src ]]; then
        src=/run/lab-hostroot$src udevadm=/run/lab-hostroot$udevadm
    fi
    # /usr is a RAM overlay over the host's /usr: install the package's rules and helpers
    # next to the host's dmsetup rules (/lib -> usr/lib), udevadm where a real install has it.
    mkdir -p /usr/lib/udev/rules.d /usr/lib/systemd || return 1
    cp -a "$src/rules.d/." /usr/lib/udev/rules.d/ || return 1
    for f in "$src"/*; do
        [[ -f $f && -x $f ]] && { cp -a "$f" /usr/lib/udev/ || return 1; }
    done
    cp "$udevadm" /usr/bin/udevadm && ln -sf /usr/bin/udevadm /usr/lib/systemd/systemd-udevd || return 1
    if ! out=$(/usr/lib/systemd/systemd-udevd --daemon 2>&1); then
        log "systemd-udevd --daemon failed: $out"
        return 1
    fi
    log "udev: files in place and systemd-udevd $(udevadm --version) up after $(since)"
    # Coldplug. "block" (default): only block devices, what dm and /dev/disk/* need (~1 s);
    # "all": every device, like a real boot (~5 s more under TCG).
    if [[ ${FIESNAP_LAB_UDEV_COLDPLUG:-block} == all ]]; then
        udevadm trigger --type=subsystems --action=add && udevadm trigger --type=devices --action=add || return 1
    else
        udevadm trigger --type=devices --action=add --subsystem-match=block || return 1
    fi
    udevadm settle --timeout=120 || return 1
    log "udev: coldplug (${FIESNAP_LAB_UDEV_COLDPLUG:-block}) done after $(since)"
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
export FIESNAP_LAB_POWEROFF=$LAB_POWEROFF
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
# Which kernel and dm targets this run had (the host prints them): the release, then one
# "name vX.Y.Z" line per loaded target.
{ uname -r; dmsetup targets 2>&1; } >"$RW/kernel.txt"

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

if [[ ${FIESNAP_LAB_UDEV:-} == 1 ]]; then
    if ! start_udev; then
        log "could not start udev (FIESNAP_LAB_UDEV=1)"
        finish 125
    fi
    export FIESNAP_LAB_UDEV=1
else
    unset FIESNAP_LAB_UDEV
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
((rc == LAB_POWEROFF)) && poweroff_now
finish "$rc"
