"""The guest's initramfs: busybox, the modules, and an /init that runs the workload.

The archive is a cpio "newc" (the format the kernel's initramfs unpacker reads, see the
kernel's Documentation/driver-api/early-userspace/buffer-format.rst), written here so that
building it needs neither root (for /dev/console) nor the cpio tool.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

from capture.assets import Module

__all__ = ["MARK", "Entry", "Workload", "init_script", "newc", "read_newc"]

# Every line the /init prints for the kit starts with this; the kit and the guest-tier tests
# look for them on the serial console.
MARK = "VIOMMUD-CAPTURE:"

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True, slots=True)
class Entry:
    """One cpio member: a directory, a regular file, a symlink or a character device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def newc(entries: Iterable[Entry]) -> bytes:
    """The entries as a cpio newc archive, trailer included (no compression)."""
    out = bytearray()
    members = [*entries, Entry(TRAILER, 0)]
    for ino, entry in enumerate(members, start=1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            ino,
            entry.mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime: fixed, so the archive is reproducible
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check (newc, not crc)
        )
        out += NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        out += name + _pad4(110 + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def read_newc(archive: bytes) -> list[Entry]:
    """The members of a newc archive (the trailer excluded): the inverse of :func:`newc`."""
    members: list[Entry] = []
    offset = 0
    while True:
        header = archive[offset : offset + 110]
        if len(header) < 110 or header[:6] != NEWC_MAGIC:
            raise ValueError(f"no newc header at offset {offset}: {header[:16]!r}")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmajor, rminor, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_at = offset + 110
        name = archive[name_at : name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        if name == TRAILER:
            return members
        members.append(Entry(name, mode, archive[data_at : data_at + size], (rmajor, rminor)))
        offset = data_at + size + (-size % 4)


@dataclass(frozen=True, slots=True)
class Workload:
    """What /init does once the modules are in.

    ``disk_kib``: written to /dev/vda with O_DIRECT, then read back and compared;
    ``net``: DHCP from QEMU's user network, a ping of the gateway and a TFTP download of
    ``tftp_file`` from it; ``rebind``: unbinds the network device's PCI function from its
    driver, switches its IOMMU group to an identity domain, binds it, then does the same back
    to the group's original type (two domain switches, each with traffic). Then /init prints
    ``<MARK> workload-done`` and ``<MARK> poweroff`` and powers the machine off.
    """

    disk_kib: int = 1024
    net: bool = True
    tftp_file: str = "payload.bin"
    rebind: bool = True


_INIT_HEAD = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() {{ echo "{mark} $*"; }}
say init "$(uname -r)" cmdline="$(cat /proc/cmdline)"
for m in {modules}; do
    insmod /lib/modules/$m.ko || say insmod-failed $m
done
say modules-loaded
i=0
while [ $i -lt 150 ]; do
    [ -b /dev/vda ] && [ -e /sys/class/net/eth0 ] && break
    sleep 0.2; i=$((i+1))
done
blk=$(readlink -f /sys/block/vda/device/.. 2>/dev/null)
net=$(readlink -f /sys/class/net/eth0/device/.. 2>/dev/null)
say device blk "${{blk##*/}}"
say device net "${{net##*/}}"
for g in /sys/kernel/iommu_groups/*; do
    say iommu-group "${{g##*/}}" "$(ls $g/devices | tr '\\n' ' ')"
done
"""

_DISK = """if [ -b /dev/vda ]; then
    dd if=/dev/urandom of=/tmp/pattern bs=1024 count={kib} 2>/dev/null
    dd if=/tmp/pattern of=/dev/vda bs=64k oflag=direct 2>/dev/null
    dd if=/dev/vda of=/tmp/back bs=64k count={blocks} iflag=direct 2>/dev/null
    if cmp /tmp/pattern /tmp/back; then say disk ok {kib}KiB; else say disk MISMATCH; fi
else
    say disk missing
fi
"""

_NET = """cat > /tmp/udhcpc.sh <<'EOF'
#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add $ip/${{mask:-24}} dev $interface
[ -n "$router" ] && ip route add default via ${{router%% *}}
exit 0
EOF
chmod +x /tmp/udhcpc.sh
if ip link set eth0 up; then
    udhcpc -i eth0 -n -q -t 5 -T 2 -s /tmp/udhcpc.sh >/dev/null 2>&1 || say dhcp failed
    say net "$(ip -4 addr show eth0 | grep inet)"
    ping -c 3 -W 2 10.0.2.2 >/dev/null 2>&1 && say ping ok || say ping failed
    if tftp -g -r {tftp} -l /tmp/tftp.bin 10.0.2.2; then
        say tftp ok "$(wc -c < /tmp/tftp.bin)" "$(md5sum < /tmp/tftp.bin)"
    else
        say tftp failed
    fi
else
    say net missing
fi
"""

_REBIND = """pci=$(readlink -f /sys/class/net/eth0/device/.. 2>/dev/null)
group=$(readlink -f "$pci/iommu_group" 2>/dev/null)
if [ -n "$group" ] && [ -e "$pci/driver" ]; then
    dev=${{pci##*/}}
    drv=$(readlink -f "$pci/driver")
    type=$(cat "$group/type")
    for t in identity "$type"; do
        echo "$dev" > "$drv/unbind"
        echo "$t" > "$group/type" || say domain-type failed "$t"
        echo "$dev" > "$drv/bind"
        i=0
        while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
        ip link set eth0 up
        udhcpc -i eth0 -n -q -t 5 -T 2 -s /tmp/udhcpc.sh >/dev/null 2>&1
        ping -c 2 -W 2 10.0.2.2 >/dev/null 2>&1 && r=ok || r=failed
        say domain "$dev" "$(cat $group/type)" ping $r
    done
else
    say rebind skipped
fi
"""

_TAIL = """sync
say workload-done
say poweroff
poweroff -f
"""


def init_script(modules: list[Module], workload: Workload) -> str:
    """The /init shell script: modules in dependency order, the workload, power-off."""
    names = " ".join(module.name for module in modules)
    text = _INIT_HEAD.format(mark=MARK, modules=names)
    if workload.disk_kib > 0:
        blocks = -(-workload.disk_kib // 64)
        text += _DISK.format(kib=workload.disk_kib, blocks=blocks)
    if workload.net:
        text += _NET.format(tftp=workload.tftp_file)
    if workload.rebind:
        text += _REBIND.format()
    text += _TAIL
    return text


def build(busybox: bytes, modules: list[Module], workload: Workload) -> bytes:
    """The initramfs archive."""
    directory = stat.S_IFDIR | 0o755
    entries = [
        Entry("bin", directory),
        Entry("dev", directory),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("proc", directory),
        Entry("sys", directory),
        Entry("tmp", directory),
        Entry("lib", directory),
        Entry("lib/modules", directory),
        Entry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        Entry("init", stat.S_IFREG | 0o755, init_script(modules, workload).encode()),
    ]
    entries += [
        Entry(f"lib/modules/{module.name}.ko", stat.S_IFREG | 0o644, module.payload())
        for module in modules
    ]
    return newc(entries)
