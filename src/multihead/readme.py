"""Generated documents (``python -m multihead.readme``): the README's variant table and seed count,
and ``docs/coverage.md`` (the seed papers' coverage, from ``multihead.coverage``)."""

from __future__ import annotations

import sys
from pathlib import Path

from . import coverage
from .catalog import markdown_table

START, END = "<!-- variants:start -->", "<!-- variants:end -->"
SEEDS_START, SEEDS_END = "<!-- seeds:start -->", "<!-- seeds:end -->"


def replace_block(text: str, start: str, end: str, body: str) -> str:
    """``text`` with what stands between the markers ``start`` and ``end`` replaced by ``body``."""
    head, found, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        raise ValueError(f"the document lacks the markers {start} ... {end}")
    return f"{head}{start}\n{body}\n{end}{tail}"


def seeds_block() -> str:
    """The README's seed-coverage paragraph and counts table."""
    return (f"{coverage.summary_line()} (`multihead list --seeds`; every row in "
            f"[`docs/coverage.md`](docs/coverage.md)).\n\n{coverage.counts_table()}")


def render(text: str) -> str:
    """``text`` with the generated blocks (variant table, seed coverage) replaced."""
    text = replace_block(text, START, END, markdown_table())
    return replace_block(text, SEEDS_START, SEEDS_END, seeds_block())


def main(path: str = "README.md", coverage_path: str | None = None) -> int:
    readme = Path(path)
    readme.write_text(render(readme.read_text()))
    target = Path(coverage_path) if coverage_path else readme.parent / "docs" / "coverage.md"
    target.write_text(coverage.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
