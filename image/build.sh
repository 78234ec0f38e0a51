#!/usr/bin/env bash
# `make image`: the Birthline appliance image, from Debian packages (docs/operations.md, "Building and testing
# the image"). Needs root (debootstrap, chroot, file ownership in the image) and no loop device or mount:
# mke2fs -d writes the tree straight into the filesystem image.
#
# Output in $BUILD (default build/image/):
#   system.img        ext4, label bl-system: the whole system; an upgrade replaces this file and nothing else
#   vmlinuz, initrd.img   the kernel and initramfs inside it, for qemu -kernel/-initrd
#   base/             the debootstrap result, cached: rebuilt only when the suite or package list changes
# A state disk (label bl-state, the journal, token and configuration) is made per appliance by image/mkstate.sh.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
B=${BUILD:-$repo/build/image}
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# dbus: systemd-run --wait (the administrator's birthline wrapper) and logind (the power button). udev: stable
# serial names; softhsm2: the token (a vendor HSM adds its own PKCS#11 module); python3-venv: the
# daemon's own environment; e2fsprogs: fsck of the state disk at boot. No openssh-server: SSH is off because
# it is not installed.
PACKAGES=systemd-sysv,udev,dbus,python3,python3-venv,softhsm2,linux-image-amd64,openssl,ca-certificates,e2fsprogs,iproute2
SYSTEM_SIZE=${SYSTEM_SIZE:-2G}
# Fixed, so the state disk made on the build host (mkstate.sh) carries the daemon user's owner id.
BIRTHLINE_UID=990

t0=$(date +%s)
phase() { echo "image: $1 ($(($(date +%s) - t0)) s)"; }
mkdir -p "$B"

# 1. The Debian base, cached: debootstrap is most of a cold build's time.
if [ "$(cat "$B/base/.birthline-packages" 2>/dev/null)" != "$SUITE $PACKAGES" ]; then
    rm -rf "$B/base" "$B/base.tmp"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$B/base.tmp" "$MIRROR"
    echo "$SUITE $PACKAGES" >"$B/base.tmp/.birthline-packages"
    mv "$B/base.tmp" "$B/base"
    phase "debootstrap $SUITE done"
else
    phase "debootstrap $SUITE: cached in $B/base"
fi

# 2. Wheels, downloaded on this host: the image installs with --no-index, so what goes in is what was
# resolved here (pinned and hashed when the lock file exists).
rm -rf "$B/wheels"
mkdir -p "$B/wheels"
lock=""
for f in "$repo/requirements.txt"; do
    [ -f "$f" ] && lock=$f && break
done
# pip's complaints about index directories this host's pip configuration names but lacks are noise here.
pip() { "$repo/.venv/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }
if [ -n "$lock" ]; then
    pip download -q --only-binary=:all: --require-hashes -r "$lock" -d "$B/wheels"
    cp "$lock" "$B/wheels/runtime.txt"
else
    echo "image: no lock file (requirements.txt): the dependencies are resolved now, not pinned"
    pip wheel -q "$repo" -w "$B/wheels"
fi
# Built with the setuptools of this venv (itself from the lock), not one fetched for an isolated build.
pip wheel -q --no-deps --no-build-isolation "$repo" -w "$B/wheels"
phase "wheels in $B/wheels${lock:+ (from $lock)}"

# 3. The system tree: a fresh copy of the base each time, so a rebuild never inherits a previous one's files.
R=$B/root
rm -rf "$R"
cp -a "$B/base" "$R"
inchroot() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 chroot "$R" "$@"; }
# The daemon's user first, with a fixed id (systemd-sysusers, run by systemd/install.sh, keeps an existing user
# and adds its groups).
inchroot groupadd --system --gid $BIRTHLINE_UID birthline
inchroot useradd --system --uid $BIRTHLINE_UID --gid birthline --home-dir /var/lib/birthline --no-create-home \
    --shell /usr/sbin/nologin birthline
mkdir -p "$R/tmp/wheels"
cp "$B"/wheels/* "$R/tmp/wheels/"
inchroot python3 -m venv /opt/birthline
if [ -n "$lock" ]; then
    inchroot /opt/birthline/bin/pip install -q --no-index --find-links /tmp/wheels --require-hashes \
        -r /tmp/wheels/runtime.txt
fi
inchroot /opt/birthline/bin/pip install -q --no-index --find-links /tmp/wheels ${lock:+--no-deps} birthline
rm -rf "$R/tmp/wheels"
phase "birthline installed in /opt/birthline"

# 4. Units and appliance files: the project's units, udev rules, sysusers and tmpfiles entries by its own
# installer (systemd/install.sh), then image/rootfs: what only the image needs (first boot, the ready marker,
# fstab, network, the drop-in that puts the PIN and configuration on the state disk).
sh "$repo/systemd/install.sh" --root "$R" --enable
cp -a "$here/rootfs/." "$R/"
if ! grep -rqs NOTIFY_SOCKET "$repo/appliance"; then
    # Until the daemon sends sd_notify (issue 13, the units part), Type=notify would time out its start.
    echo "image: WARNING: the daemon does not send READY=1 yet: birthline.service runs as Type=simple"
    printf '[Service]\nType=simple\nWatchdogSec=0\n' >"$R/etc/systemd/system/birthline.service.d/40-no-notify.conf"
fi
# The configuration and the root-only PIN live on the state disk, so an upgrade keeps them: /etc/birthline and
# the credential birthline.service loads (LoadCredential=hsm-pin:/etc/credstore/birthline-hsm-pin) link there.
rm -rf "$R/etc/birthline"
ln -s /var/lib/birthline/etc "$R/etc/birthline"
install -d -m 0700 "$R/etc/credstore"
ln -sfn /var/lib/birthline/etc/hsm.pin "$R/etc/credstore/birthline-hsm-pin"
mkdir -p "$R/var/lib/birthline"
echo birthline >"$R/etc/hostname"
# A persistent journal (on the system disk: an upgrade starts a new one).
mkdir -p "$R/var/log/journal"
# The administrator's logins: a getty on the serial console and on tty2 (tty1 is the operator dashboard),
# root's password from the state disk (birthline-login.service); root stays locked until one is provisioned.
units="birthline-firstboot.service birthline-ready.service birthline-login.service systemd-networkd.service"
units="$units serial-getty@ttyS0.service getty@tty2.service"
inchroot systemctl enable -q $units
phase "units installed (systemd/install.sh) and enabled: birthline, birthline-console, $units"

# SSH is off by not being there: nothing in the package list may pull a server in.
if [ -e "$R/usr/sbin/sshd" ]; then
    echo "image: an SSH server is in the image (/usr/sbin/sshd): the appliance has none" >&2
    exit 1
fi

# 5. The filesystem image, and the kernel and initramfs beside it for qemu.
cp "$R"/boot/vmlinuz-* "$B/vmlinuz"
cp "$R"/boot/initrd.img-* "$B/initrd.img"
rm -f "$B/system.img.tmp"
mke2fs -q -t ext4 -L bl-system -d "$R" "$B/system.img.tmp" "$SYSTEM_SIZE"
mv "$B/system.img.tmp" "$B/system.img"
phase "$B/system.img ($SYSTEM_SIZE, ext4 bl-system)"
