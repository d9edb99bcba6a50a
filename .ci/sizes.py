"""Fails when optax_accum/ outgrows its budget: 3,000 lines in all, 450 per
module, 60 lines of code per function (its docstring excluded)."""

import ast
import pathlib
import sys

total, problems = 0, []
for path in sorted(pathlib.Path("optax_accum").rglob("*.py")):
  source = path.read_text()
  lines = len(source.splitlines())
  total += lines
  if lines > 450:
    problems.append(f"{path}: {lines} lines (at most 450)")
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      length = (node.end_lineno or 0) - node.lineno + 1
      if ast.get_docstring(node, clean=False) is not None:
        doc = node.body[0]
        length -= (doc.end_lineno or 0) - doc.lineno + 1
      if length > 60:
        problems.append(f"{path}:{node.lineno} {node.name}: {length} lines")
if total > 3000:
  problems.append(f"optax_accum/: {total} lines (at most 3,000)")
print(f"optax_accum/: {total} lines")
print("\n".join(problems))
sys.exit(1 if problems else 0)
