"""The package arrows of docs/ARCHITECTURE.md, and imports inside functions only where they are justified."""
import ast
import os
import subprocess

from conftest import BIN, REPO, cpu_env

PACKAGES = ("core", "class_cond", "t2i", "eval", "data_prep")
# Libraries a function may import on first use (slow to import, or with side effects at import), with a comment
# saying why; everything else, the project's own modules above all, is imported at the top of its module.
LAZY_ALLOWED = ("deepspeed", "diffusers", "transformers", "open_clip", "timm", "cleanfid", "matplotlib",
                "torch.utils.tensorboard", "wandb")


def test_import_contracts_hold():
    """import-linter's contracts of pyproject.toml: layers, the samplers' independence, tasks apart."""
    proc = subprocess.run([os.path.join(BIN, "lint-imports"), "--no-cache"], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "3 kept" in proc.stdout


def function_level_imports(source: str) -> list[tuple[int, str, bool]]:
    """(line, imported module, has a reason comment) of every import inside a function of `source`. A comment on
    the import's line or on the line above its block of consecutive imports counts as the reason."""
    lines = source.split("\n")
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [child.module or ""] if isinstance(child, ast.ImportFrom) else [a.name for a in child.names]
                first = child.lineno
                while first > 1 and lines[first - 2].strip().startswith(("import ", "from ")):
                    first -= 1
                commented = "#" in lines[child.lineno - 1] or lines[first - 2].strip().startswith("#")
                found.extend((child.lineno, name, commented) for name in names)
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def test_the_import_checker_sees_what_it_must():
    src = ("import os\n\ndef f():\n    import json\n    # heavy: only here\n    import deepspeed\n"
           "    import timm\n\ndef g():\n    from core import config  # the project's own\n")
    assert function_level_imports(src) == [(4, "json", False), (6, "deepspeed", True), (7, "timm", True),
                                           (10, "core", True)]


def _modules():
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(root, name), REPO)


def test_function_level_imports_are_heavy_libraries_with_a_reason():
    problems = []
    for path in _modules():
        with open(os.path.join(REPO, path)) as f:
            for line, module, commented in function_level_imports(f.read()):
                if not (module == "torch.utils.tensorboard" or module.split(".")[0] in LAZY_ALLOWED):
                    problems.append(f"{path}:{line} imports {module} inside a function: import it at the top")
                elif not commented:
                    problems.append(f"{path}:{line} imports {module} inside a function without a comment saying why")
    assert not problems, "\n".join(problems)
