"""Consuming a pinned BPF ring buffer by mmap, as libbpf's ring_buffer does, without libbpf.

The kernel lays a BPF_MAP_TYPE_RINGBUF map out for mmap (kernel/bpf/ringbuf.c): page 0
holds consumer_pos (the only page user space writes), page 1 producer_pos, and from
page 2 the data area, mapped twice in a row so a record that wraps is still contiguous.
Each record starts with an 8-byte header: a u32 length whose top bits say BUSY (being
written: stop there) or DISCARD (skip it), and a u32 page offset; records are padded
to 8 bytes. Positions only grow; the data offset is position & (size - 1).

Memory ordering: the kernel publishes a record with a release store of its length and
producer_pos. x86 keeps loads in order, so plain reads suffice there; on weakly
ordered machines a reader in Python has no acquire load, so a BUSY record is the
worst it sees early (it stops and resumes next time), never a torn one, as long as
the length is read before the payload, which is the order below.
"""

from __future__ import annotations

import mmap
import struct

RINGBUF_BUSY_BIT = 1 << 31
RINGBUF_DISCARD_BIT = 1 << 30
RINGBUF_HEADER_BYTES = 8
_POSITION = struct.Struct("=Q")
_LENGTH = struct.Struct("=I")


class RingBuffer:
    """The consumer side of one pinned ring buffer map."""

    def __init__(self, fd: int, size: int):
        """fd: the map's; size: its max_entries, the data bytes (a power of two pages)."""
        self.size = size
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data_offset = page  # within the producer mapping

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()

    def drain(self) -> list[bytes]:
        """Every committed record since the last drain, in order; the space is handed back."""
        consumer = _POSITION.unpack_from(self._consumer, 0)[0]
        producer = _POSITION.unpack_from(self._producer, 0)[0]
        records = []
        mask = self.size - 1
        while consumer < producer:
            header = self._data_offset + (consumer & mask)
            length = _LENGTH.unpack_from(self._producer, header)[0]
            if length & RINGBUF_BUSY_BIT:
                break  # still being written; later records wait behind it
            payload = length & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT)
            if not length & RINGBUF_DISCARD_BIT:
                start = header + RINGBUF_HEADER_BYTES
                records.append(self._producer[start : start + payload])
            consumer += (payload + RINGBUF_HEADER_BYTES + 7) // 8 * 8
        _POSITION.pack_into(self._consumer, 0, consumer)
        return records
