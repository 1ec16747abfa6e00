#!/bin/bash
# `make demo`: an online checkpoint (filesystem mounted and busy), a simulated reboot and an
# exact rollback, on a real kernel inside the lab guest.
# Runs as root in the guest, cwd = the repository; the wrapper puts the venv on PATH.
set -euo pipefail

disk=${FIESNAP_LAB_DISKS%% *}
mnt=/tmp/demo-mnt
export FIESNAP_STATE_DIR=/tmp/demo-state
say() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
files_sha() {  # sha256 of every file on device $1, mounted read-only for a moment
    local m=/tmp/demo-ro; mkdir -p "$m"
    mount -o ro,noload "$1" "$m"
    (cd "$m" && find . -path ./lost+found -prune -o -path ./.fiesnap -prune -o -type f -print0 | sort -z | xargs -0 sha256sum)
    umount "$m"
}
image_digest() {  # per-MiB sha256 of device $1; zeroed first: the store file's own blocks and
                  # the chunks that were free at the checkpoint (not saved by a free-aware store)
    python3 - "$1" /tmp/demo-record.json <<'EOF'
import json, sys
from tests.kernel.helpers import device_digest
from tests.kernel.scenario import Record
rec = Record(json.load(open(sys.argv[2])))
print("\n".join(device_digest(sys.argv[1], rec.outside_checkpoint)))
EOF
}

say "kernel $(uname -r); $(dmsetup targets | grep '^snapshot ' | tr -s ' ')"
say "1. put $disk under fiesnap once, and mount it through /dev/mapper/demo from then on"
run mkfs.ext4 -q -F "$disk"
run fiesnap setup "$disk" --name demo
mkdir -p "$mnt" && run mount /dev/mapper/demo "$mnt"
mkdir -p "$mnt/etc" "$mnt/app" "$mnt/log"
for i in $(seq 1 20); do echo "config $i: original" > "$mnt/etc/conf$i"; done
head -c 24M /dev/urandom > "$mnt/app/firmware.bin"
sqlite3 "$mnt/app/state.db" "create table kv(k text primary key, v text);
  with recursive n(i) as (select 1 union all select i+1 from n where i < 2000)
  insert into kv select 'key'||i, 'value'||i from n;"
sync

say "2. take the checkpoint while the filesystem stays mounted and an application keeps writing"
( i=0; while [ ! -e /tmp/demo-stop ]; do echo "entry $i" > "$mnt/log/e$i"; i=$((i+1)); sleep 0.02; done ) &
sleep 1
run fiesnap start demo --size 64M
touch /tmp/demo-stop; wait
echo "the writer never failed; it wrote $(ls "$mnt/log" | wc -l) files before, during and after the start"
run fiesnap status
cp "$FIESNAP_STATE_DIR/demo.json" /tmp/demo-record.json  # the store's extents, for the check
image_digest /dev/mapper/demo-snap > /tmp/demo-image.before  # the checkpoint view, byte for byte
files_sha /dev/mapper/demo-snap > /tmp/demo-before.sha
echo "checkpoint view: $(wc -l < /tmp/demo-before.sha) files checksummed"

say "3. the 'update', still mounted"
dd if=/dev/urandom of="$mnt/app/firmware.bin" bs=1M count=16 conv=notrunc status=none
sed -i 's/original/UPDATED/' "$mnt"/etc/conf1*
rm -f "$mnt"/etc/conf2*
echo "a file that did not exist" > "$mnt/NEW-FILE"
sqlite3 "$mnt/app/state.db" "update kv set v = 'broken' where rowid % 3 = 0; delete from kv where rowid % 5 = 0;"
sync
run fiesnap status
run umount "$mnt"

say "4. what a reboot does: the devices go away, 'fiesnap activate' (the boot unit) brings them back"
run fiesnap deactivate demo
run fiesnap activate --all
run fiesnap status

say "5. roll back"
run fiesnap merge demo --keep-store

say "6. verify"
image_digest "$disk" > /tmp/demo-image.after
if cmp -s /tmp/demo-image.before /tmp/demo-image.after; then
    echo "device image: identical to the checkpoint, byte for byte (outside the store file's blocks"
    echo "and the space that was free at the checkpoint)"
else
    echo "DEVICE IMAGE DIFFERS"; exit 1
fi
e2fsck -fn /dev/mapper/demo >/tmp/demo-fsck.log 2>&1 && echo "fsck: clean" || { cat /tmp/demo-fsck.log; exit 1; }
files_sha /dev/mapper/demo | diff /tmp/demo-before.sha - && echo "files: all $(wc -l < /tmp/demo-before.sha) checksums unchanged"
mount -o ro /dev/mapper/demo "$mnt"
[ ! -e "$mnt/NEW-FILE" ] && echo "files created after the checkpoint: gone"
echo "sqlite: $(sqlite3 -readonly "$mnt/app/state.db" "select count(*) from kv where v like 'value%'") original rows"
umount "$mnt"
echo "/dev/mapper/demo is a plain pass-through again, ready for the next checkpoint:"
run fiesnap status
echo
echo "ROLLBACK EXACT"
