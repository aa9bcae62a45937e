"""The experiment pages regenerate: the quick version of each runs end to end, and a
rerun writes the same page (every number equal)."""

import re

from hessdiag.experiments import EXPERIMENTS


def _numbers_only(page: str) -> str:
    return re.sub(r"\(\d+\.\d minutes", "(N minutes", page)


def test_eigensam_digits_quick_regenerates_the_same_page(tmp_path):
    module = EXPERIMENTS["eigensam-digits"]
    first = module.run(tmp_path / "a", quick=True).read_text()
    second = module.run(tmp_path / "b", quick=True).read_text()
    assert _numbers_only(first) == _numbers_only(second)
    for heading in ("## Final sharpness", "## Alignment with 95% confidence intervals"):
        assert heading in first
    rows = [line for line in first.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 3 + 3  # three runs; sam, eigensam and eigensam-exact alignments
    assert "eigensam-exact" in first and "[" in rows[-1]


def test_measures_quick_regenerates_the_same_page_from_its_store(tmp_path):
    from hessdiag.experiments.measures import QUICK, render
    from hessdiag.store import Store

    module = EXPERIMENTS["measures"]
    first = module.run(tmp_path / "a", quick=True).read_text()
    second = module.run(tmp_path / "b", quick=True).read_text()
    minutes = re.compile(r"\(\d+\.\d min")
    assert minutes.sub("", first) == minutes.sub("", second)
    rows = [line for line in first.splitlines() if line.startswith(("| digits |",
                                                                    "| tabular |"))]
    assert len(rows) == 6 and all("-" != cell.strip() for row in rows
                                  for cell in row.split("|")[6:8])
    # the page is a function of the store alone
    again = render(Store(tmp_path / "a" / "measures.h5"), QUICK, 0.0)
    assert minutes.sub("", again) == minutes.sub("", first)


def test_sam_families_quick_regenerates_the_same_page_from_its_store(tmp_path):
    from hessdiag.experiments.sam_families import QUICK, render
    from hessdiag.store import Store

    module = EXPERIMENTS["sam-families"]
    page = module.run(tmp_path / "a", quick=True).read_text()
    minutes = re.compile(r"\(\d+\.\d minutes")
    rows = [line for line in page.splitlines() if " | SAM | 0.05 |" in line]
    assert len(rows) == 2 * len(QUICK.families)  # the best-rho table and the sweep
    for family in ("wrn-digits", "transformer-ecg", "gcn-molecules"):
        for figure in ("sharpness", "density", "base-1d", "sam-2d", "eigensam-1d"):
            png = tmp_path / "a" / "figures" / f"sam-families-{family}-{figure}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every number on the page comes from the store
    again = render(Store(tmp_path / "a" / "families.h5"), QUICK, 0.0)
    assert minutes.sub("", again) == minutes.sub("", page)
    assert "in 3 of 3 families" in page or "of 3 families" in page
