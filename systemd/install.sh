#!/bin/sh
# Install Birthline's systemd units, udev rules, sysusers and tmpfiles entries into a root filesystem.
#
#   systemd/install.sh [--root DIR] [--enable]      (make install-units DESTDIR=DIR [ENABLE=1])
#
# --root DIR   install into DIR (an image being built); default / (this machine).
# --enable     also create the accounts (systemd-sysusers --root) and enable both units (systemctl --root
#              enable), which works on a root filesystem that is not running.
# Paths installed (stable: the image recipe and docs/operations.md name them):
#   /usr/lib/systemd/system/birthline.service, birthline-console.service
#   /usr/lib/sysusers.d/birthline.conf, /usr/lib/tmpfiles.d/birthline.conf
#   /usr/lib/udev/rules.d/70-birthline-stations.rules
#   /usr/share/doc/birthline/*.md (docs/: operations.md, the units' Documentation=)
# The units run /opt/birthline/bin/birthline: the appliance's environment is installed at /opt/birthline.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
root=/
enable=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --root=*) root=${1#--root=}; shift ;;
    --enable) enable=1; shift ;;
    *) echo "usage: $0 [--root DIR] [--enable]" >&2; exit 2 ;;
  esac
done
root=${root%/}
install -D -m 0644 "$here/birthline.service" "$root/usr/lib/systemd/system/birthline.service"
install -D -m 0644 "$here/birthline-console.service" "$root/usr/lib/systemd/system/birthline-console.service"
install -D -m 0644 "$here/birthline.sysusers" "$root/usr/lib/sysusers.d/birthline.conf"
install -D -m 0644 "$here/birthline.tmpfiles" "$root/usr/lib/tmpfiles.d/birthline.conf"
install -D -m 0644 "$top/udev/70-birthline-stations.rules" "$root/usr/lib/udev/rules.d/70-birthline-stations.rules"
# The guide the units' Documentation= names (systemctl help birthline), with the pages it links to.
install -d -m 0755 "$root/usr/share/doc/birthline"
install -m 0644 "$top"/docs/*.md "$root/usr/share/doc/birthline/"
if [ "$enable" = 1 ]; then
  if [ -z "$root" ]; then
    systemd-sysusers birthline.conf
    systemd-tmpfiles --create birthline.conf
    systemctl daemon-reload 2>/dev/null || true
    systemctl enable birthline.service birthline-console.service
  else
    systemd-sysusers --root="$root" "$root/usr/lib/sysusers.d/birthline.conf"
    systemd-tmpfiles --root="$root" --create "$root/usr/lib/tmpfiles.d/birthline.conf"
    systemctl --root="$root" enable birthline.service birthline-console.service
  fi
fi
