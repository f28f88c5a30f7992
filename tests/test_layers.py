"""The floors of the library and the model contract (docs/architecture.md), read with `ast`.

leaf      utils/*.py                        imports nothing of the project but the leaf
search    utils/search/                     leaf
data      data/        model  model/        optim  optim/     leaf (and their own package)
engine    utils/engine/                     leaf (the training engine knows no model or data)
pipeline  utils/pipeline/                   everything above: the one layer that joins data and model
entry     pretrain.py train_itm.py inference.py rerank.py: the library, never another entry script
scripts   scripts/*.py                      the library; the demo and comparison drivers may call entry points

Function-local imports count as imports. Module-level imports form no cycle.

Outside model/, code reaches a model only through the contract (`model/retrieval.py`) and the
builders and registries of model/: it imports no concrete model class (an `nn.Module` defined
in model/) and branches on no object's class.
"""
from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = ("pretrain", "train_itm", "inference", "rerank")
LIBRARY = ("leaf", "search", "data", "model", "optim", "engine", "pipeline")
ALLOWED: dict[str, set[str]] = {
    "leaf": {"leaf"},
    "search": {"leaf", "search"},
    "data": {"leaf", "data"},
    "model": {"leaf", "model"},
    "optim": {"leaf", "optim"},
    "engine": {"leaf", "engine"},
    "pipeline": set(LIBRARY),
    "entry": set(LIBRARY),
    "scripts": {*LIBRARY, "scripts"},
}
# The demo and comparison drivers run the pipeline through the entry points' main(argv).
EXTRA_ALLOWED = {"scripts.demo": {"entry"}, "scripts.compare_systems": {"entry"}}


def layer_of(module: str) -> str | None:
    """The floor of a project module (dotted name), None for anything outside the project."""
    parts = module.split(".")
    if parts[0] in ENTRY_SCRIPTS and len(parts) == 1:
        return "entry"
    if parts[0] in ("data", "model", "optim", "scripts"):
        return parts[0]
    if parts[0] == "utils":
        if len(parts) > 1 and parts[1] in ("search", "engine", "pipeline"):
            return parts[1]
        return "leaf"
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every project module (library, entry scripts, scripts), by dotted name."""
    paths = [REPO / f"{name}.py" for name in ENTRY_SCRIPTS]
    for package in ("data", "model", "optim", "utils", "scripts"):
        paths += sorted((REPO / package).rglob("*.py"))
    return {_module_name(p): p for p in paths}


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The project module an imported name lives in (a module, or a package's attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, modules: Mapping[str, Path], top_level_only: bool = False) -> set[str]:
    """Project modules `path` imports (anywhere in the file, or at module level only)."""
    tree = ast.parse(path.read_text())
    nodes: Iterable[ast.AST] = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None:
                found.add(target)
    return found


def layer_violations(imports: Mapping[str, Iterable[str]]) -> list[str]:
    """`importer -> imported` pairs that break the floors."""
    bad = []
    for importer, targets in imports.items():
        layer = layer_of(importer)
        allowed = ALLOWED[layer] | EXTRA_ALLOWED.get(importer, set())
        for target in targets:
            target_layer = layer_of(target)
            if target_layer is None or target == importer:
                continue
            if target_layer not in allowed:
                bad.append(f"{importer} ({layer}) -> {target} ({target_layer})")
    return sorted(bad)


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Cycles of a module -> imported-modules graph (each reported once, from its first node)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 finished
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_project_respects_its_floors():
    modules = project_modules()
    imports = {name: imports_of(path, modules) for name, path in modules.items()}
    assert layer_violations(imports) == []


def test_no_module_level_import_cycle():
    modules = project_modules()
    graph = {name: imports_of(path, modules, top_level_only=True) - {name} for name, path in modules.items()}
    assert import_cycles(graph) == []


def test_every_module_has_a_floor():
    assert all(layer_of(name) is not None for name in project_modules())


@pytest.mark.parametrize(
    ("importer", "target"),
    [
        ("utils.config", "model.towers"),              # the leaf imports nothing above it
        ("model.losses", "utils.engine.trainer"),      # model/ sits on the leaf only
        ("data.datasets", "model.biencoder"),          # data and model meet in the pipeline only
        ("utils.search.topk", "data.txt_db"),          # search maths is model- and data-free
        ("utils.engine.loader", "data.samplers"),      # the training engine knows no data
        ("optim.optimizer", "utils.pipeline.model_setup"),
        ("rerank", "inference"),                       # no entry script is a library
        ("scripts.report", "train_itm"),               # only the pipeline drivers call entry points
    ],
)
def test_a_forbidden_import_is_reported(importer, target):
    assert layer_violations({importer: [target]}) == [
        f"{importer} ({layer_of(importer)}) -> {target} ({layer_of(target)})"
    ]


def test_allowed_imports_pass():
    assert layer_violations({
        "utils.pipeline.evaluation": ["data.txt_db", "model.biencoder", "utils.engine.loader"],
        "train_itm": ["utils.pipeline.model_setup", "optim.schedule"],
        "scripts.demo": ["train_itm"],
        "model.losses": ["utils.distributed", "numpy"],
    }) == []


def test_a_cycle_is_found():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": ["b"], "b": []}) == []


def test_imports_are_read_from_a_module_tree(tmp_path):
    (tmp_path / "m.py").write_text("import os\nfrom pkg import sub\ndef f():\n    from pkg.sub import g\n")
    modules = {"m": tmp_path / "m.py", "pkg.sub": tmp_path / "sub.py", "pkg": tmp_path / "pkg.py"}
    assert imports_of(tmp_path / "m.py", modules) == {"pkg.sub"}
    (tmp_path / "n.py").write_text("def f():\n    import pkg\n")
    assert imports_of(tmp_path / "n.py", modules, top_level_only=True) == set()


# ---------------------------------------------------------------- the model contract

# The contract's own module: its abstract classes are the interface code outside model/ uses.
CONTRACT_MODULES = ("model.retrieval",)
MODULE_BASES = {"Module", "nn.Module", "torch.nn.Module"}


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` of a Name / Attribute chain, None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def model_classes(modules: Mapping[str, Path]) -> set[str]:
    """`module.Class` of every concrete model class: an `nn.Module` subclass defined in model/
    (outside the contract module), directly or through another such class."""
    defined: dict[str, list[str]] = {}
    for name, path in modules.items():
        if layer_of(name) != "model" or name in CONTRACT_MODULES:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                defined[f"{name}.{node.name}"] = [_dotted(b) or "" for b in node.bases]
    short = {qual.rpartition(".")[2]: qual for qual in defined}
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for qual, bases in defined.items():
            if qual in found:
                continue
            if any(b in MODULE_BASES or b.rpartition(".")[2] in {"RetrievalModel"}
                   or short.get(b.rpartition(".")[2]) in found for b in bases):
                found.add(qual)
                changed = True
    return found


def model_class_uses(tree: ast.AST, classes: set[str]) -> list[str]:
    """What in a module reaches a concrete model class or branches on a class: imports of
    one, isinstance / issubclass against one, and comparisons of `type(x)` / `x.__class__`."""
    names = {qual.rpartition(".")[2]: qual for qual in classes}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            bad += [f"imports {node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in classes]
        elif isinstance(node, ast.Attribute) and _dotted(node) in classes:
            bad.append(f"uses {_dotted(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
            targets = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            for target in targets:
                dotted = _dotted(target) or ""
                if dotted in classes or names.get(dotted) in classes:
                    bad.append(f"{node.func.id}(..., {dotted})")
        elif isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                inner = side.value if isinstance(side, ast.Attribute) and side.attr == "__name__" else side
                # `type(None)` is NoneType, not a branch on some object's class.
                is_type_call = (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name)
                                and inner.func.id == "type"
                                and not (len(inner.args) == 1 and isinstance(inner.args[0], ast.Constant)
                                         and inner.args[0].value is None))
                if is_type_call or (isinstance(inner, ast.Attribute) and inner.attr == "__class__"):
                    bad.append(f"compares a class (line {node.lineno})")
    return bad


def contract_violations(modules: Mapping[str, Path]) -> list[str]:
    """`module: what` for every module outside model/ that reaches past the model contract."""
    classes = model_classes(modules)
    out = []
    for name, path in modules.items():
        if layer_of(name) == "model":
            continue
        out += [f"{name}: {what}" for what in model_class_uses(ast.parse(path.read_text()), classes)]
    return sorted(out)


def test_code_outside_model_uses_only_the_contract():
    modules = project_modules()
    classes = model_classes(modules)
    # The families, towers, heads and the cross-encoder are all found.
    assert {"model.biencoder.BiEncoder", "model.vldeformer.VLDeformer", "model.cross_encoder.UniterCrossEncoder",
            "model.pretrain_model.PretrainModel", "model.towers.TextTower"} <= classes
    assert not any(qual.startswith("model.retrieval.") for qual in classes)
    assert contract_violations(modules) == []


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from model.biencoder import BiEncoder\n", ["imports model.biencoder.BiEncoder"]),
        ("import model.vldeformer\nm = model.vldeformer.VLDeformer\n", ["uses model.vldeformer.VLDeformer"]),
        ("def f(m, BiEncoder):\n    return isinstance(m, (int, BiEncoder))\n", ["isinstance(..., BiEncoder)"]),
        ("def f(m):\n    return type(m).__name__ == 'VLDeformer'\n", ["compares a class (line 2)"]),
        ("def f(m, c):\n    return m.__class__ is c\n", ["compares a class (line 2)"]),
        ("from model.retrieval import RetrievalModel\nfrom model.biencoder import build_biencoder\n", []),
    ],
)
def test_a_reach_past_the_contract_is_reported(source, found):
    classes = {"model.biencoder.BiEncoder", "model.vldeformer.VLDeformer"}
    assert model_class_uses(ast.parse(source), classes) == found
