"""Reading a user's text files with errors that name the file, the line and what is wrong there; fsync."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def fsync(path: Path | str) -> None:
    """Flush a file's or a folder's content (a folder: its entries, after a rename) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def not_utf8(path: Path | str, data: bytes, err: UnicodeDecodeError) -> ValueError:
    line = data[:err.start].count(b"\n") + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return ValueError(f"{path}, line {line}, column {column}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the "
                      "file as UTF-8")


def read_utf8(path: Path | str) -> str:
    """The file's text; a file that is not UTF-8 is one line naming the line and column of the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, data, err) from None


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` whose syntax errors name ``where``, the line and the column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        place = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{where}{place}: not valid YAML ({' '.join(str(problem).split())})") from None
