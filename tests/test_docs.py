"""Every Python block of README.md and docs/*.md runs as written: the blocks
of one page in order, in one namespace, in a fresh working directory. A
page that uses a feature beyond this install's floors skips, saying which."""

import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(page):
  return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def _missing_feature(code):
  if "axis_name" in code and jax.__version_info__ < (0, 10, 0):
    return "the deferred reduction (axis_name) needs jax>=0.10"
  if "pcast" in code and not hasattr(jax.lax, "pcast"):
    return "jax.lax.pcast (per-device values in shard_map) needs jax>=0.10"
  if "nnx" in code:
    from flax import nnx  # pylint: disable=g-import-not-at-top

    if not hasattr(nnx, "as_pure"):
      return "the NNX front end needs flax>=0.12.7"
  return None


@pytest.mark.parametrize(
  "page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name
)
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
  blocks = _blocks(page)
  reason = _missing_feature("".join(blocks))
  if reason:
    pytest.skip(reason)
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": f"docs_{page.stem}"}
  for i, code in enumerate(blocks):
    exec(compile(code, f"{page.name}, block {i + 1}", "exec"), namespace)  # noqa: S102
