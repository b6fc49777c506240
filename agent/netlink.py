"""pyroute2's IPRoute without the cost of pyroute2's package __init__.

`import pyroute2` imports every part of the library (NDB, IPDB, the CLI, nftables ...):
~200 ms, the largest part of a front end's start. Registering the package module
without running its __init__ makes `pyroute2.iproute` cost ~65 ms. Anything that later
asks the package for a public name (`from pyroute2 import NDB`) still gets it: the
first such lookup runs the real __init__ in the same module object.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def _register_package_without_init() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        return  # not installed: the import below says so
    package = importlib.util.module_from_spec(spec)

    def full_namespace(name: str) -> object:
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")  # `from pyroute2 import config`
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = full_namespace  # type: ignore[method-assign]
    sys.modules["pyroute2"] = package


_register_package_without_init()

from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

__all__ = ["IPRoute", "NetlinkError"]
