"""Byte-level text corpora for language models: ``--data text:PATH`` (a UTF-8 file, or a folder of them) and
``text:stdlib`` (the ``*.py`` files of this Python's standard library, ``sysconfig.get_paths()['stdlib']``,
without site-packages).

A folder is split by file: a file goes to validation when the CRC-32 of its path (relative to the folder)
is 0 mod 10, so about one file in ten, the same on every machine and unchanged when files are added. A
single file is split by position: its last tenth is validation. Each split is its files' bytes joined (one
newline between files) in the order of their paths' CRC-32, a fixed shuffle, so that the first sequences of
a split (``--max-train-samples``) come from all over the folder; then cut into sequences of ``seq_len`` + 1
bytes that overlap by one.
"""

from __future__ import annotations

import sysconfig
import warnings
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

FORMS = "text:PATH (a UTF-8 file or a folder of them) | text:stdlib"
VALIDATION_EVERY = 10
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__"}


class ByteSequences(Dataset):
    """(input (seq_len,) int64, target (seq_len,) int64) pairs: consecutive windows of a byte string, the
    target being the input shifted by one byte."""

    def __init__(self, data: bytes, seq_len: int):
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.data) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = self.data[index * self.seq_len : (index + 1) * self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


def stdlib_root() -> Path:
    """The standard library folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(root: Path, pattern: str = "*") -> list[Path]:
    """The files under ``root`` matching ``pattern``, outside site-packages / dist-packages / caches, sorted."""
    return sorted(
        p
        for p in root.rglob(pattern)
        if p.is_file() and not SKIPPED_FOLDERS.intersection(p.relative_to(root).parts[:-1])
    )


def path_hash(relative: Path) -> int:
    """CRC-32 of a path relative to its folder: the same on every machine."""
    return zlib.crc32(relative.as_posix().encode())


def read_utf8(path: Path) -> bytes | None:
    """The file's bytes, or None when they are not UTF-8 text."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def text_splits(form: str) -> tuple[bytes, bytes]:
    """The (train, validation) bytes of ``--data form`` (see the module docstring); bad forms, missing paths
    and empty splits raise ``ValueError``."""
    kind, _, arg = form.partition(":")
    if kind != "text" or not arg:
        raise ValueError(f"--data {form!r}: not a text corpus; expected {FORMS}")
    root = stdlib_root() if arg == "stdlib" else Path(arg)
    if root.is_file():
        data = read_utf8(root)
        if data is None:
            raise ValueError(f"--data {form}: {root} is not UTF-8 text")
        cut = len(data) - len(data) // VALIDATION_EVERY
        train, val = data[:cut], data[cut:]
    elif root.is_dir():
        files = text_files(root, "*.py" if arg == "stdlib" else "*")
        files.sort(key=lambda path: path_hash(path.relative_to(root)))
        parts: dict[bool, list[bytes]] = {False: [], True: []}
        skipped = []
        for path in files:
            data = read_utf8(path)
            if data is None:
                skipped.append(path)
            else:
                parts[path_hash(path.relative_to(root)) % VALIDATION_EVERY == 0].append(data)
        if skipped:
            warnings.warn(
                f"skipping {len(skipped)} file(s) that are not UTF-8 text in {root}: {skipped[:3]}", stacklevel=2
            )
        train, val = b"\n".join(parts[False]), b"\n".join(parts[True])
    else:
        raise ValueError(f"--data {form}: {root} does not exist")
    if not train or not val:
        raise ValueError(
            f"--data {form}: an empty split (train {len(train)} bytes, validation {len(val)} bytes); a folder "
            f"needs files on both sides of the split (about 1 in {VALIDATION_EVERY} goes to validation)"
        )
    return train, val
