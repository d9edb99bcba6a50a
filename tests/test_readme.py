"""The README's promises about itself: its test command is what CI runs, it
stays short, and every guide it links exists (its Python blocks run in
tests/test_docs.py)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_ci_runs_exactly_the_readme_test_command():
  text = README.read_text()
  command = re.search(r"The tests:\n\n```bash\n(.*?)\n```", text, re.S).group(1)
  ci_path = README.parent / ".ci" / "run"
  if not ci_path.exists():
    pytest.skip("no .ci/run outside a repository checkout (an sdist)")
  assert command in ci_path.read_text().splitlines()


def test_the_readme_is_short_and_its_links_resolve():
  text = README.read_text()
  assert len(text.splitlines()) <= 150
  links = re.findall(r"\]\(([^)#]+)\)", text)
  assert "docs/index.md" in links
  if not (README.parent / "docs").exists():
    pytest.skip("no docs/ outside a repository checkout (an sdist)")
  missing = [link for link in links if not (README.parent / link).exists()]
  assert not missing
