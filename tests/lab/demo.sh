#!/bin/bash
# `make demo`: a checkpoint and an exact rollback on a real kernel, inside the lab guest.
# Runs as root in the guest, cwd = the repository; the wrapper puts the venv on PATH.
set -euo pipefail

disk=${FIESNAP_LAB_DISKS%% *}
mnt=/tmp/demo-mnt
export FIESNAP_STATE_DIR=/tmp/demo-state
say() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
files_sha() { (cd "$mnt" && find . -path ./lost+found -prune -o -path ./.fiesnap -prune -o -type f -print0 | sort -z | xargs -0 sha256sum); }
image_digest() {  # per-MiB sha256 of the whole device, the store file's own blocks zeroed
    python3 - "$disk" /tmp/demo-record.json <<'EOF'
import json, sys
from tests.kernel.helpers import device_digest
rec = json.load(open(sys.argv[2]))
print("\n".join(device_digest(sys.argv[1], [(p, n) for _l, p, n, _f in rec["store_extents"]])))
EOF
}

say "kernel $(uname -r); $(dmsetup targets | grep '^snapshot ' | tr -s ' ')"
say "1. an ext4 filesystem on $disk with files and a sqlite database"
run mkfs.ext4 -q -F "$disk"
mkdir -p "$mnt" && mount "$disk" "$mnt"
mkdir -p "$mnt/etc" "$mnt/app"
for i in $(seq 1 20); do echo "config $i: original" > "$mnt/etc/conf$i"; done
head -c 24M /dev/urandom > "$mnt/app/firmware.bin"
sqlite3 "$mnt/app/state.db" "create table kv(k text primary key, v text);
  with recursive n(i) as (select 1 union all select i+1 from n where i < 2000)
  insert into kv select 'key'||i, 'value'||i from n;"
files_sha > /tmp/demo-before.sha
echo "$(wc -l < /tmp/demo-before.sha) files checksummed"
umount "$mnt"

say "2. take the checkpoint (filesystem unmounted)"
run fiesnap start "$disk" --size 64M --name demo
run fiesnap status
cp "$FIESNAP_STATE_DIR/demo.json" /tmp/demo-record.json  # the store's extents, for the check
image_digest > /tmp/demo-image.before

say "3. the 'update': write through /dev/mapper/demo"
mount /dev/mapper/demo "$mnt"
dd if=/dev/urandom of="$mnt/app/firmware.bin" bs=1M count=16 conv=notrunc status=none
sed -i 's/original/UPDATED/' "$mnt"/etc/conf1*
rm -f "$mnt"/etc/conf2*
echo "a file that did not exist" > "$mnt/NEW-FILE"
sqlite3 "$mnt/app/state.db" "update kv set v = 'broken' where rowid % 3 = 0; delete from kv where rowid % 5 = 0;"
sync
echo "changed: $(files_sha | diff - /tmp/demo-before.sha | grep -c '^[<>]') checksum lines differ"
run fiesnap status
umount "$mnt"

say "4. roll back"
run fiesnap merge demo --keep-store

say "5. verify"
image_digest > /tmp/demo-image.after
if cmp -s /tmp/demo-image.before /tmp/demo-image.after; then
    echo "device image: identical to the checkpoint, byte for byte (outside the store file's blocks)"
else
    echo "DEVICE IMAGE DIFFERS"; exit 1
fi
e2fsck -fn "$disk" >/tmp/demo-fsck.log 2>&1 && echo "fsck: clean" || { cat /tmp/demo-fsck.log; exit 1; }
mount -o ro "$disk" "$mnt"
files_sha | diff /tmp/demo-before.sha - && echo "files: all $(wc -l < /tmp/demo-before.sha) checksums unchanged"
[ ! -e "$mnt/NEW-FILE" ] && echo "files created after the checkpoint: gone"
echo "sqlite: $(sqlite3 -readonly "$mnt/app/state.db" "select count(*) from kv where v like 'value%'") original rows"
umount "$mnt"
echo
echo "ROLLBACK EXACT"
