"""README.md and docs/: every relative link points at a file that exists, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_point_at_files(page):
    targets = [target.split("#")[0] for target in LINK.findall(page.read_text())
               if not re.match(r"[a-z]+:", target) and not target.startswith("#")]
    missing = [target for target in targets if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_readme_is_short_and_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert {f"docs/{page.name}" for page in PAGES[1:]} <= set(LINK.findall(readme))


def test_help_examples_that_read_a_dataset_name_it():
    """Without --data-dir a command downloads CIFAR-10: an example in --help must run offline as written."""
    from allcnn.cli import main

    examples = [line.strip() for command in main.commands.values() for line in (command.help or "").splitlines()
                if line.strip().startswith(("allcnn train", "allcnn evaluate"))]
    assert len(examples) >= 8
    assert [line for line in examples if "--data-dir" not in line] == []
