"""Readers for plain-text corpora and tab-separated files (``text<TAB>label``, ``source<TAB>target``), and
line-aligned parallel files. Malformed lines raise an error naming the file and line, or are skipped and counted
with ``skip_malformed=True``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

__all__ = ["read_text", "read_tsv", "read_parallel", "ReadReport"]


@dataclass
class ReadReport:
    """What a reader skipped (when asked to skip malformed lines)."""
    skipped: int = 0
    skipped_lines: List[int] = field(default_factory=list)


def read_text(path: str) -> str:
    """A whole UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_tsv(path: str, columns: int = 2, header: Optional[bool] = None, label_column: Optional[int] = None,
             skip_malformed: bool = False, report: Optional[ReadReport] = None) -> List[Tuple]:
    """Rows of a tab-separated file with exactly ``columns`` fields. ``header=None`` skips a first line whose
    label column is not an integer (e.g. ``sentence<TAB>label``). With ``label_column`` that column is parsed as
    an int. A malformed line raises ``ValueError("path:line: ...")``, or is counted in ``report`` when
    ``skip_malformed``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if lineno == 1 and header is not False:
                is_header = header is True or (label_column is not None and len(parts) == columns
                                               and not parts[label_column].strip().lstrip("-").isdigit())
                if is_header:
                    continue
            problem = None
            if len(parts) != columns:
                problem = f"expected {columns} tab-separated fields, found {len(parts)}"
            elif label_column is not None:
                try:
                    parts[label_column] = int(parts[label_column])
                except ValueError:
                    problem = f"label {parts[label_column]!r} is not an integer"
            if problem:
                if not skip_malformed:
                    raise ValueError(f"{path}:{lineno}: {problem}")
                if report is not None:
                    report.skipped += 1
                    report.skipped_lines.append(lineno)
                continue
            rows.append(tuple(parts))
    return rows


def read_parallel(source_path: str, target_path: str) -> List[Tuple[str, str]]:
    """Line-aligned source/target files (e.g. ``train.en`` and ``train.fr``). Different line counts raise."""
    with open(source_path, encoding="utf-8") as f:
        src = f.read().split("\n")
    with open(target_path, encoding="utf-8") as f:
        tgt = f.read().split("\n")
    while src and src[-1] == "" and tgt and tgt[-1] == "":
        src.pop()
        tgt.pop()
    if len(src) != len(tgt):
        raise ValueError(f"{source_path} has {len(src)} lines but {target_path} has {len(tgt)}")
    return list(zip(src, tgt))
