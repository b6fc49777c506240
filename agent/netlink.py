"""pyroute2's IPRoute without the cost of pyroute2's package __init__.

`import pyroute2` imports every part of the library (NDB, IPDB, the CLI, nftables ...):
~200 ms, the largest part of a front end's start. Registering the package module
without running its __init__ makes `pyroute2.iproute` cost ~65 ms. Anything that later
asks the package for a public name (`from pyroute2 import NDB`) still gets it: the
first such lookup runs the real __init__ in the same module object.

pyroute2.lab (a hook that turns IPRoute's methods into mocks for pyroute2's own tests)
imports unittest.mock, and with it asyncio and ssl: 52 modules, ~7 MB of a long-running
agent's RSS. It is registered here as what it is when mocking is off: a plain base class.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


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


class _NoMockLab:
    """pyroute2.lab.LAB_API with use_mock False: adds nothing to IPRoute."""


def _register_lab_without_mock() -> None:
    if "pyroute2.lab" in sys.modules:
        return
    lab = types.ModuleType("pyroute2.lab", "pyroute2's test-mock hook, off (agent/netlink.py)")
    lab.LAB_API = _NoMockLab  # type: ignore[attr-defined]
    lab.registry = []  # type: ignore[attr-defined]
    lab.use_mock = False  # type: ignore[attr-defined]
    sys.modules["pyroute2.lab"] = lab


_register_package_without_init()
_register_lab_without_mock()

from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

__all__ = ["IPRoute", "NetlinkError"]
