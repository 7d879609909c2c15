#!/usr/bin/env bash
# Builds (or finds in the cache) the Debian 12 guest image of the VM suite and prints the cache
# directory holding it: root.raw (ext4, the whole root file system, no partition table),
# vmlinuz, initrd.img. Nothing ever writes root.raw after it is built: the suite boots it through
# a qcow2 overlay (docs/vm-test.md).
#
# The cache key is a hash of every input: this script, the guest unit, the package list, the
# mirror and the suite. AZIOT_VM_CACHE (default /var/cache/aziot-vm) is the cache root;
# AZIOT_VM_REBUILD=1 rebuilds even when the cache holds the image (e.g. after a point release).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${AZIOT_VM_CACHE:-/var/cache/aziot-vm}
suite=bookworm

# The mirror apt already uses (deb822 or one-line sources), so the image comes from where this
# machine's packages come from.
mirror=${AZIOT_VM_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\)\/\{0,1\}$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\{0,1\}\(http[^[:space:]]*\/debian\)\/\{0,1\}[[:space:]]\+.*/\2/p' /etc/apt/sources.list | head -1)
fi
mirror=${mirror:-http://deb.debian.org/debian}
security=${mirror%/debian}/debian-security

# The guest's kernel: `backports` (default; bookworm-backports' linux-image-amd64, 6.12: Landlock
# ABI 6) or `stock` (bookworm's 6.1: Landlock ABI 2, on which the workers refuse to start unless
# `[sandbox] allow_degraded = true`; docs/vm-test.md).
kernel=${AZIOT_VM_KERNEL:-backports}
case "$kernel" in
  stock) kernel_pkg=(linux-image-amd64) ;;
  backports) kernel_pkg=() ;;
  *) echo "image: AZIOT_VM_KERNEL is stock or backports, not '$kernel'" >&2; exit 1 ;;
esac

# What the guest needs: systemd as PID 1, a kernel and an initramfs that finds virtio disks, the
# package's dependencies (so `apt-get install ./x.deb` works offline; tpm2-tss libs: docs/tpmd.md),
# and the tools guest.sh uses.
packages=(
  systemd systemd-sysv udev dbus "${kernel_pkg[@]}" initramfs-tools kmod
  libssl3 openssl curl ca-certificates
  libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-tctildr0
  init-system-helpers passwd procps jq
)

key=$( { cat "$0" "$here/aziot-vm-test.service"; echo "$mirror $suite $kernel ${packages[*]}"; } | sha256sum | cut -c1-16)
dir=$cache_root/$key
mkdir -p "$cache_root"
chmod 0755 "$cache_root"
# One build at a time (a second caller waits, then finds the image).
exec 9>"$cache_root/.lock"
flock 9
if [ -f "$dir/complete" ] && [ "${AZIOT_VM_REBUILD:-0}" != "1" ]; then
  echo "$dir"
  exit 0
fi

for tool in mmdebstrap mkfs.ext4; do
  command -v "$tool" >/dev/null || { echo "image: $tool is missing (scripts/deps.sh installs it)" >&2; exit 1; }
done
work=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs

echo "==> image: mmdebstrap $suite from $mirror (cache key $key)" >&2
unit=$here/aziot-vm-test.service
# customize hooks run on the host with the chroot as $1.
mmdebstrap --variant=minbase --mode=root \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --customize-hook="[ $kernel = stock ] || chroot \"\$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t $suite-backports linux-image-amd64" \
  --customize-hook='echo aziot-vm > "$1/etc/hostname"' \
  --customize-hook='echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$1/etc/fstab"' \
  --customize-hook="install -m 0644 '$unit' \"\$1/etc/systemd/system/aziot-vm-test.service\"" \
  --customize-hook='mkdir -p "$1/etc/systemd/system/multi-user.target.wants" && ln -s ../aziot-vm-test.service "$1/etc/systemd/system/multi-user.target.wants/aziot-vm-test.service"' \
  --customize-hook='for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer systemd-timesyncd.service getty@tty1.service; do ln -sf /dev/null "$1/etc/systemd/system/$u"; done' \
  --customize-hook='chroot "$1" passwd -d root >/dev/null' \
  "$suite" "$rootfs" \
  "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security $suite-security main" \
  "deb $mirror $suite-backports main" >&2

kernel_file=$(ls "$rootfs"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$rootfs"/boot/initrd.img-* | sort -V | tail -1)
[ -f "$kernel_file" ] && [ -f "$initrd" ] || { echo "image: no kernel/initrd in the image" >&2; exit 1; }
cp "$kernel_file" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"
echo "==> image: mkfs.ext4 -d (no loop mount)" >&2
truncate -s 3G "$work/root.raw"
mkfs.ext4 -q -F -L aziot-root -d "$rootfs" "$work/root.raw"
rm -rf "$rootfs"
touch "$work/complete"
rm -rf "$dir"
mv "$work" "$dir"
trap - EXIT
echo "$dir"
