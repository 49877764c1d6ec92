"""The package's structure (docs/design.md, "Layers"): imports go one way, and no module of the
package names a model's attributes (models are reached only through their tower hooks)."""

from __future__ import annotations

import ast
import glob
import os

import paddle
from conftest import MODELS, REPO

PACKAGE = os.path.join(REPO, "paddlerec_milvus")


def _imports() -> dict[str, set[str]]:
    """module -> package modules it imports, at module level or inside functions alike."""
    graph: dict[str, set[str]] = {}
    for path in glob.glob(os.path.join(PACKAGE, "*.py")):
        name = os.path.basename(path)[:-3]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paddlerec_milvus."):
                deps.add(node.module.split(".")[1])
        graph[name] = deps - {name}
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycle_even_through_function_level_imports():
    graph = _imports()
    cycles = sorted(m for m in graph if m in _reaches(graph, m))
    assert not cycles, {m: sorted(graph[m]) for m in cycles}


def test_dependencies_point_one_way():
    """runner -> validation -> scoring -> recall/metrics/towers; evaluate -> scoring/checkpoint/index."""
    graph = _imports()
    below = {"runner": {"validation", "scoring", "checkpoint", "device"},
             "validation": {"scoring", "checkpoint"}, "scoring": {"recall", "metrics", "towers"},
             "evaluate": {"scoring", "checkpoint", "milvus_index", "device"}}
    for module, deps in below.items():
        assert deps <= _reaches(graph, module), (module, sorted(graph[module]))
    never = {"scoring": {"validation", "evaluate", "runner", "export"},
             "validation": {"evaluate", "runner", "export"},
             "evaluate": {"runner", "validation", "export"},
             "towers": {"scoring", "evaluate", "validation", "runner", "export"}}
    for module, forbidden in never.items():
        assert not forbidden & _reaches(graph, module), (module, sorted(forbidden & _reaches(graph, module)))


def _model_attributes() -> set[str]:
    """Names the model directories define on their networks (net.py, multi_interest.py):
    ``self.x = ...`` and methods, less what every paddle Layer and Optimizer has (an optimizer
    subclass's ``step`` is the optimizer API the runner calls, not the model's)."""
    layer_api = set(dir(paddle.nn.Layer)) | set(dir(paddle.optimizer.Optimizer))
    names: set[str] = set()
    paths = [p for name in ("net.py", "multi_interest.py")
             for p in glob.glob(os.path.join(MODELS, "*", name))]
    for path in paths:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ClassDef) and node.name.startswith("DygraphModel"):
                continue  # PaddleRec's DygraphModel interface: the contract the package calls
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                        names.add(item.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.add(node.attr)
    return names - layer_api


def _own_names(tree: ast.AST) -> set[str]:
    """Names a module gives its own objects: ``self.x`` stores, class fields, functions."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(t.target.id for t in node.body
                         if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name))
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id == "self"):
            names.add(node.attr)
    return names


def test_no_package_module_names_a_models_attributes():
    trees = {path: ast.parse(open(path, encoding="utf-8").read())
             for path in glob.glob(os.path.join(PACKAGE, "*.py"))}
    # a name the package also gives its own objects (ItemIndex.dim, Manifest.maxlen) is not the model's
    attrs = _model_attributes() - set().union(*map(_own_names, trees.values()))
    assert {"item_emb", "capsule", "readout", "extract"} <= attrs  # the scan sees the networks
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in attrs:
                found.append(f"{os.path.basename(path)}:{node.lineno}: .{node.attr}")
    assert not found, found
