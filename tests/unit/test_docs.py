"""The README is a front door and docs/ the manual: the site builds strictly (no broken link or
anchor, no page outside the nav), the README stays short and undated, and every page is reachable."""

import re
import subprocess
import sys

import yaml

from tests.conftest import REPO

DOCS = REPO / "docs"


def nav_pages(nav) -> list[str]:
    """Every page file named in mkdocs.yml's nav, at any depth."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return []


def test_the_site_builds_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "index.html").exists()


def test_readme_is_short_and_undated():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300): move reference material into docs/"
    dated = [f"{i}: {line}" for i, line in enumerate(lines, 1) if re.search(r"20\d\d-\d\d-\d\d", line)]
    assert not dated, "README.md holds dates (measurements go to bench/README.md, history to docs/experiments.md):\n" + "\n".join(dated)
    long = [i for i, line in enumerate(lines, 1) if len(line) > 200]
    assert not long, f"README.md lines over 200 characters: {long}"


def test_every_page_is_in_the_nav():
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert len(pages) >= 10, pages
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    nav = nav_pages(config["nav"])
    assert sorted(set(pages) - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - set(pages)) == [], "nav entries with no page"
