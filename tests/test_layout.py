"""The core-and-extras layout, checked from the files: the core reads as R1-AQA's GRPO and reaches an extra
only through the seam (train.recipe_for, model.other_family, data.main), never at module level."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(p.name for p in ROOT.glob("*.py"))
EXTRAS = ("recipes", "tools", "workshop")
FOLDERS = ("engine",) + EXTRAS


def module_imports(path):
    """(module name, line) of every import that runs when the module is imported: at module level, in a
    class body, or under a module-level if/try; not inside a function."""
    tree = ast.parse(path.read_text())
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, node.lineno)] + [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, (ast.If, ast.Try, ast.ClassDef, ast.With)):
            todo += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def test_core_files_are_few():
    """At most eight top-level files, and the six of the design among them."""
    assert len(CORE) <= 8, CORE
    assert {"grpo.py", "train.py", "model.py", "data.py", "reward.py", "evaluate.py"} <= set(CORE)


def test_core_never_imports_an_extra_at_module_level():
    """Deleting recipes/, tools/ or workshop/ leaves every core file importable."""
    bad = [f"{name}:{line} imports {mod}" for name in CORE for mod, line in module_imports(ROOT / name)
           if mod.split(".")[0] in EXTRAS]
    assert not bad, bad


def test_grpo_imports_nothing_of_the_project():
    """grpo.py is the algorithm alone: torch, and nothing of the project, the engine included."""
    ours = {Path(n).stem for n in CORE} | set(FOLDERS)
    assert [m for m, _ in module_imports(ROOT / "grpo.py") if m.split(".")[0] in ours] == []


def test_engine_imports_no_extra():
    """The engine is the fast path of the core's own sub-steps: it needs no recipe, tool or workshop."""
    bad = [f"{p.name} imports {m}" for p in (ROOT / "engine").glob("*.py") for m, _ in module_imports(p)
           if m.split(".")[0] in EXTRAS]
    assert not bad, bad


def test_every_file_opens_with_a_short_docstring():
    """Every project file says what it is in a docstring of at most 10 lines (the rest is in docs/)."""
    files = [ROOT / n for n in CORE] + [p for f in FOLDERS for p in (ROOT / f).glob("*.py") if p.name != "__init__.py"]
    long = {p.relative_to(ROOT).as_posix(): n for p in files
            if (n := len((ast.get_docstring(ast.parse(p.read_text()), clean=False) or "x\n" * 99).splitlines())) > 10}
    assert not long, long


def test_readme_is_one_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.fixture(scope="module")
def core_only(tmp_path_factory):
    """A copy of the project without recipes/ and tools/ (workshop/ kept: the demo's model and task)."""
    copy = tmp_path_factory.mktemp("core") / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("runs", ".git", "__pycache__", "recipes", "tools"))
    return copy


CASES = {"recipes/lora.py": ["--lora-rank", "8", "--warm-start-steps", "0"], "recipes/sft.py": ["--algo", "sft"],
         "recipes/variants.py": ["--loss-aggregation", "token_mean"],
         "recipes/dynamic_sampling.py": ["--dynamic-sampling", "2"], "recipes/curriculum.py": ["--curriculum", "4"],
         "tools/plan.py": ["--plan"]}
PROBE = """
import contextlib, io, json, sys
import model as M, train
out = {}
for extra, flags in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            M.run_main(train.main, flags + ["--max-steps", "1"])
            out[extra] = (0, err.getvalue())
        except SystemExit as e:
            out[extra] = (e.code, err.getvalue())
print(json.dumps(out))
"""


def test_a_flag_whose_extra_is_gone_says_so_in_one_line(core_only):
    """Without the extra it needs, each such flag stops the run before anything is built, with exit status 2
    and one line naming the missing file."""
    import json
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(CASES)], cwd=core_only, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for extra, (code, err) in results.items():
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and extra in lines[0] and "does not have" in lines[0], (extra, err)
