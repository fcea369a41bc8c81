"""The package's module-level imports form no cycle, and importing it does not import torch."""

import ast
import subprocess
import sys
from pathlib import Path

import mneme_plugin

ROOT = Path(mneme_plugin.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """mneme_plugin modules imported at module level (not in functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("mneme_plugin"):
                found.add(sub.module)
                found.update(f"{sub.module}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("mneme_plugin"))
    return found


def test_no_module_level_import_cycle():
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _top_level_imports(path):
            # `from pkg import x` imports pkg (its __init__) and maybe the submodule pkg.x
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name:
                    targets.add(prefix)
        graph[name] = targets
    # Depth-first search for a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


def test_importing_the_package_and_the_cli_does_not_import_torch():
    code = "import sys, mneme_plugin, mneme_plugin.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_mneme_info_on_stage_outputs_does_not_import_torch(tmp_path):
    """`mneme info` on a folder of tables (attribution, mapping) reads their files: torch (seconds to
    import) is not needed for that, nor for telling the folder's kind by its file names."""
    from tests.helpers import write_attribution, write_mapping

    write_attribution(tmp_path / "attribution", ["shared", "suppressed", "dead"])
    write_mapping(tmp_path / "mapping", {0: [("law", 0.9)]}, "organism")
    for folder in ("attribution", "mapping"):
        code = ("import sys; from click.testing import CliRunner; from mneme_plugin.cli import main; "
                f"r = CliRunner().invoke(main, ['info', {str(tmp_path / folder)!r}]); "
                "assert r.exit_code == 0, r.output; print(r.output.splitlines()[0]); print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
        assert out[-1] == "False", (folder, out)
        assert out[0].startswith({"attribution": "Attribution", "mapping": "Mapping"}[folder]), out
