"""The extension's skeleton: the WebUI layout, the core never importing the host, the CLI's commands all load."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top-level packages that exist only inside the WebUI process (its own modules and the repos it clones).
HOST_PACKAGES = {"modules", "launch", "webui", "ldm", "sgm", "k_diffusion", "repositories"}


def _imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def test_core_never_imports_webui_modules():
    offending = []
    for path in sorted((ROOT / "extensions_lib").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _imported_names(tree):
            if name.split(".")[0] in HOST_PACKAGES:
                offending.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert offending == []


def test_webui_extension_layout():
    for name in ("install.py", "style.css", "README.md", "pyproject.toml"):
        assert (ROOT / name).is_file(), name
    assert list((ROOT / "scripts").glob("*.py")) and list((ROOT / "javascript").glob("*.js"))
    for script in (".ci/run", "run.sh"):
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
    assert "./run.sh test" in (ROOT / ".ci" / "run").read_text()      # CI runs the README's test command


def test_console_script_and_module_run_the_same_cli():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"alchemy": "extensions_lib.cli:main"}
    out = subprocess.run([sys.executable, "-m", "extensions_lib", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    for command in ("make-tiny-model", "inspect", "txt2img", "demo"):
        assert command in out.stdout
    assert "unavailable" not in out.stderr          # no command module failed to import
