"""The study's text: Python's own standard library, read from the running interpreter.

Every machine with Python has it, so the study needs no download.  The split is deterministic
and independent of the file system's listing order: the ``.py`` files under ``Lib`` are sorted
by their relative path, and a file goes to validation when the SHA-256 of that path falls in
the validation bucket — adding or removing one file never moves another across the split.
Text is byte-level (vocabulary 256), so no tokenizer is involved.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Corpus", "stdlib_dir", "load_corpus", "sample_batch", "fixed_batches"]

VOCAB = 256


def stdlib_dir() -> Path:
    """The running interpreter's ``Lib`` directory (e.g. ``.../lib/python3.11``)."""
    path = Path(sysconfig.get_paths()["stdlib"])
    if not (path / "os.py").is_file():
        raise FileNotFoundError(
            f"no Python standard library sources at {path} (this interpreter ships none?)"
        )
    return path


def _is_validation(rel: str, val_buckets: int) -> bool:
    # 1 bucket in val_buckets goes to validation; the hash of the path, not its position in
    # the listing, decides — so the split survives files appearing or disappearing.
    digest = hashlib.sha256(rel.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % val_buckets == 0


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes as uint8 tensors, and where they came from."""

    train: torch.Tensor  # (n_train,) uint8
    val: torch.Tensor  # (n_val,) uint8
    meta: dict

    def describe(self) -> dict:
        """JSON-ready provenance: source directory, file counts, sizes and content hashes."""
        return dict(self.meta)


def load_corpus(max_train_bytes: int, max_val_bytes: int, val_buckets: int = 10,
                root: Path | None = None) -> Corpus:
    """Read the standard library's ``.py`` files into train/validation byte tensors.

    Files are taken in sorted relative-path order (``site-packages`` and ``__pycache__``
    excluded) until each split holds its byte budget, each file whole (the last one cut at the
    budget).  The content hashes in ``meta`` let two runs confirm they trained on the same bytes.

    Args:
        max_train_bytes, max_val_bytes: byte budgets of the two splits.
        val_buckets: one file in this many (by path hash) is a validation file.
        root: the ``Lib`` directory (default: :func:`stdlib_dir`).

    Returns:
        A :class:`Corpus`.
    """
    root = Path(root) if root is not None else stdlib_dir()
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "__pycache__" not in p.parts and p.is_file()
    )
    budgets = {"train": max_train_bytes, "val": max_val_bytes}
    chunks: dict[str, list[bytes]] = {"train": [], "val": []}
    used = {"train": 0, "val": 0}
    counts = {"train": 0, "val": 0}
    for rel in files:
        split = "val" if _is_validation(rel, val_buckets) else "train"
        room = budgets[split] - used[split]
        if room <= 0:
            if all(budgets[s] - used[s] <= 0 for s in budgets):
                break
            continue
        data = (root / rel).read_bytes()[:room]
        chunks[split].append(data)
        used[split] += len(data)
        counts[split] += 1
    blobs = {s: b"".join(c) for s, c in chunks.items()}
    for s, blob in blobs.items():
        if len(blob) < 4096:
            raise ValueError(f"the {s} split holds only {len(blob)} bytes; raise its budget")
    meta = {
        "source": str(root),
        "python": sys.version.split()[0],
        "files_total": len(files),
        "files": counts,
        "bytes": {s: len(b) for s, b in blobs.items()},
        "sha256": {s: hashlib.sha256(b).hexdigest() for s, b in blobs.items()},
        "val_buckets": val_buckets,
    }
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(blobs["train"]), as_tensor(blobs["val"]), meta)


def sample_batch(data: torch.Tensor, batch: int, context: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``context`` bytes and their next-byte targets, int64 (B, T).
    The windows come from ``gen`` only, so a seeded generator gives the same batches."""
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


def fixed_batches(data: torch.Tensor, n_batches: int, batch: int, context: int,
                  seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same evaluation batches for every run (a seed of their own, not the run's)."""
    gen = torch.Generator().manual_seed(seed)
    return [sample_batch(data, batch, context, gen) for _ in range(n_batches)]
