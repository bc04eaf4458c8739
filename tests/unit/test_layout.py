"""The tree keeps the shape docs/CONTRIBUTING.md describes, read from the source (no import runs): hypernet/ is torch
only, node files hold node classes that reach ComfyUI through the one adapter, no module imports another
module's private names, and import chains stay short."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_DIRS = ("hypernet", "nodes")
COMFY_MODULES = {"comfy", "comfy_extras", "folder_paths", "nodes", "server", "execution", "comfy_api", "node_helpers"}
# Issue 21: no chain longer than 8 modules. The longest are the pack's own __init__ -> a node file -> the adapter's
# door -> an adapter module -> a hypernet entry module (merge, ziplora, checkpoints, comparison, an evaluation
# module) -> its middle layer (the method registry, pipeline, lora_io, model, model_keys, result) -> a leaf or one
# above it (layers, names, tensors, keys, files, errors, base_models, cache). A constant or a small type comes from
# a leaf, never from a module that loads a pipeline: a chain can only grow by a real layer.
MAX_IMPORT_CHAIN = 8
# The one place hypernet/ starts ComfyUI: the training command must turn off ComfyUI's own argument parsing
# (comfy.options) and put its folder on sys.path before any module of the pack that imports ComfyUI is loaded, and
# nodes/adapter/ cannot be imported before that (the pack's __init__.py registers the node classes, which import ComfyUI).
STARTS_COMFYUI = {"hypernet/training/command.py"}


def _pack_files() -> dict[str, Path]:
    """Dotted module name (``nodes.adapter.fit``; the pack's own __init__ is ``pack``) -> file."""
    files = {"pack": REPO / "__init__.py"}
    for folder in PACK_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


FILES = _pack_files()


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """The import statements that run (those under ``if TYPE_CHECKING:`` do not)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(branch.test) for stmt in branch.body for node in ast.walk(stmt)}
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The dotted pack module a relative ``from`` import names."""
    package = module.split(".") if FILES[module].name == "__init__.py" else module.split(".")[:-1]
    if module == "pack":
        package = []
    base = package[:len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])]) or "pack"


def _edges(module: str) -> set[str]:
    found = set()
    for node in _imports(FILES[module]):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = _resolve(module, node)
            found |= {name for name in (target, *(f"{target}.{a.name}".lstrip(".") for a in node.names)) if name in FILES}
    return found - {module}


def _longest(module: str, memo: dict, stack: tuple = ()) -> tuple[str, ...]:
    """The longest chain of imports from ``module``; an import back onto the chain (a submodule importing its
    package's ``register``) ends it. Memoised per module: linear in the imports."""
    if module not in memo:
        chains = [(module, *_longest(target, memo, (*stack, module))) for target in sorted(_edges(module))
                  if target not in stack and target != module]
        memo[module] = max(chains, key=len, default=(module,))
    return memo[module]


def test_hypernet_imports_nothing_of_comfyui():
    for module, path in FILES.items():
        if module.startswith("hypernet") and str(path.relative_to(REPO)) not in STARTS_COMFYUI:
            for node in _imports(path):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in COMFY_MODULES for n in names if not getattr(node, "level", 0)), (
                    f"{path.relative_to(REPO)} imports ComfyUI ({names}): hypernet/ is torch only")


def test_node_files_reach_comfyui_only_through_the_adapter():
    for path in (REPO / "nodes").glob("*.py"):
        for node in _imports(path):
            if isinstance(node, ast.Import) or not node.level:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(n.split(".")[0] in COMFY_MODULES for n in names), (
                    f"nodes/{path.name} imports {names}: node files go through nodes/adapter/")
            elif node.level == 1 and path.name != "__init__.py":
                assert node.module == "adapter", f"nodes/{path.name}: a node file imports another node file ({node.module})"


def test_no_module_imports_another_modules_private_names():
    for module, path in FILES.items():
        for node in _imports(path):
            if isinstance(node, ast.ImportFrom) and node.level:
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, f"{path.relative_to(REPO)} imports private {private} from {node.module}"


def test_import_chains_are_short():
    memo: dict = {}
    chain = max((_longest(module, memo) for module in FILES), key=len)
    assert len(chain) <= MAX_IMPORT_CHAIN, f"{len(chain)} modules: {' -> '.join(chain)}"
