"""The shared corpora (CPUFORMER_TEST_DATA, else ../shared/data beside the checkout) for the tokenizer tests: DATA
and read_lines."""
from __future__ import annotations

from data_path import DATA


def read_lines(rel, n, skip_header=False, column=None):
    """The first n non-empty lines of DATA/rel (of one TSV column, after the header when asked); [] when absent."""
    path = DATA / rel
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    if skip_header:
        lines = lines[1:]
    if column is not None:
        lines = [ln.split("\t")[column] for ln in lines if ln]
    return [ln for ln in lines if ln][:n]
