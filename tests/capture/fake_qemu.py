"""A stand-in for qemu-system-*: prints a guest's console markers, writes a trace log and
answers the human monitor the way QEMU does, so the kit's run loop is tested without QEMU.

``FAKE_QEMU_MODE``: ``ok`` (boot, workload, power-off, stop), ``hang`` (stops printing after
the modules and never stops), ``crash`` (exits before the power-off).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

MARK = "VIOMMUD-CAPTURE:"
REGS = {
    0x09050090: 0x4000_0000_5B70_0004,  # CMDQ_BASE: 0x5b700000, LOG2SIZE 4 (16 entries)
    0x09050098: 0x3,
    0x0905009C: 0x3,
}


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def serve(path: str, stopped: threading.Event) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    while True:
        conn, _ = server.accept()
        conn.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
        buffer = b""
        while True:
            data = conn.recv(4096)
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = line.decode().strip()
                reply = ""
                if command == "info status":
                    reply = "VM status: paused (shutdown)" if stopped.is_set() else "running"
                elif command.startswith("xp "):
                    address = int(command.split()[-1], 16)
                    width = 16 if "/1gx" in command else 8
                    reply = f"{address:016x}: 0x{REGS.get(address, 0):0{width}x}"
                elif command.startswith("pmemsave "):
                    _, _, size, path_arg = command.split(" ", 3)
                    with open(path_arg.strip('"'), "wb") as out:
                        out.write(bytes(range(256)) * (int(size, 16) // 256))
                elif command == "quit":
                    conn.close()
                    os._exit(0)
                conn.sendall(command.encode() + b"\r\n" + reply.encode() + b"\r\n(qemu) ")


def main() -> None:
    argv = sys.argv[1:]
    mode = os.environ.get("FAKE_QEMU_MODE", "ok")
    monitor = option(argv, "-monitor").removeprefix("unix:").split(",")[0]
    stopped = threading.Event()
    threading.Thread(target=serve, args=(monitor, stopped), daemon=True).start()
    with open(option(argv, "-D"), "w") as trace:
        trace.write("1@1.000001:smmuv3_write_mmio addr: 0x90 val:0x400000005b700004 size: 0x8\n")
    say = [f"init 6.1.0 cmdline={option(argv, '-append')}", "modules-loaded"]
    if mode != "hang":
        say += ["device blk 0000:00:01.0", "disk ok 64KiB", "workload-done"]
    for line in say:
        print(f"{MARK} {line}", flush=True)
    if mode == "crash":
        sys.exit(3)
    if mode == "hang":
        time.sleep(3600)
    print(f"{MARK} poweroff", flush=True)
    print("[    8.4] reboot: Power down", flush=True)
    stopped.set()
    time.sleep(3600)  # -no-shutdown: stays until the monitor says quit


if __name__ == "__main__":
    main()
