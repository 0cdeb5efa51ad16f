#!/bin/sh
# blancmange rootboot /init: the small initramfs of installed images. Loads the disk drivers, mounts root=
# (a device, LABEL= or UUID=) and hands over to the image's own init (init=, default /sbin/init).
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}"; return;; esac; done; }
kver=$(uname -r)
while read -r module; do
    [ -n "$module" ] && insmod "/lib/modules/$kver/$module" 2>/dev/null
done < /etc/modules.order
root=$(arg root); init=$(arg init); init=${init:-/sbin/init}
for i in $(seq 1 50); do
    case "$root" in LABEL=*|UUID=*) dev=$(findfs "$root" 2>/dev/null) ;; *) dev=$root ;; esac
    [ -n "$dev" ] && [ -b "$dev" ] && break
    sleep 0.2
done
mkdir -p /newroot
if ! mount -o rw "$dev" /newroot; then
    echo "rootboot: cannot mount root=$root (device ${dev:-not found}); staying here (no shell: no login)"
    while :; do sleep 3600; done
fi
umount /proc /sys; mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot "$init"
