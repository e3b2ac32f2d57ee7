"""Keep the README's variant table equal to the catalog: ``python -m multihead.readme``."""

from __future__ import annotations

import sys
from pathlib import Path

from .catalog import markdown_table

START, END = "<!-- variants:start -->", "<!-- variants:end -->"


def render(text: str) -> str:
    """``text`` with the block between the variant markers replaced by the catalog table."""
    head, found, rest = text.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError(f"README lacks the markers {START} ... {END}")
    return f"{head}{START}\n{markdown_table()}\n{END}{tail}"


def main(path: str = "README.md") -> int:
    readme = Path(path)
    readme.write_text(render(readme.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
