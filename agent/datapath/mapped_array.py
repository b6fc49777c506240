"""A pinned BPF_F_MMAPABLE array map, read by copying its mapped memory.

The kernel lays such an array's values out back to back from a page boundary
(kernel/bpf/arraymap.c), each rounded up to 8 bytes, so the mapping is the map's
values in index order. A copy of it is the snapshot a batch lookup gives (each value
may be torn by a concurrent writer in both) without a syscall per chunk of values.
"""

from __future__ import annotations

import mmap

import numpy as np

from agent.datapath.pinned import PinnedMap


class MappedArray:
    def __init__(self, pinned: PinnedMap, dtype: np.dtype) -> None:  # type: ignore[type-arg]
        if pinned.value_size % 8 or pinned.value_size % dtype.itemsize:  # the mapping pads values to 8
            raise ValueError(
                f"values of {pinned.value_size} bytes are not mapped as {dtype.itemsize}-byte records"
            )
        self.dtype = dtype
        self._memory = mmap.mmap(pinned.fd, pinned.max_entries * pinned.value_size, prot=mmap.PROT_READ)
        # Bytes, viewed as records once copied: numpy copies a structured array field by
        # field (320 us for the flow cache's 256 KB), bytes with one memcpy (10 us).
        self._bytes: np.ndarray | None = np.frombuffer(self._memory, np.uint8)

    def read(self) -> np.ndarray:
        """Every value, as records of dtype, in index order."""
        assert self._bytes is not None, "MappedArray read after close()"
        return self._bytes.copy().view(self.dtype)

    def close(self) -> None:
        self._bytes = None  # the mmap cannot close while a view of it lives
        self._memory.close()
