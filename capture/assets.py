"""The kit's inputs from Debian packages: QEMU, a kernel image with its modules, busybox.

Everything lands in a cache directory (default ``~/.cache/viommud-capture``): the .deb files
under ``debs/``, each package extracted with ``dpkg-deb -x`` under ``pkgs/<package>/``. A
second run finds them there and needs neither apt nor the network.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Busybox",
    "CaptureError",
    "Kernel",
    "Module",
    "default_cache",
    "ensure_qemu",
    "fetch_busybox",
    "fetch_kernel",
    "module_closure",
    "qemu_version",
]

ARCHES = ("amd64", "arm64")
QEMU_BINARY = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}
QEMU_PACKAGE = {"amd64": "qemu-system-x86", "arm64": "qemu-system-arm"}
# Suites the kit knows how to reach with the system's keyring; bookworm is the system's own
# apt configuration, the others get a private list under the cache (nothing in /etc changes).
SUITES = {"bookworm": None, "bookworm-backports": "bookworm-backports"}
APT_TIMEOUT = 900


class CaptureError(Exception):
    """The kit cannot go on; the message says what is missing or what failed."""


def default_cache() -> Path:
    """``$VIOMMUD_CAPTURE_CACHE``, else ``$XDG_CACHE_HOME/viommud-capture`` (~/.cache)."""
    if os.environ.get("VIOMMUD_CAPTURE_CACHE"):
        return Path(os.environ["VIOMMUD_CAPTURE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "viommud-capture"


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = APT_TIMEOUT) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise CaptureError(f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CaptureError(f"{' '.join(argv)} took more than {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise CaptureError(
            f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-600:]}"
        )
    return done.stdout


def _is_root() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def ensure_qemu(arch: str, *, install: bool) -> Path:
    """The qemu-system binary for ``arch``, installed with apt-get when missing (root only)."""
    binary = QEMU_BINARY[arch]
    found = shutil.which(binary)
    if found is None and install and _is_root():
        env_argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
        _run([*env_argv, QEMU_PACKAGE[arch]])
        found = shutil.which(binary)
    if found is None:
        raise CaptureError(f"{binary} not found (apt-get install {QEMU_PACKAGE[arch]})")
    return Path(found)


def qemu_version(binary: Path) -> str:
    first = _run([str(binary), "--version"], timeout=30).splitlines()[0]
    return first.removeprefix("QEMU emulator version ").strip()


def _apt_options(cache: Path, suite: str) -> list[str]:
    """apt-get/apt-cache options for ``suite`` (none for the system's own configuration)."""
    extra = SUITES.get(suite, "missing")
    if extra == "missing":
        raise CaptureError(f"unknown suite {suite!r} (known: {', '.join(SUITES)})")
    if extra is None:
        return []
    root = cache / "apt" / suite
    lists = root / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    sources = root / "sources.list"
    sources.write_text(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        f"http://deb.debian.org/debian {extra} main\n"
    )
    return [
        "-o",
        f"Dir::Etc::SourceList={sources}",
        "-o",
        "Dir::Etc::SourceParts=/dev/null",
        "-o",
        f"Dir::State::Lists={lists}",
    ]


def _ensure_foreign_arch(arch: str) -> None:
    native = _run(["dpkg", "--print-architecture"], timeout=30).strip()
    if arch == native:
        return
    foreign = _run(["dpkg", "--print-foreign-architectures"], timeout=30).split()
    if arch in foreign:
        return
    if not _is_root():
        raise CaptureError(f"dpkg has no {arch} architecture (as root: dpkg --add-architecture)")
    _run(["dpkg", "--add-architecture", arch], timeout=30)
    _run(["apt-get", "update", "-q"])


def _apt_package(name: str, arch: str) -> str:
    native = _run(["dpkg", "--print-architecture"], timeout=30).strip()
    return name if arch == native else f"{name}:{arch}"


def _download(cache: Path, suite: str, package: str, arch: str) -> Path:
    """The .deb of ``package`` for ``arch`` in the cache, fetched with apt-get download."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    pattern = f"{package.replace('+', '*')}_*_{arch}.deb"
    have = sorted(debs.glob(pattern))
    if not have:
        options = _apt_options(cache, suite)
        if options:
            _run(["apt-get", "-q", *options, "update"])
        _run(["apt-get", "-q", *options, "download", _apt_package(package, arch)], cwd=debs)
        have = sorted(debs.glob(pattern))
    if not have:
        raise CaptureError(f"apt-get download {package} left no {pattern} in {debs}")
    return have[-1]


def _extract(cache: Path, deb: Path, package: str) -> Path:
    dest = cache / "pkgs" / f"{package}_{deb.name.split('_')[-1].removesuffix('.deb')}"
    done = dest / ".extracted"
    if not done.exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(dest)], timeout=300)
        done.write_text(deb.name + "\n")
    return dest


@dataclass(frozen=True, slots=True)
class Module:
    """One loadable kernel module in an extracted kernel package."""

    name: str
    path: Path
    depends: tuple[str, ...]

    def payload(self) -> bytes:
        """The module's ELF bytes (busybox insmod takes no compressed module)."""
        raw = self.path.read_bytes()
        return lzma.decompress(raw) if self.path.suffix == ".xz" else raw


@dataclass(frozen=True, slots=True)
class Kernel:
    """A Debian kernel image package, extracted."""

    arch: str
    suite: str
    package: str
    deb: str
    release: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def config(self, option: str) -> str | None:
        """A CONFIG_ option's value in the package's boot/config (None when not set)."""
        text = (self.root / "boot" / f"config-{self.release}").read_text()
        found = re.search(rf"^{re.escape(option)}=(.*)$", text, re.MULTILINE)
        return None if found is None else found[1]

    def builtin(self) -> set[str]:
        lines = (self.modules_dir / "modules.builtin").read_text().split()
        return {_module_name(Path(line)) for line in lines}

    def modules(self) -> dict[str, Module]:
        """Every loadable module by name, with its ``depends=`` from its .modinfo."""
        found: dict[str, Module] = {}
        for path in sorted((self.modules_dir / "kernel").rglob("*.ko*")):
            name = _module_name(path)
            found[name] = Module(name, path, ())
        return found


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


def module_depends(payload: bytes) -> tuple[str, ...]:
    """The ``depends=`` list of a module's .modinfo strings (what depmod puts in modules.dep)."""
    found = _DEPENDS.search(payload)
    if found is None:
        return ()
    return tuple(name for name in found[1].decode().split(",") if name)


def module_closure(kernel: Kernel, wanted: list[str]) -> list[Module]:
    """``wanted`` and everything they depend on, dependencies first, built-ins left out.

    Debian's packages ship no modules.dep (depmod writes it at install time), so the
    dependencies come from each module's own .modinfo, which is what depmod reads.
    """
    available = kernel.modules()
    builtin = kernel.builtin()
    order: list[Module] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise CaptureError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        module = available.get(name)
        if module is None:
            raise CaptureError(f"{kernel.package} has no module {name} and does not build it in")
        depends = module_depends(module.payload())
        for dep in depends:
            visit(dep, (*chain, name))
        seen.add(name)
        order.append(Module(name, module.path, depends))

    for name in wanted:
        visit(name, ())
    return order


def _kernel_package(cache: Path, suite: str, arch: str) -> str:
    """The versioned package the ``linux-image-<arch>`` metapackage depends on."""
    options = _apt_options(cache, suite)
    if options:
        _run(["apt-get", "-q", *options, "update"])
    meta = _apt_package(f"linux-image-{arch}", arch)
    text = _run(["apt-cache", *options, "depends", meta], timeout=120)
    found = re.search(r"Depends: (linux-image-[0-9][^\s:]*)", text)
    if found is None:
        raise CaptureError(f"apt-cache depends {meta}: no linux-image dependency in {text!r}")
    return found[1]


def fetch_kernel(cache: Path, arch: str, suite: str) -> Kernel:
    """The current kernel of ``suite`` for ``arch``: resolved, downloaded and extracted once.

    The resolution is remembered in the cache, so later runs work offline.
    """
    if arch not in ARCHES:
        raise CaptureError(f"unknown architecture {arch!r}")
    memo = cache / f"kernel-{suite}-{arch}.json"
    if memo.exists():
        saved = json.loads(memo.read_text())
        kernel = Kernel(
            arch, suite, saved["package"], saved["deb"], saved["release"], Path(saved["root"])
        )
        if kernel.vmlinuz.exists():
            return kernel
    _ensure_foreign_arch(arch)
    package = _kernel_package(cache, suite, arch)
    deb = _download(cache, suite, package, arch)
    root = _extract(cache, deb, package)
    release = package.removeprefix("linux-image-")
    kernel = Kernel(arch, suite, package, deb.name, release, root)
    if not kernel.vmlinuz.exists():
        raise CaptureError(f"{deb.name} holds no boot/vmlinuz-{release}")
    memo.write_text(
        json.dumps({"package": package, "deb": deb.name, "release": release, "root": str(root)})
    )
    return kernel


@dataclass(frozen=True, slots=True)
class Busybox:
    arch: str
    deb: str
    binary: Path


def fetch_busybox(cache: Path, arch: str) -> Busybox:
    """busybox-static for ``arch`` (the guest's architecture, not necessarily the host's)."""
    _ensure_foreign_arch(arch)
    deb = _download(cache, "bookworm", "busybox-static", arch)
    root = _extract(cache, deb, "busybox-static")
    binary = root / "bin" / "busybox"
    if not binary.exists():
        raise CaptureError(f"{deb.name} holds no bin/busybox")
    return Busybox(arch, deb.name, binary)
