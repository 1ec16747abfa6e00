#!/bin/bash
# Lab self-test of `python -m tests.lab boots` and the power-off convention (make test runs it):
#
#   python -m tests.lab boots tests/lab/selftest-boots.sh --boots 2 --disks 1 --disk-size 64M
#
# Boot 1 writes a random 4 MiB pattern to the scratch disk with O_DIRECT (submitted to the
# virtual disk, never flushed) and 4 MiB more through the page cache (left dirty: a holder
# process keeps the disk open, so the last close does not write it back), records the
# expectations in $FIESNAP_LAB_CARRY and exits $FIESNAP_LAB_POWEROFF (99): power cut, no sync.
# Boot 2 (and later) checks the disk is the same one, boot 1 ended in a power-off, and the
# O_DIRECT pattern is on it (fails otherwise); it only reports whether the page-cache data
# survived (without --udev it is lost: the power cut comes well within the 30 s dirty expiry;
# with --udev, udev's watch on the disk writes it back right after dd closes the device).
set -euo pipefail

: "${FIESNAP_LAB_BOOT:?run me with: python -m tests.lab boots tests/lab/selftest-boots.sh --boots 2 --disks 1}"
carry=${FIESNAP_LAB_CARRY:?}
disk=${FIESNAP_LAB_DISKS%% *}
kname=${disk##*/}
MiB=$((1 << 20))
DIRECT_AT=8   # MiB
BUFFERED_AT=24
say() { echo "selftest-boots[$FIESNAP_LAB_BOOT/$FIESNAP_LAB_BOOTS]: $*"; }
region_sha() { dd if="$disk" bs=1M skip="$1" count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1; }
zero_sha=$(head -c $((4 * MiB)) /dev/zero | sha256sum | cut -d' ' -f1)

if ((FIESNAP_LAB_BOOT == 1)); then
    say "disk $disk (serial $(<"/sys/block/$kname/serial")), $(($(blockdev --getsize64 "$disk") / MiB)) MiB"
    cat "/sys/block/$kname/serial" >"$carry/serial"
    [[ $(region_sha $DIRECT_AT) == "$zero_sha" ]] || { say "FAIL: a fresh image is not zero"; exit 1; }

    head -c $((4 * MiB)) /dev/urandom >/tmp/direct.bin
    dd if=/tmp/direct.bin of="$disk" bs=1M seek=$DIRECT_AT oflag=direct status=none
    sha256sum </tmp/direct.bin | cut -d' ' -f1 >"$carry/direct.sha256"
    [[ $(region_sha $DIRECT_AT) == "$(<"$carry/direct.sha256")" ]] || { say "FAIL: O_DIRECT read-back"; exit 1; }
    say "wrote 4 MiB at ${DIRECT_AT} MiB with O_DIRECT (no flush)"

    # Keep the disk open past this script's end: the last close of a block device writes
    # its dirty pages back (blkdev_put -> sync_blockdev), which would defeat the test.
    setsid sleep 600 <"$disk" >/dev/null 2>&1 &
    head -c $((4 * MiB)) /dev/urandom >/tmp/buffered.bin
    dd if=/tmp/buffered.bin of="$disk" bs=1M seek=$BUFFERED_AT status=none
    sha256sum </tmp/buffered.bin | cut -d' ' -f1 >"$carry/buffered.sha256"
    say "wrote 4 MiB at ${BUFFERED_AT} MiB through the page cache, not synced ($(grep -E '^Dirty:' /proc/meminfo | tr -s ' '))"

    date +%s >"$carry/boot1-done"
    say "exiting $FIESNAP_LAB_POWEROFF: power cut"
    exit "$FIESNAP_LAB_POWEROFF"
fi

fail=0
[[ -e $carry/boot1-done ]] || { say "FAIL: boot 1 left no marker in $carry"; exit 1; }
if [[ $(<"/sys/block/$kname/serial") != "$(<"$carry/serial")" ]]; then
    say "FAIL: $disk has serial $(<"/sys/block/$kname/serial"), boot 1 saw $(<"$carry/serial")"
    fail=1
fi
boot1_status=$(cat "$FIESNAP_LAB_RESULTS/../../boot-1/results/status" 2>/dev/null || echo missing)
if [[ $boot1_status == poweroff ]]; then
    say "boot 1 status file: poweroff"
else
    say "FAIL: boot 1 status file says '$boot1_status', expected 'poweroff'"
    fail=1
fi
if [[ $(region_sha $DIRECT_AT) == "$(<"$carry/direct.sha256")" ]]; then
    say "OK: the O_DIRECT pattern written before the power cut is on the disk"
else
    say "FAIL: the O_DIRECT pattern at ${DIRECT_AT} MiB is not on the disk"
    fail=1
fi
buf=$(region_sha $BUFFERED_AT)
if [[ $buf == "$(<"$carry/buffered.sha256")" ]]; then
    verdict="survived (written back before the power cut)"
elif [[ $buf == "$zero_sha" ]]; then
    verdict="lost (all zeros: the dirty page cache died with the guest)"
else
    verdict="partly written back"
fi
say "report: the unsynced page-cache data $verdict"
echo "boot $FIESNAP_LAB_BOOT: buffered data $verdict" >>"$carry/report"
exit $fail
