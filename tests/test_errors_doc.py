"""docs/errors.md names a test for every error it documents; each of those tests exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_errors_table_names_exists():
    doc = (ROOT / "docs" / "errors.md").read_text()
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", doc))
    rows = [line for line in doc.splitlines()
            if line.startswith("| ") and not line.startswith(("| `--set ", "| mistake ", "| setting ", "| --- "))]
    unnamed = [row for row in rows if not re.search(r"`test_\w+\.py::test_\w+`", row)]
    assert rows and not unnamed, f"rows that name no test: {unnamed}"
    for file, test in sorted(named):
        assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M), f"{file}::{test} is missing"


def test_every_bad_setting_of_the_suite_is_in_the_table():
    from test_settings import BAD_SETTINGS

    doc = (ROOT / "docs" / "errors.md").read_text()
    rows = re.findall(r"^\| `--set (.+?)` \| `(.+?)` \|$", doc, re.M)
    assert rows == BAD_SETTINGS


def test_the_count_at_the_top_is_the_count_of_rows():
    doc = (ROOT / "docs" / "errors.md").read_text()
    settings = len(re.findall(r"^\| `--set ", doc, re.M))
    others = len(re.findall(r"^\| (?!`--set |mistake |setting |--- )", doc, re.M))
    assert f"{settings} settings and {others} other cases: {settings + others} in all" in doc
    readme = (ROOT / "README.md").read_text()
    assert f"the {settings + others} mistakes and failures dsutil handles" in " ".join(readme.split())
