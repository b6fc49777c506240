"""Find a kernel header tree BCC can compile against.

Our BPF C includes UAPI headers only, so the headers of another minor kernel
version serve. BCC looks in /lib/modules/$(uname -r)/build (and .../source, where
Debian splits its headers into -amd64 and -common trees); BCC_KERNEL_SOURCE can
only name one tree, which is not enough for Debian's split, so we link both.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.errors import EXIT_KERNEL, UserError

log = logging.getLogger(__name__)

HEADERS_PACKAGE_HINT = "apt-get install linux-headers-amd64"


@dataclass(frozen=True)
class HeaderTree:
    build: Path  # has Makefile and include/generated
    source: Path | None  # Debian's -common tree, where the split applies


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def _has_kconfig(tree: Path) -> bool:
    return (tree / "include" / "linux" / "kconfig.h").is_file()


def find_installed_headers(src_root: Path = Path("/usr/src")) -> HeaderTree | None:
    """The newest linux-headers-* tree under src_root, pairing Debian's -common half."""
    candidates = sorted(
        (p for p in src_root.glob("linux-headers-*") if not p.name.endswith("-common") and p.is_dir()),
        key=_version_key,
        reverse=True,
    )
    for build in candidates:
        if _has_kconfig(build):
            return HeaderTree(build=build, source=None)
        common = build.with_name(re.sub(r"-[^-]+$", "-common", build.name))
        if _has_kconfig(common):
            return HeaderTree(build=build, source=common)
    return None


def ensure_kernel_headers(
    release: str | None = None,
    modules_root: Path = Path("/lib/modules"),
    src_root: Path = Path("/usr/src"),
) -> None:
    """Make sure BCC will find headers; raise UserError naming the package if none exist."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return
    release = release or os.uname().release
    moddir = modules_root / release
    build = moddir / "build"
    if build.exists() and (_has_kconfig(build) or _has_kconfig(moddir / "source")):
        return
    tree = find_installed_headers(src_root)
    if tree is None:
        raise UserError(
            f"no kernel headers for {release} and none under {src_root}: run '{HEADERS_PACKAGE_HINT}'",
            EXIT_KERNEL,
        )
    moddir.mkdir(parents=True, exist_ok=True)
    _replace_symlink(build, tree.build)
    if tree.source is not None:
        _replace_symlink(moddir / "source", tree.source)
    log.warning(
        "no headers packaged for kernel %s: using %s (UAPI headers suffice)", release, tree.build.name
    )


def _replace_symlink(link: Path, target: Path) -> None:
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise UserError(
            f"{link} exists but has no kernel headers: remove it or set BCC_KERNEL_SOURCE", EXIT_KERNEL
        )
    link.symlink_to(target)
