"""docs/coverage.md, the seed-paper coverage data and ``multihead list --seeds`` stay true and in step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from multihead import catalog, coverage
from multihead.catalog import Paper, Variant
from multihead.cli import main
from multihead.coverage import IMPLEMENTED, MISSING, OUT_OF_SCOPE, Row
from multihead.readme import render

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [ROOT / "shared" / "reference" / "seed-papers.md", ROOT.parent / "shared" / "reference" / "seed-papers.md"]

#: Papers per family in the seed catalogue's headings ("### 1. Head topology ... (14)").
FAMILY_SIZES = {1: 14, 2: 27, 3: 16, 4: 12, 5: 8, 6: 11, 7: 18, 8: 2, 10: 15, 11: 4, 12: 3, 13: 4}


def test_every_name_resolves_and_every_test_exists():
    assert coverage.problems(test_root=ROOT / "tests") == []


def test_rows_follow_the_seed_catalogue_family_sizes():
    assert len(coverage.ROWS) == 134
    assert Counter(r.family for r in coverage.ROWS) == FAMILY_SIZES
    assert len({r.paper for r in coverage.ROWS}) == len(coverage.ROWS)


def test_rows_are_exactly_the_seed_catalogue():
    path = next((p for p in SEEDS if p.is_file()), None)
    if path is None:
        pytest.skip("shared/reference/seed-papers.md is not in this checkout")
    seeds = coverage.parse_seed_catalogue(path.read_text())
    assert len(seeds) == 134
    assert sorted(seeds) == sorted((r.family, r.paper) for r in coverage.ROWS)


def test_problems_catch_rows_that_lie(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_real():\n    pass\n")
    bad = [
        Row(1, "a", IMPLEMENTED, ("heads.NoSuchHead",), ("test_x.py::test_real",)),
        Row(1, "b", IMPLEMENTED, ("variant:no_such_variant",), ("test_x.py::test_real",)),
        Row(1, "c", IMPLEMENTED, ("heads.MixtureOfHeads",), ("test_x.py::test_imaginary",)),
        Row(1, "d", IMPLEMENTED, ("heads.MixtureOfHeads",), ("test_nofile.py::test_real",)),
        Row(1, "e", IMPLEMENTED, ("heads.MixtureOfHeads",), ()),
        Row(1, "f", OUT_OF_SCOPE, (), (), "why", "because"),
        Row(1, "g", MISSING, (), (), ""),
        Row(1, "h", MISSING, ("nosuchmodule.Thing",), (), "needs work"),
    ]
    found = coverage.problems(bad, test_root=tmp_path)
    for paper in "abcdefgh":
        assert any(f"'{paper}'" in p for p in found), paper
    good = Row(1, "ok", IMPLEMENTED, ("heads.MixtureOfHeads", "variant:moh"), ("test_x.py::test_real",))
    assert coverage.problems([good], test_root=tmp_path) == []
    assert any("twice" in p for p in coverage.problems([good, good], test_root=tmp_path))


def test_resolve_finds_modules_attributes_and_variants():
    from multihead.heads import MixtureOfHeads

    assert coverage.resolve("heads.MixtureOfHeads") is MixtureOfHeads
    assert coverage.resolve("variant:moh") is catalog.get("moh")
    with pytest.raises(LookupError, match="no attribute"):
        coverage.resolve("heads.Nope")


def test_rows_reject_unknown_status_and_family():
    with pytest.raises(ValueError, match="status"):
        Row(1, "x", "done")
    with pytest.raises(ValueError, match="family"):
        Row(9, "x", MISSING, note="n")


def test_every_catalog_entry_names_a_paper():
    assert coverage.catalog_problems(catalog.CATALOG.values()) == []
    nameless = Variant("x", "pattern", "s", Paper("", 2020), lambda d, h, n: None)
    assert coverage.catalog_problems([nameless]) == ["variant 'x' names no paper (title and year)"]
    malformed = Variant("y", "pattern", "s", Paper("T", 2020, "12.3"), lambda d, h, n: None)
    assert "malformed" in coverage.catalog_problems([malformed])[0]


def test_implemented_rows_offer_something_that_is_tested():
    for r in coverage.ROWS:
        if r.status == IMPLEMENTED:
            assert r.offers and r.tests, r.paper


def test_docs_coverage_is_generated_from_the_data():
    text = (ROOT / "docs" / "coverage.md").read_text()
    assert text == coverage.markdown(), "docs/coverage.md is stale: run `make readme`"
    for r in coverage.ROWS:
        assert r.paper.replace("|", "\\|") in text


def test_readme_carries_the_seed_counts():
    text = (ROOT / "README.md").read_text()
    assert render(text) == text, "README is stale: run `make readme`"
    assert coverage.summary_line() in text


def test_list_seeds_prints_the_counts(capsys):
    assert main(["list", "--seeds", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == coverage.counts_table()
    assert main(["list", "--seeds"]) == 0
    out = capsys.readouterr().out
    totals = coverage.totals()
    last = [line for line in out.splitlines() if line.strip("│ ").startswith("all ")][0]
    cells = [c.strip() for c in last.strip().strip("│").split("│")]
    assert cells == ["all", "134", str(totals[IMPLEMENTED]), str(totals[OUT_OF_SCOPE]), str(totals[MISSING])]
    for family in coverage.FAMILIES.values():
        assert family in out
    with pytest.raises(SystemExit):
        main(["list", "--seeds", "--costs"])
