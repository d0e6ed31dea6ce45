"""Links into docs/ from the code and the docs themselves point at files and sections that exist."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in doc.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_slug_follows_github():
    assert slug(" Mamba-2 block") == "mamba-2-block" and slug("Linear-time form") == "linear-time-form"


def cited_links():
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md")
             and not any(part.startswith(".") or part in ("venv", "build") for part in p.relative_to(ROOT).parts)]
    for path in files:
        for match in LINK.finditer(path.read_text(errors="replace")):
            yield pytest.param(match.group(1), match.group(2), id=f"{path.relative_to(ROOT)}->{match.group(0)}")
    for target in re.findall(r"\]\(#([\w-]+)\)", (ROOT / "docs" / "math.md").read_text()):
        yield pytest.param("math.md", target, id=f"docs/math.md->#{target}")


@pytest.mark.parametrize("doc,anchor", list(cited_links()))
def test_cited_section_exists(doc, anchor):
    assert anchor in anchors(ROOT / "docs" / doc), f"no section #{anchor} in docs/{doc}"
