"""The layout guards the architecture: one folder per stage, imports that point down only, no cycles, no
hidden dependencies, and modules of one job.

Every module's imports are read from its source (ast), those inside functions included. A module may
import its own package's modules (without a cycle) and anything of a lower layer; never a module of its
own layer in another package, nor one above it.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2lab"

# the layers, lowest first; each name is a top-level module or package of gpt2lab
LAYERS = [
    ["errors"],
    ["io", "text", "device"],
    ["templates", "metrics", "sources", "client"],
    ["plot"],
    ["model", "tokenizer"],
    ["data", "weights"],
    ["checkpoint", "generate"],
    ["train"],
    ["evals", "export"],
    ["finetune", "serve"],
    ["cli"],
    ["__init__", "__main__"],
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}

# imports a library module may make inside a function: optional extras (and a POSIX-only module), imported
# only when the feature that needs them is used
OPTIONAL = ("matplotlib", "torch.utils.tensorboard", "datasets", "huggingface_hub", "transformers", "fcntl",
            "gguf", "llama_cpp", "ctranslate2", "torchao", "tomli")
# the facades that load their names on first use, so that `import gpt2lab` and the torch-free config
# modules stay light
FACADES = ("gpt2lab/__init__.py", "gpt2lab/model/__init__.py")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = modules()


def top(module: str) -> str:
    """The layer name of a module: its top-level package or module below gpt2lab."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported gpt2lab module, inside a function, line) of every import in the file."""
    tree = ast.parse(path.read_text())
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from gpt2lab.x import y`: y is a module when there is one by that name
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        found += [(name, id(node) in nested, node.lineno) for name in names]
    return found


def test_every_module_is_in_a_layer():
    assert sorted({top(m) for m in MODULES} - set(RANK)) == []


def test_imports_point_down_only():
    wrong = []
    for name, path in MODULES.items():
        here = top(name)
        for target, _, line in imports(path):
            if not target.startswith("gpt2lab") or target == "gpt2lab":
                continue
            there = top(target)
            if there == here:
                continue  # within a package: checked for cycles below
            if RANK[there] >= RANK[here]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} "
                             f"(layer {RANK[there]} >= {RANK[here]})")
    assert wrong == []


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in imports(path) if t in MODULES and t != name}
             for name, path in MODULES.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node == "gpt2lab":
                continue  # a package importing its own modules (its facade) is not a cycle
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else nxt)
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_function_level_imports_only_for_optional_extras_and_the_cli():
    hidden = []
    for name, path in MODULES.items():
        rel = str(path.relative_to(PACKAGE.parent))
        if top(name) == "cli" or rel in FACADES:
            continue
        for target, nested, line in imports(path):
            if nested and not target.startswith(OPTIONAL):
                hidden.append(f"{rel}:{line} imports {target} inside a function")
    assert hidden == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines; split it by job"


def test_every_folder_says_what_its_stage_does():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init} needs a docstring saying what its stage does"


def test_help_and_the_config_modules_need_no_torch():
    code = ("import sys, gpt2lab.cli, gpt2lab.train.config, gpt2lab.finetune.config, gpt2lab.model.config; "
            "gpt2lab.cli.build_parser(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
