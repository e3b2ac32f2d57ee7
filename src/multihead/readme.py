"""Generated blocks in documents: the README's variant table (``python -m multihead.readme``)."""

from __future__ import annotations

import sys
from pathlib import Path

from .catalog import markdown_table

START, END = "<!-- variants:start -->", "<!-- variants:end -->"


def replace_block(text: str, start: str, end: str, body: str) -> str:
    """``text`` with what stands between the markers ``start`` and ``end`` replaced by ``body``."""
    head, found, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        raise ValueError(f"the document lacks the markers {start} ... {end}")
    return f"{head}{start}\n{body}\n{end}{tail}"


def render(text: str) -> str:
    """``text`` with the block between the variant markers replaced by the catalog table."""
    return replace_block(text, START, END, markdown_table())


def main(path: str = "README.md") -> int:
    readme = Path(path)
    readme.write_text(render(readme.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
