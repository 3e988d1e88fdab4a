"""The package's layout: no import cycle among kd_jax's modules, and kd_jax/train/ holds only the
train state, the step, the loss terms, the loop, evaluation and DOT's two-gradient optimizer."""

import ast
import os

import kd_jax

ROOT = os.path.dirname(kd_jax.__file__)


def _modules():
  out = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


def _imports(path, name, modules):
  """kd_jax modules imported at module level (any `import` statement outside a function)."""
  tree = ast.parse(open(path).read())
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  found = set()

  def visit(node):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        continue
      if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
        continue
      if isinstance(child, ast.Import):
        found.update(a.name for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = package.split(".")[:len(package.split(".")) - child.level + 1]
          base = ".".join(parts + ([base] if base else []))
        found.add(base)
        found.update(f"{base}.{a.name}" for a in child.names)
      visit(child)

  visit(tree)
  return {m for m in found if m in modules and m != name}


def test_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(p, m, modules) for m, p in modules.items()}
  # A package imports its parents implicitly; edges to a parent package are not cycles of ours.
  graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
  state, stack, cycles = {}, [], []

  def dfs(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        dfs(d)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      dfs(m)
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_train_package_holds_only_the_training_pieces():
  entries = sorted(e for e in os.listdir(os.path.join(ROOT, "train")) if not e.startswith("__"))
  # dot_optim.py: DOT's optimizer, which takes the step's two gradients (the step depends on it).
  assert entries == ["dot_optim.py", "evaluate.py", "loop.py", "state.py", "step.py", "terms"]
