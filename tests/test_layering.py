"""The package's imports run one way, from ``cli`` down to ``config``: no cycle, and nothing
but ``__main__`` imports ``cli``. Imports for type annotations only (under
``if TYPE_CHECKING:``) do not count: they never run."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import supervisor_mail

PACKAGE = Path(supervisor_mail.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
        and node.test.id == "TYPE_CHECKING"


def imported(tree: ast.AST) -> set[str]:
    """The package's modules that ``tree`` imports at run time."""
    found: set[str] = set()
    pending = [tree]
    while pending:
        node = pending.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "supervisor_mail":
                found |= {f"supervisor_mail.{alias.name}" for alias in node.names}
            elif node.module.startswith("supervisor_mail."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("supervisor_mail.")}
        pending.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = imported(ast.parse(path.read_text(), str(path))) - {name}
    return graph


def test_the_graph_is_read_from_the_sources():
    graph = import_graph()
    assert "supervisor_mail.config" in graph["supervisor_mail.cli"]
    assert "supervisor_mail.master" not in graph["supervisor_mail.watchdog"]  # TYPE_CHECKING


def test_imports_have_no_cycle():
    graphlib.TopologicalSorter(import_graph()).prepare()  # raises CycleError on a cycle


def test_nothing_but_main_imports_cli():
    importers = {name for name, deps in import_graph().items() if "supervisor_mail.cli" in deps}
    assert importers == {"supervisor_mail.__main__"}


def test_config_is_the_bottom():
    """config depends on no module of the package but the leaf ones it declares with."""
    assert import_graph()["supervisor_mail.config"] <= {"supervisor_mail.errors",
                                                         "supervisor_mail.states"}
