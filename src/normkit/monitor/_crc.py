"""CRC-32C (Castagnoli), compiled: TFRecord framing for the TensorBoard exporter.

Its own module so that numba is imported only when a TensorBoard exporter writes.
"""

from __future__ import annotations

import numba
import numpy as np


def _table() -> np.ndarray:
    table = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table[i] = c
    return table


_TABLE = _table()


@numba.njit(cache=True, nogil=True)
def _crc(buf, table):  # pragma: no cover - compiled
    c = np.uint32(0xFFFFFFFF)
    for b in buf:
        c = table[(c ^ np.uint32(b)) & np.uint32(0xFF)] ^ (c >> np.uint32(8))
    return c ^ np.uint32(0xFFFFFFFF)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (what TensorBoard's readers verify)."""
    c = int(_crc(np.frombuffer(data, np.uint8), _TABLE))
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
