"""dvc.yaml describes what each stage really reads: DVC reruns a stage only when a declared dep or param changes,
so an undeclared module or section leaves stale results marked up to date."""
import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_modules(cmd: str) -> list[str]:
    """The stages modules a dvc.yaml cmd runs: `python -m stages.x`, or `python -m stages.launch x` (both)."""
    words = cmd.split()
    found = [w for w in words if w.startswith("stages.")]
    if found == ["stages.launch"]:
        found.append("stages." + words[words.index("stages.launch") + 1])
    assert found, f"cannot tell which stages module {cmd!r} runs"
    return found


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, package: str) -> set[str]:
    """Every clipprune/stages module `path` imports, at any depth of the file (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import y
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from clipprune import vit` imports a module
    return {m for m in out if m.split(".")[0] in ("clipprune", "stages") and module_file(m)}


def closure(module: str) -> set[Path]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        f = module_file(m)
        if f is None or f in seen:
            continue
        seen.add(f)
        package = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        todo += imported_modules(f, package)
    return {f for f in seen if f.name != "__init__.py" or f.stat().st_size}


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if "stages." in s["cmd"]])
def test_stage_deps_cover_every_module_it_imports(name):
    stage = STAGES[name]
    files = set().union(*(closure(m) for m in stage_modules(stage["cmd"])))
    if ROOT / "clipprune" / "model.py" in files:
        files.add(ROOT / "clipprune" / "model_configs")  # package data model.py registers with open_clip
    missing = sorted(str(f.relative_to(ROOT)) for f in files if not covered(f, stage.get("deps", [])))
    assert not missing, f"dvc.yaml stage {name!r} imports {missing} but does not list them under deps"


def loaded_sections(path: Path) -> set[str]:
    """Sections a stage reads through config.load(...) (string arguments, or a module-level tuple starred in)."""
    tree = ast.parse(path.read_text())
    consts = {t.id: [e.value for e in n.value.elts] for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Tuple)}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                and getattr(node.func, "value", None) is not None and getattr(node.func.value, "id", "") == "config":
            for a in node.args:
                if isinstance(a, ast.Constant):
                    out.add(a.value)
                elif isinstance(a, ast.Starred):
                    out |= set(consts[a.value.id])
    return out


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if "stages." in s["cmd"]])
def test_stage_reads_only_params_it_declares(name):
    stage = STAGES[name]
    declared = {p.split(".")[0] for p in stage.get("params", []) if isinstance(p, str)}
    read = set().union(*(loaded_sections(module_file(m)) for m in stage_modules(stage["cmd"])))
    assert read <= declared, f"stage {name!r} reads params sections {sorted(read - declared)} that dvc.yaml does not declare"


def test_the_import_walk_sees_lazy_and_relative_imports():
    """The check above is only as good as this walk: experiment.evaluate_setup imports zeroshot lazily, and
    pipeline imports golden relatively."""
    files = {str(f.relative_to(ROOT)) for f in closure("stages.evaluate")}
    assert {"clipprune/zeroshot.py", "clipprune/golden.py", "clipprune/pipeline.py", "stages/evaluate.py"} <= files
