#!/bin/sh
# blancmange /init: the cid installer's first (and only) process. Mounts the kernel file systems, loads the
# drivers, brings the network up by DHCP, partitions the install disk when it is empty, then runs cidkid in
# installer mode. On any failure it stays up and says why on the console: it never reboots by itself.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/blancmange/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp /mnt/cid-target && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
echo "blancmange: cid installer starting ($(uname -r))"

fail() {  # say why, then stay up forever (never a reboot loop): the operator reads the console
    echo "blancmange: FAILED: $*"
    echo "blancmange: staying up; the console shows the reason. Power-cycle or let cidd reboot the node."
    while :; do sleep 3600; done
}

arg() {  # arg NAME: the value of NAME= on the kernel command line
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1"=*) echo "${word#*=}"; return;; esac
    done
}

while read -r module; do
    [ -n "$module" ] && insmod "/lib/modules/$(uname -r)/$module" 2>/dev/null
done < /etc/blancmange/modules.order

# Network: every interface with a carrier gets DHCP; the first that answers wins.
ip link set lo up
up=""
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    for path in /sys/class/net/*; do
        nic=${path##*/}
        [ "$nic" = lo ] && continue
        ip link set "$nic" up
        if udhcpc -i "$nic" -s /etc/blancmange/udhcpc.script -q -n -t 3 -T 2 >/dev/null 2>&1; then
            up=$nic; break 2
        fi
    done
    sleep 1
done
[ -n "$up" ] || fail "no network: no interface got a DHCP lease (drivers: /etc/blancmange/modules.order)"
echo "blancmange: network up on $up: $(ip -4 -o addr show dev "$up" | awk '{print $4}')"

server=$(arg cid.server); node=$(arg cid.node)
[ -n "$server" ] || fail "no cid.server= on the kernel command line (cidd writes it in the iPXE script)"
[ -n "$node" ] || fail "no cid.node= on the kernel command line (is the MAC in cidd's ethers file?)"
[ -n "$(arg cid.token)" ] || fail "no cid.token= on the kernel command line (cidd mints one per installer boot)"

# The install disk: cid.disk= on the command line, else the first disk found. See docs/blancmange.md.
disk=$(arg cid.disk)
if [ -z "$disk" ]; then
    for candidate in /dev/vda /dev/sda /dev/nvme0n1 /dev/xvda; do
        [ -b "$candidate" ] && { disk=$candidate; break; }
    done
fi
[ -n "$disk" ] && [ -b "$disk" ] || fail "no install disk found (give cid.disk=/dev/... on the kernel command line)"
root=$(/usr/lib/blancmange/bin/cid-partition "$disk") || fail "cannot partition $disk (see the lines above)"
echo "blancmange: installing onto $root (disk $disk)"

set -- --mode installer --kernel-cmdline /proc/cmdline --install-device "$root" --log-format console \
    --reboot-command "sync; reboot -f"
[ -f /etc/cid/ca.pem ] && set -- "$@" --ca /etc/cid/ca.pem
echo "blancmange: starting cidkid for $node, cidd at $server"
python3 -m cidkid.main "$@"
fail "cidkid exited with status $? (the lines above say why)"
