"""The package layout is the architecture: each layer imports only from the layers below it."""

import ast
from pathlib import Path

LMSCALE = Path(__file__).resolve().parent.parent / "lmscale"

# Bottom to top, as the README's Architecture section lists them.
LAYERS = ["errors", "resources", "atomic", "fast_exit", "faults", "rewards", "methods", "config", "data", "model", "parallel", "objectives",
          "checkpointing", "reporting", "rollouts", "evaluation", "runs", "planning", "training", "jobs", "cli"]  # fmt: skip


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def imported_modules(tree: ast.AST):
    """(module imported, line), skipping `if TYPE_CHECKING:` blocks (annotations only)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmscale"):
            names = [node.module] if node.module != "lmscale" else [f"lmscale.{a.name}" for a in node.names]
            yield from ((name, node.lineno) for name in names)
        elif isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.startswith("lmscale"))


def test_no_package_imports_from_a_layer_above_it():
    upward = []
    for path in LMSCALE.rglob("*.py"):
        module = ".".join(("lmscale", *path.relative_to(LMSCALE).with_suffix("").parts))
        own = layer_of(module)
        for target, line in imported_modules(ast.parse(path.read_text())):
            if own is not None and (layer_of(target) or 0) > own:
                upward.append(f"{module}:{line} imports {target}")
    # The one exception, by design: a method's objective factory imports its implementation when called
    # (where training starts), so that the config's checks can consult the methods without torch.
    factories = [
        u for u in upward if u.startswith("lmscale.methods.") and " imports lmscale.objectives." in u
    ]
    assert upward == factories and factories, upward
    assert all(is_inside_a_function(entry) for entry in factories), factories


def is_inside_a_function(entry: str) -> bool:
    """Whether the import `module:line imports target` is in a function's body (run when called)."""
    module, line = entry.split(" ")[0].split(":")
    tree = ast.parse((LMSCALE.parent / (module.replace(".", "/") + ".py")).read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    return any(f.lineno < int(line) <= f.end_lineno for f in functions)


def test_every_package_is_a_layer():
    tops = {
        p.stem for p in LMSCALE.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith("_")
    }
    assert tops - {"__pycache__"} <= set(LAYERS), tops - set(LAYERS)
