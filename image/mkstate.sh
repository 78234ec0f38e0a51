#!/usr/bin/env bash
# A new state disk for one appliance: ext4 labelled bl-state (mounted at /var/lib/birthline by the image's
# fstab), empty but for provision/ (the first boot's input, docs/operations.md). Made with mke2fs -d: no loop
# device, no mount.
#   image/mkstate.sh OUT.img [PROVISION_DIR] [SIZE]
set -euo pipefail
out=$1
provision=${2:-}
size=${3:-1G}
# The administrator logs in as root on the serial console or tty2 with the password whose hash is in
# provision/root.passwd-hash (birthline-login.service applies it at every boot). Without one nobody can log in on
# the appliance to back it up, upgrade it or add stations: refused unless MKSTATE_NO_LOGIN=1 says so.
hashfile=${provision:+$provision/root.passwd-hash}
if [ -n "$hashfile" ] && [ -f "$hashfile" ]; then
    # A crypt(3) hash (openssl passwd -6), never a clear-text password kept on disk.
    if ! head -n 1 "$hashfile" | grep -Eq '^\$[0-9a-z]+\$[^: ]+\$[^: ]+$'; then
        echo "mkstate.sh: $hashfile is not a crypt hash: write it with openssl passwd -6 >$hashfile" >&2
        exit 1
    fi
elif [ "${MKSTATE_NO_LOGIN:-}" = 1 ]; then
    echo "mkstate.sh: WARNING: no provision/root.passwd-hash: no administrator can log in on this appliance" >&2
else
    echo "mkstate.sh: no PROVISION_DIR/root.passwd-hash: no administrator could log in on the appliance." >&2
    echo "  Make one with: openssl passwd -6 >PROVISION_DIR/root.passwd-hash (it asks for the password)," >&2
    echo "  or set MKSTATE_NO_LOGIN=1 to make a state disk without a login." >&2
    exit 1
fi
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
