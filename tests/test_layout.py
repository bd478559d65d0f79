"""The layers of the product, read from the code: no import cycles, dependencies point one way.

Every ``import`` of the project's own modules is read with ``ast`` (module level and inside
functions alike: a lazy import is a dependency too) and resolved to a module. Layers:

* core library: ``tfrs_ctx`` except ``tfrs_ctx.apps``;
* ``beam_pipelines``, ``serving`` (``serving.client`` and ``serving.model_server`` apart), ``feature_repo``;
* applications (``tfrs_ctx.apps``) and ``benchmarks``: may import everything.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("tfrs_ctx", "beam_pipelines", "serving", "benchmarks", "feature_repo")
APPLICATIONS = ("tfrs_ctx.apps", "benchmarks")
# layer -> prefixes its modules must never import
FORBIDDEN = {
    "core": ("serving", "beam_pipelines", "benchmarks", "tfrs_ctx.apps", "feature_repo"),
    "beam_pipelines": ("serving", "benchmarks", "tfrs_ctx.apps"),
    "serving.client": ("serving.model_server", "beam_pipelines", "benchmarks", "tfrs_ctx.apps"),
    "serving.model_server": ("serving.client", "beam_pipelines", "benchmarks", "tfrs_ctx.apps"),
    "serving": ("beam_pipelines", "benchmarks", "tfrs_ctx.apps"),
    "feature_repo": ("serving", "beam_pipelines", "benchmarks", "tfrs_ctx.apps"),
}


def project_modules(root: pathlib.Path = REPO) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: pathlib.Path, module: str, modules: dict[str, pathlib.Path]) -> set[str]:
    """The project modules ``module`` (the file ``path``) imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a module a.b.c, else its package
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(root: pathlib.Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(out)


def layer(module: str) -> str | None:
    if module.startswith(APPLICATIONS):
        return None  # applications may import everything
    if module == "tfrs_ctx" or module.startswith("tfrs_ctx."):
        return "core"
    for name in ("serving.client", "serving.model_server", "serving", "beam_pipelines", "feature_repo"):
        if module == name or module.startswith(name + "."):
            return name
    return None


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in sorted(graph.items()):
        forbidden = FORBIDDEN.get(layer(module) or "", ())
        for dep in sorted(deps):
            if any(dep == f or dep.startswith(f + ".") for f in forbidden):
                out.append(f"{module} ({layer(module)}) imports {dep}")
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_project_has_no_import_cycles(graph):
    assert len(graph) > 40, "the walk found too few modules"
    assert cycles(graph) == []


def test_dependencies_point_one_way(graph):
    assert violations(graph) == []


def test_the_checks_catch_a_cycle_and_a_core_import_of_serving():
    graph = {"tfrs_ctx.a": {"tfrs_ctx.b"}, "tfrs_ctx.b": {"tfrs_ctx.a", "serving.client.candidates"}}
    assert cycles(graph) == [["tfrs_ctx.a", "tfrs_ctx.b"]]
    assert violations(graph) == ["tfrs_ctx.b (core) imports serving.client.candidates"]


def test_lazy_and_relative_imports_count(tmp_path):
    pkg = tmp_path / "tfrs_ctx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n    import serving.client\n")
    (pkg / "sub" / "b.py").write_text("from tfrs_ctx.sub.a import f\n")
    (tmp_path / "serving" / "client").mkdir(parents=True)
    for p in ("serving/__init__.py", "serving/client/__init__.py"):
        (tmp_path / p).write_text("")
    graph = import_graph(tmp_path)
    assert graph["tfrs_ctx.sub.a"] == {"tfrs_ctx.sub.b", "serving.client"}
    assert cycles(graph) == [["tfrs_ctx.sub.a", "tfrs_ctx.sub.b"]]


def test_tensorflow_is_imported_after_the_keras_setting_in_every_entry_point():
    """Each process kind imports the project before TensorFlow: its first import sets TF_USE_LEGACY_KERAS."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_USE_LEGACY_KERAS"}
    for entry in ("serving.model_server.server", "beam_pipelines.encode_users", "tfrs_ctx.training.train"):
        code = f"import {entry}, os, tensorflow as tf; print(os.environ['TF_USE_LEGACY_KERAS'], tf.keras.__name__)"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        flag, keras = out.stdout.split()[-2:]
        assert flag == "1" and keras.startswith("tf_keras"), (entry, out.stdout)  # Keras 2, as TFRS needs
