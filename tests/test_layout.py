"""The package's modules form layers: each imports only from its own layer
or those below (type-only imports included), so there is no import circle,
and the margin families are named only where they live."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "margin_kernels"

# Bottom to top. A module may import from its own layer and the layers below.
LAYERS = [
    {"margins", "_sharding", "_state", "_C", "bench.memory", "backends.triton_kernels.autotune",
     "backends.triton_kernels.tiles"},
    # one file per kernel pass, then the package that gathers them
    {"backends.triton_kernels.forward", "backends.triton_kernels.atomic_backward",
     "backends.triton_kernels.split_backward", "backends.triton_kernels.rows"},
    {"backends.triton_kernels"},
    {"_checks", "_targets", "reference", "backends", "backends.cpp", "backends.triton_backend"},
    {"_shard", "_shard_io", "subcenters"},
    {"_loss_function"},
    {"functional"},
    {"nn", "partial_fc"},
    {"official"},
    {""},  # the package itself
    {"bench.steps", "bench.worker", "bench.report", "bench.cli", "bench", "bench.__main__"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: pathlib.Path) -> set[str]:
    """The package modules ``name`` imports, anywhere in the file."""
    parts = name.split(".") if name else []
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                stem = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "margin_kernels":
                stem = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import nn` names a module; `from .x import y` names x
                candidate = ".".join(stem + [alias.name])
                found.add(candidate if candidate in LAYER else ".".join(stem))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "margin_kernels":
                    found.add(".".join(alias.name.split(".")[1:]))
    found.discard(name)
    return found


def test_every_module_has_a_layer():
    assert set(modules()) <= set(LAYER) | {"_C"}, set(modules()) - set(LAYER)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_from_a_layer_above_it(name):
    for dep in imports(name, modules()[name]):
        assert dep in LAYER, f"{name or 'margin_kernels'} imports unknown module {dep!r}"
        assert LAYER[dep] <= LAYER[name], f"{name or 'margin_kernels'} (layer {LAYER[name]}) imports {dep} " \
                                          f"(layer {LAYER[dep]})"


def test_no_import_circle():
    graph = {name: imports(name, path) for name, path in modules().items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError(f"import circle: {' -> '.join(trail + [node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in graph.get(node, ()):
            visit(dep, trail + [node])
        state[node] = 2

    for name in graph:
        visit(name, [])


# Where a family's name may appear: its spec, the oracle, the public exports,
# and the loaders of the official heads' checkpoints.
FAMILY_FILES = {"margins.py", "reference.py", "__init__.py", "nn.py", "official.py"}


@pytest.mark.parametrize("family", ["curricular", "adaface", "magface", "mv.?softmax"])
def test_families_are_named_only_where_they_live(family):
    named = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.suffix in (".py", ".h", ".cpp", ".cu", ".cuh")
             and re.search(family, p.read_text(errors="ignore"), re.I)}
    assert named <= FAMILY_FILES, named - FAMILY_FILES
    csrc = ROOT.parent / "csrc"
    assert not [p for p in csrc.rglob("*") if p.is_file() and re.search(family, p.read_text(), re.I)]


def test_one_autograd_function():
    subclasses = [p for p in ROOT.rglob("*.py") if re.search(r"class \w+\(torch\.autograd\.Function\)", p.read_text())]
    functions = [m for p in subclasses for m in re.findall(r"class (\w+)\(torch\.autograd\.Function\)", p.read_text())]
    assert functions == ["MarginLoss"], functions


def test_ci_runs_the_readme_test_command():
    """.ci/run is the README's test command, word for word."""
    root = ROOT.parent
    readme = (root / "README.md").read_text()
    command = re.search(r"# Tests: .*\n(.+)\n", readme).group(1).strip()
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines() if line.startswith("bash ")]
    assert ci == [command]
