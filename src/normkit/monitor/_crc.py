"""CRC-32C (Castagnoli) for TFRecord framing in the TensorBoard exporter, from
``google-crc32c`` (Google's C implementation, hardware CRC32 instructions where the CPU has them;
in the ``monitor`` extra).

Its own module so that the package is imported only when a TensorBoard exporter writes.
tensorboard's own pure-Python CRC takes ~1 ms per 6 KB event, holding the GIL.
"""

from __future__ import annotations

try:
    import google_crc32c
except ImportError as e:  # pragma: no cover - the extra installs it
    raise ImportError("the TensorBoard exporter needs google-crc32c: "
                      "pip install 'normkit[monitor]'") from e


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (what TensorBoard's readers verify)."""
    c = google_crc32c.value(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
