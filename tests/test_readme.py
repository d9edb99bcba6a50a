"""The README's quick example runs and its assertions hold."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quick_example_runs():
  text = README.read_text()
  section = text.split("## Quick example", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert "assert" in code  # the example checks its own result
  exec(compile(code, "README quick example", "exec"), {})


def test_ci_runs_exactly_the_readme_test_command():
  text = README.read_text()
  command = re.search(
      r"The tests:\n\n```bash\n(.*?)\n```", text, re.S
  ).group(1)
  ci = (README.parent / ".ci" / "run").read_text()
  assert command in ci.splitlines()
