#!/usr/bin/env bash
# A new state disk for one appliance: ext4 labelled bl-state (mounted at /var/lib/birthline by the image's
# fstab), empty but for provision/ (the first boot's input, docs/operations.md). Made with mke2fs -d: no loop
# device, no mount.
#   image/mkstate.sh OUT.img [PROVISION_DIR] [SIZE]
set -euo pipefail
out=$1
provision=${2:-}
size=${3:-1G}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
if [ -n "$provision" ]; then
    cp -r "$provision" "$tree/provision"
    chown -R 0:0 "$tree/provision"
    chmod -R go-rwx "$tree/provision"
fi
# The daemon's user (uid 990 in the image) owns the state directory, mode 0700.
chown 990:990 "$tree"
chmod 0700 "$tree"
rm -f "$out"
mke2fs -q -t ext4 -L bl-state -E root_owner=990:990 -d "$tree" "$out" "$size"
# mke2fs -d copies the files' modes but leaves the root directory 0755: the daemon refuses a state directory
# others can read.
debugfs -w -R "sif / mode 040700" "$out" 2>/dev/null
