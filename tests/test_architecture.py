"""The package's plan holds: no import cycles, lower layers never import higher ones, no private
names across packages, and every `var_jax` name the README uses exists.

Imports are read from the source with `ast` (function-level imports included), so the test needs
no optional dependency and catches an import that only runs on some code path.
"""
import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "var_jax"

# Lowest first. A module may import modules of its own layer or of lower layers only.
LAYERS = [
    {"var_jax.errors", "var_jax.scales",    # the foundation every layer may use
     "var_jax.compile_cache", "var_jax.mesh_axes", "var_jax.paths",
     "var_jax.cpu_gemm_library"},          # builds and registers ops/cpu_gemm's handler
    {"var_jax.kernels"},                    # Pallas kernels, the XLA reference, their shard_map
    {"var_jax.ops"},                        # attention dispatch, exact resizes
    {"var_jax.models"},                     # the paper's networks and their configs
    {"var_jax.parallel"},                   # meshes, logical-axis rules, multi-host start-up
    {"var_jax.checkpoints"},                # torch pickles, torch -> Flax conversion
    {"var_jax.inference"},                  # Tokenizer, VARModel, placement, sampling, editing
    {"var_jax.data"},                       # input pipeline
    {"var_jax.eval"},                       # FID, Inception, sample/reconstruction evaluation
    {"var_jax.train"},                      # loop, trainers, losses, configs
    {"var_jax.aot"},                        # ahead-of-time compiles for TPU slices
    {"var_jax.cli"},                        # the var-jax command
    {"var_jax"},                            # the public face (var_jax/__init__.py)
]
# What the paper's networks and the kernels must not reach for: files, flags, training, the CLI.
FORBIDDEN_IN_CORE = ("os", "pathlib", "glob", "shutil", "etils", "orbax", "optax", "argparse",
                     "absl.flags", "clu", "tensorflow")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
  """The deepest module of `name` that exists in the package (an attribute import names its module)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str):
  """(imported module, line, [private names taken from it]) for every var_jax import of `module`."""
  tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
  is_package = MODULES[module].name == "__init__.py"
  aliases = {}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("var_jax"):
          target = _resolve(a.name)
          found.append((target, node.lineno, []))
          if a.asname:
            aliases[a.asname] = target
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      if not base.startswith("var_jax"):
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in MODULES:
          found.append((sub, node.lineno, []))
          aliases[a.asname or a.name] = sub
        else:
          found.append((_resolve(base), node.lineno, [a.name] if a.name.startswith("_") else []))
  for node in ast.walk(tree):  # module._private attribute access through an imported module
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")):
      found.append((aliases[node.value.id], node.lineno, [node.attr]))
  return found


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
  best = None
  for i, members in enumerate(LAYERS):
    for prefix in members:
      if module == prefix or module.startswith(prefix + "."):
        if best is None or len(prefix) > len(best[1]):
          best = (i, prefix)
  assert best is not None, f"{module} belongs to no layer: add its package to LAYERS"
  return best[0]


def _package(module: str) -> str:
  """The first-level package (var_jax.inference), or the module itself at the top level."""
  parts = module.split(".")
  return ".".join(parts[:2])


def test_every_module_has_a_layer():
  for module in MODULES:
    _layer(module)


def test_no_import_cycles():
  edges = {m: sorted({t for t, _, _ in GRAPH[m] if t and t != m and t != "var_jax"}) for m in MODULES}
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in edges:
    if v not in index:
      visit(v)
  assert not cycles, f"import cycles: {cycles}"


def test_lower_layers_never_import_higher_ones():
  bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
         for m in MODULES for t, line, _ in GRAPH[m]
         if t and t != "var_jax" and _layer(t) > _layer(m)]
  assert not bad, "\n".join(bad)


def test_no_private_names_across_packages():
  bad = [f"{MODULES[m].relative_to(ROOT)}:{line} takes {names} from {t}"
         for m in MODULES for t, line, names in GRAPH[m]
         if names and t and _package(t) != _package(m)]
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["var_jax.models", "var_jax.kernels", "var_jax.ops"])
def test_networks_and_kernels_know_no_files_flags_or_training(package):
  bad = []
  for m, path in MODULES.items():
    if not (m == package or m.startswith(package + ".")):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
              if any(n == f or n.startswith(f + ".") for f in FORBIDDEN_IN_CORE)]
  assert not bad, "\n".join(bad)


def test_the_layer_rule_would_catch_a_violation():
  # The checks above read real source: make sure a models -> train import is seen as one.
  assert _layer("var_jax.models.var") < _layer("var_jax.train.loop")
  assert _resolve("var_jax.inference.sampler.sample") == "var_jax.inference.sampler"
  assert any(t == "var_jax.ops.attention" for t, _, _ in GRAPH["var_jax.models.var"])


def _readme_names():
  text = (ROOT / "README.md").read_text()
  dotted = set(re.findall(r"\bvar_jax(?:\.[A-Za-z_]\w*)+", text))
  froms = set(re.findall(r"^\s*from (var_jax[\w.]*) import ([\w, ]+)$", text, flags=re.M))
  return sorted(dotted), sorted(froms)


def test_every_var_jax_name_in_the_readme_exists():
  dotted, froms = _readme_names()
  assert dotted, "the README names no var_jax attribute: the regex broke"
  missing = []
  for name in dotted:
    parts = name.split(".")
    obj, i = None, len(parts)
    while i > 0:  # the longest importable prefix, then attributes
      try:
        obj = importlib.import_module(".".join(parts[:i]))
        break
      except ImportError:
        i -= 1
    for attr in parts[i:]:
      if not hasattr(obj, attr):
        missing.append(name)
        break
      obj = getattr(obj, attr)
  for module, names in froms:
    mod = importlib.import_module(module)
    missing += [f"{module}.{n.strip()}" for n in names.split(",") if not hasattr(mod, n.strip())
                and not _resolve(f"{module}.{n.strip()}") == f"{module}.{n.strip()}"]
  assert not missing, f"README names that do not exist: {missing}"
