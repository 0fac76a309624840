"""The device kit (launch/gpu_kit.sh) is complete for what the GPU check imports: every
third-party import on the check's code path, and every Requires-Dist of the kit's packages, is
in the GPU image's package list (launch/gpu_image_packages.txt) or among the kit's wheels.
Checked from the declared lists; the kit itself is not downloaded here."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.cli import REPO

# the check's code path: the bench package (all of it), and the CLI's `train`, `prepare` and
# `bench` commands with the modules they reach
ROOTS = {"dist_lm.bench.gpu.*": None,
         "dist_lm.__main__": {"main", "train", "prepare", "bench", "_stdin_file",
                              "_help_requested"}}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def kit_wheels() -> dict[str, str]:
    """name -> version, from the one KIT_WHEELS array of launch/gpu_kit.sh."""
    text = (REPO / "launch" / "gpu_kit.sh").read_text()
    body = re.search(r"^KIT_WHEELS=\((.*?)^\)", text, re.S | re.M).group(1)
    specs = [line.split("#")[0].strip() for line in body.splitlines()]
    pairs = [s.split("==") for s in specs if s]
    assert all(len(p) == 2 and p[1] for p in pairs), pairs  # one pinned version each
    names = [norm(n) for n, _ in pairs]
    assert len(names) == len(set(names)), names
    return {norm(n): v for n, v in pairs}


def image_packages() -> set[str]:
    lines = (REPO / "launch" / "gpu_image_packages.txt").read_text().splitlines()
    return {norm(x) for x in lines if x.strip() and not x.startswith("#")}


def _module_file(mod: str) -> Path | None:
    base = REPO / Path(*mod.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _optional(node: ast.AST, parents: dict) -> bool:
    """Inside `try: ... except ImportError` (an import the code does without)."""
    while node in parents:
        node, child = parents[node], node
        if isinstance(node, ast.Try) and child in node.body:
            for h in node.handlers:
                names = ast.unparse(h.type) if h.type else ""
                if "ImportError" in names or "ModuleNotFoundError" in names:
                    return True
    return False


def third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the dist_lm modules importing it, over every module
    reached from ROOTS (imports inside functions included: they run when the check runs)."""
    todo = [(m, fns) for m, fns in ROOTS.items() if not m.endswith("*")]
    for m in (m for m in ROOTS if m.endswith("*")):
        pkg = m[:-2]
        todo += [(f"{pkg}.{p.stem}" if p.stem != "__init__" else pkg, None)
                 for p in sorted((REPO / Path(*pkg.split("."))).glob("*.py"))]
    seen: set[str] = set()
    found: dict[str, set[str]] = {}
    while todo:
        mod, fns = todo.pop()
        fns = ROOTS.get(mod) or fns  # the CLI module: only the commands the check runs
        key = mod if fns is None else f"{mod}:{sorted(fns)}"
        if key in seen:
            continue
        seen.add(key)
        path = _module_file(mod)
        tree = ast.parse(path.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        scopes = [tree] if fns is None else (
            [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            + [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in fns])
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for scope in scopes:
            for node in ast.walk(scope):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.ImportFrom):
                    base = pkg.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    for a in node.names:  # `from . import x` may name a submodule
                        sub = f"{target}.{a.name}"
                        todo.append((sub if _module_file(sub) else target, None))
                    continue
                else:
                    continue
                if _optional(node, parents):
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top == "dist_lm":
                        todo.append((name if _module_file(name) else name.rpartition(".")[0],
                                     None))
                    elif top not in sys.stdlib_module_names and top != "tomli":
                        found.setdefault(top, set()).add(mod)  # tomli: Python < 3.11 only
    return found


def distribution(module: str) -> str:
    dists = md.packages_distributions().get(module)
    assert dists, f"no installed distribution provides {module!r} (install the test extras)"
    return norm(dists[0])


def test_kit_declares_one_pinned_version_of_each_wheel():
    wheels = kit_wheels()
    for need in ("fire", "termcolor", "webdataset", "braceexpand", "deepspeed", "hjson",
                 "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                 "typing-extensions"):
        assert need in wheels, need
    assert not set(wheels) & {"torch", "triton", "numpy"}  # the image's own builds stay


def test_every_import_of_the_check_is_in_the_image_or_the_kit():
    kit, image = kit_wheels(), image_packages()
    imports = third_party_imports()
    # the walk reaches the modules that matter: the CLI, the shard reader, DeepSpeed's engine
    for mod in ("fire", "torch", "numpy", "webdataset", "deepspeed", "triton"):
        assert mod in imports, (mod, sorted(imports))
    assert "optuna" not in imports and "wandb" not in imports, sorted(imports)
    missing = {m: sorted(by) for m, by in imports.items()
               if distribution(m) not in kit and distribution(m) not in image}
    assert not missing, f"imported by the GPU check, in neither the image nor the kit: {missing}"


def test_every_need_of_the_kit_is_in_the_image_or_the_kit():
    """Requires-Dist (no extras, markers true for Python 3.12 on Linux) of each kit package,
    read from the installed metadata here (CI installs the same packages) and, when a built kit
    is present (.gpu_kit/wheels), from its wheels themselves."""
    from packaging.requirements import Requirement

    kit, image = kit_wheels(), image_packages()
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "extra": ""}
    sources = {n: md.requires(n) or [] for n in kit if _installed(n)}
    wheels = sorted((REPO / ".gpu_kit" / "wheels").glob("*.whl"))
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            reqs = [ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines()
                    if ln.startswith("Requires-Dist:")]
        sources[f"{w.name}"] = reqs
    assert len(sources) >= len(kit) - 1, sorted(sources)  # deepspeed etc. installed in CI
    missing = {}
    for who, reqs in sources.items():
        for r in map(Requirement, reqs):
            if r.marker is not None and not r.marker.evaluate(env):
                continue
            if norm(r.name) not in kit and norm(r.name) not in image:
                missing.setdefault(who, []).append(str(r))
    assert not missing, f"kit packages need what neither the image nor the kit has: {missing}"
    if wheels:  # a built kit holds exactly the declared wheels, one version each
        got = {norm(w.name.split("-")[0]): w.name.split("-")[1] for w in wheels}
        assert got == kit, (got, kit)


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def test_the_walk_sees_an_import_that_is_missing(tmp_path, monkeypatch):
    """The completeness check can fail: a module of the bench package importing optuna inside
    a function (optuna is in neither list) is found by the walk and missing from both lists."""
    kit, image = kit_wheels(), image_packages()
    assert "optuna" not in third_party_imports()
    for p in (REPO / "dist_lm").rglob("*.py"):
        dst = tmp_path / p.relative_to(REPO)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(p.read_text())
    (tmp_path / "dist_lm" / "bench" / "gpu" / "extra.py").write_text(
        "def f():\n    import optuna\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = third_party_imports()
    assert found["optuna"] == {"dist_lm.bench.gpu.extra"}
    assert distribution("optuna") not in set(kit) | image


@pytest.mark.parametrize("script", ["gpu_kit.sh", "gpu_check.sh"])
def test_scripts_parse(script):
    import subprocess

    p = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
