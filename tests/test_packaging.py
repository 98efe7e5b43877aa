"""The project's shape: kernels/ installs as kvlab.kernels (editable and wheel), the dependency
lists agree (pyproject ranges ⊇ lock pins; environment.yml = pyproject), importing kvlab
stays light (no numba, no torch), and the browser test runs in CI but not in `make test`."""
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# pip name -> the conda-forge packages that provide it (with the extras they stand for)
CONDA_NAMES = {"torch": ["pytorch"]}
CU13_EXTRA = {"cuda-version", "cuda-bindings", "cuda-nvrtc", "cuda-nvvm", "cuda-cudart", "cuda-cccl",
              "libnvjitlink"}


def _requirements() -> list[Requirement]:
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]
    return [Requirement(d) for d in deps]


def _run(code: str, cwd: Path, env_extra: dict | None = None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (env_extra or {})
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_top_level_layout():
    for name in ("notebooks", "kvlab", "kernels", "data", "tests", "docs", "environment.yml",
                 "pyproject.toml", "Makefile", "README.md", ".ci/run"):
        assert (ROOT / name).exists(), name
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_every_package_is_listed_in_pyproject():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {"kvlab._data"}
    for top, name in (("kvlab", "kvlab"), ("kernels", "kvlab.kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *parts)))
    assert listed == found


def test_editable_install_maps_kernels_into_kvlab(tmp_path):
    where = _run("import kvlab.kernels, kvlab.kernels.cuda, kvlab._data as d; "
                 "print(kvlab.kernels.__file__); print(list(d.__path__)[0])", cwd=tmp_path)
    kernels_file, data_dir = where.splitlines()
    assert Path(kernels_file) == ROOT / "kernels" / "__init__.py"
    assert Path(data_dir) == ROOT / "data"


def test_import_kvlab_imports_neither_numba_nor_torch(tmp_path):
    loaded = _run("import sys, kvlab, kvlab.memory, kvlab.backends; "
                  "print(sorted(m for m in ('numba', 'torch', 'matplotlib') if m in sys.modules))",
                  cwd=tmp_path)
    assert loaded == "[]"


@pytest.mark.slow
def test_built_wheel_carries_kernels_and_data(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("kvlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("kvlab/__init__.py", "kvlab/kernels/__init__.py", "kvlab/kernels/cuda/__init__.py",
                   "kvlab/kernels/mps/__init__.py", "kvlab/ref/__init__.py", "kvlab/plot/paging.py",
                   "kvlab/_data/models.json", "kvlab/_data/trace_sharegpt.csv",
                   "kvlab/_data/tiny_qwen3/model.safetensors"):
        assert needed in names, needed
    assert not any(n.startswith(("kernels/", "data/", "tests/")) for n in names), "stray top level"
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                              "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    # Run from outside the repo with only the wheel's files ahead of site-packages.
    out = _run("import sys; sys.path.insert(0, %r); import kvlab, kvlab.kernels; "
               "from kvlab.shapes import list_models; "
               "print(kvlab.kernels.__file__); print(len(list_models()))" % str(target),
               cwd=tmp_path)
    kernels_file, count = out.splitlines()
    assert kernels_file.startswith(str(target)) and int(count) >= 10


def test_lock_pins_satisfy_pyproject_ranges():
    lock = {}
    for line in (ROOT / "requirements/lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version
    for req in _requirements():
        pinned = lock.get(req.name.lower())
        assert pinned is not None, f"{req.name} is not pinned in requirements/lock.txt"
        assert req.specifier.contains(pinned, prereleases=True), f"{req.name}=={pinned} vs {req}"
    assert lock["torch"] == "2.13.0" and lock["numpy"].startswith("2.4.")


def test_environment_yml_agrees_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = {}
    for spec in env["dependencies"]:
        assert isinstance(spec, str), f"unexpected entry {spec!r}"
        name, ver = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", spec).groups()
        conda[name.lower()] = SpecifierSet(ver)
    expected = set()
    for req in _requirements():
        for name in CONDA_NAMES.get(req.name.lower(), [req.name.lower()]):
            expected.add(name)
            assert name in conda, f"{req.name} ({name}) missing from environment.yml"
            assert conda[name] == req.specifier, f"{name}: conda {conda[name]} vs pip {req.specifier}"
        if "cu13" in req.extras:
            expected |= CU13_EXTRA
            assert CU13_EXTRA <= set(conda), "numba-cuda[cu13]'s CUDA packages missing"
    assert set(conda) - {"python", "pip"} == expected, "environment.yml lists extra packages"
    assert conda["python"].contains("3.11") and conda["python"].contains("3.12")


def test_browser_test_runs_in_ci_but_not_in_make_test():
    """`make test` stays browser-free; CI runs the browser test (browser/) after it."""
    assert "browser" not in PYPROJECT["tool"]["pytest"]["ini_options"]["testpaths"]
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = re.search(r"^test: .*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "browser" not in test_recipe
    browser_recipe = re.search(r"^test-browser: .*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "pytest browser" in browser_recipe
    commands = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                if line.startswith("make ")]
    assert commands == ["make test", "make test-browser"]
