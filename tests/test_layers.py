"""Imports run only downward (cli > rl > train > checkpoint > model > data | kernels > config > errors),
checked by import-linter's layers contract in pyproject.toml; function-local imports are no way around it."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT = Path(sys.executable).parent / "lint-imports"
# Third-party packages a function may import lazily, each for its reason: an optional extra (missing ->
# a clear error naming it), or a core package whose import costs seconds or prints noise.
LAZY_OK = {
    "deepspeed": "optional extra", "vllm": "optional extra", "transformer_engine": "optional extra",
    "triton": "optional extra", "torchao": "optional extra", "reasoning_gym": "optional extra",
    "wandb": "seconds to import; only when logging to wandb", "matplotlib": "only for keel plot",
    "transformers": "seconds to import; only where HF files are read or written",
    "megatron": "seconds to import and Apex warnings; only when indexed data is opened",
    "sympy": "seconds to import; only when a math answer is verified",
    "safetensors": "only where HF files are written", "tqdm": "only for a progress bar",
    "faiss": "only when a semantic-ID table is built (keel sid build)",
    "torch.distributed.pipelining": "imports TorchDynamo (~1 s); only with parallel.pp > 1",
}
# Exempt: the facade (so `import keel.errors` loads no torch) and the CLI (a verb loads only what it
# needs, so `keel --help` starts at once); and one import of a keel module that itself needs triton.
LAZY_EXEMPT = ("keel/__init__.py", "keel/cli/")
LAZY_KEEL_LINES = {("keel/model/ksa_attention.py", "keel.kernels.ksa_attention")}


def run_lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env=env, timeout=300)


def test_import_linter_layers_contract_is_kept():
    proc = run_lint(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_the_contract_catches_an_upward_function_local_import(tmp_path):
    """The same contract over a copy of keel with one upward import hidden in a function: broken."""
    shutil.copytree(REPO / "keel", tmp_path / "keel", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "keel" / "model" / "loss.py", "a") as f:
        f.write("\n\ndef _sneaky():\n    from keel.train.optim import build_optimizer\n    return build_optimizer\n")
    proc = run_lint(tmp_path)
    assert proc.returncode != 0 and "1 broken" in proc.stdout, proc.stdout[-2000:]
    assert "keel.model.loss -> keel.train.optim" in proc.stdout


def lazy_imports():
    """(file, line, module) of every import inside a function body in keel/."""
    for path in sorted((REPO / "keel").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import):
                        for alias in sub.names:
                            yield path.relative_to(REPO).as_posix(), sub.lineno, alias.name
                    elif isinstance(sub, ast.ImportFrom) and sub.module:
                        yield path.relative_to(REPO).as_posix(), sub.lineno, sub.module


def test_function_local_imports_are_only_for_optional_or_heavy_dependencies():
    bad = []
    for rel, line, module in lazy_imports():
        top = module.split(".")[0]
        if rel.startswith(LAZY_EXEMPT):
            continue
        if top == "keel":
            if (rel, module) not in LAZY_KEEL_LINES:
                bad.append(f"{rel}:{line} {module}")
        elif top not in LAZY_OK and module not in LAZY_OK:
            bad.append(f"{rel}:{line} {module}")
    assert not bad, "function-local imports to move to the top of their module:\n" + "\n".join(bad)
