"""pyproject.toml: what `pip install .` installs, and that requirements*.txt stay in step with it."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = {"pac.py", "pac_cpu.py", "paccrf.py", "pac_triton.py"}
NOT_INSTALLED = ("tools", "weights", "meta", "bench", "tests", "task_jointUpsampling", "task_semanticSegmentation")


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_lines(name):
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [line for line in lines if line]


def test_metadata():
    meta = project()
    assert meta["requires-python"] == ">=3.10"
    assert meta["dependencies"] == ["torch>=2.1", "numpy>=1.23", "tqdm>=4.60"]
    assert {"tasks", "safetensors", "triton", "test", "export", "bench"} <= set(meta["optional-dependencies"])
    assert sys.version_info >= (3, 10)


def test_requirements_files_match_the_extras():
    """The README's commands install requirements*.txt: they must list what pyproject.toml declares."""
    extras = project()["optional-dependencies"]
    assert requirement_lines("requirements.txt") == project()["dependencies"] + extras["tasks"]
    assert extras["test"] == ["pacnet[tasks,safetensors,export]", "pytest>=7.0"]
    assert requirement_lines("requirements-test.txt") == ["-r requirements.txt"] + extras["safetensors"] + \
        extras["export"] + ["pytest>=7.0"]
    assert requirement_lines("requirements-triton.txt") == ["-r requirements-test.txt"] + extras["triton"]


def _copy_sources(target: Path) -> Path:
    """The repository without build outputs, data or caches (building writes into the source tree)."""
    ignore = shutil.ignore_patterns(".git", "data", "exp", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "*.pyc", ".venv", "venv", ".mypy_cache", ".ruff_cache")
    return Path(shutil.copytree(ROOT, target, ignore=ignore))


def _build_wheel(tmp_path: Path) -> Path:
    source = _copy_sources(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("pacnet-*.whl")
    return wheel


def test_wheel_installs_the_library_only(tmp_path):
    pytest.importorskip("setuptools")  # the build backend, used without network (--no-build-isolation)
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {n for n in names if ".dist-info/" not in n} == LIBRARY
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Python: >=3.10" in metadata
    assert "Requires-Dist: torch>=2.1" in metadata and "Requires-Dist: scipy>=1.9; extra == \"tasks\"" in metadata

    # a fresh venv that sees the installed torch/numpy/tqdm, with the wheel installed offline
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check = ("import sys, pac, pac_cpu, paccrf, pac_triton; from pathlib import Path; "
             "print(*(Path(m.__file__).parent for m in (pac, pac_cpu, paccrf, pac_triton)), sep='\\n')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([str(python), "-c", check], cwd=outside, env=env, capture_output=True, text=True,
                           timeout=120, check=True).stdout.split()
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=outside, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert found == [site] * 4  # imported from the venv, not from the repository
    assert not any((Path(site) / name).exists() for name in NOT_INSTALLED)
