"""The package's shape (docs/layout.md): stages import one way, from the top down; no import circle; project imports
at the top of each module except the few, each with its reason, that keep TensorFlow or Ray out of a light module;
no module too long to read."""
import ast
import os

from tests.conftest import ROOT

# Each stage of pipeline/ and the stages it may import (besides itself). api and cli sit on top of everything.
STAGES = {
    "config": set(),
    "io": {"config"},
    "labels": set(),
    "outputs": {"config", "io", "labels"},
    "data": {"config", "io", "labels"},
    "model": {"config", "io", "labels", "data"},
    "segment": {"config", "io", "labels", "outputs", "data", "model"},
    "train": {"config", "io", "labels", "outputs", "data", "model", "segment"},
}
TOP = {"api", "cli"}
PACKAGES = ("pipeline", "jobs", "submission")
MAX_LINES = 450
MAX_FUNCTION_LEVEL_IMPORTS = 20


def _modules() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


def _project_imports(path: str, modules: dict[str, str]) -> list[tuple[str, bool, str]]:
    """(imported project module, whether inside a function, its source line) for every import in the file."""
    source = open(path, encoding="utf-8").read()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in sorted({target for target in targets if target in modules}):
            found.append((target, node.col_offset > 0, f"{node.lineno}: {lines[node.lineno - 1].strip()}"))
    return found


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def test_stages_import_one_way_from_the_top_down():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        stage = _stage(module)
        if module.startswith("pipeline.") and stage not in TOP:
            assert stage in STAGES, f"{path}: pipeline/{stage} is no stage of docs/layout.md (add it to STAGES)"
        for target, _, line in _project_imports(path, modules):
            if not module.startswith("pipeline."):
                continue  # jobs and submission sit above the library
            assert not target.startswith(("jobs", "submission")), f"{path} imports {target}: the library is below them"
            to = _stage(target)
            if stage in TOP or to is None or to == stage:
                continue
            if to in TOP or to not in STAGES[stage]:
                wrong.append(f"{path}:{line} (pipeline/{stage} may import {sorted(STAGES[stage]) or 'nothing'})")
    assert not wrong, "imports against the stages' order:\n" + "\n".join(wrong)


def test_no_import_circle():
    modules = _modules()
    edges = {module: {target for target, _, _ in _project_imports(path, modules) if target != module}
             for module, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_function_level_project_imports_are_few_and_say_why():
    modules = _modules()
    inner = sorted({(path, line) for path in modules.values()
                    for _, inside, line in _project_imports(path, modules) if inside})
    assert len(inner) <= MAX_FUNCTION_LEVEL_IMPORTS, f"{len(inner)} function-level project imports:\n" + \
        "\n".join(f"{path}:{line}" for path, line in inner)
    unexplained = [f"{path}:{line}" for path, line in inner if "# here:" not in line]
    assert not unexplained, "function-level imports without a '# here: <reason>' comment:\n" + "\n".join(unexplained)


def test_no_module_is_too_long_to_read():
    long = {path: count for path in _modules().values()
            if (count := open(path, encoding="utf-8").read().count("\n")) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_stage_says_what_it_owns_and_what_it_may_import():
    for stage in STAGES:
        if stage == "config":
            continue
        init = os.path.join(ROOT, "pipeline", stage, "__init__.py")
        doc = ast.get_docstring(ast.parse(open(init, encoding="utf-8").read())) or ""
        assert "Imports from the project" in doc, f"{init}: its docstring says what the stage may import"
