"""Every docstring example of the public modules runs, as written, in the module's namespace.

Examples run in a fresh temporary folder (some write files). pac_triton's kernel examples need
Triton: without it they are skipped here, and ``-m triton`` runs them through the interpreter.
"""
import doctest
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ["pac", "paccrf", "pac_triton", "hubconf"]
PACKAGES = ["weights", "tools", "meta", "task_jointUpsampling", "task_semanticSegmentation"]
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def public_modules() -> list:
    names = list(TOP_LEVEL)
    for package in PACKAGES:
        names.append(package)
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)])
                  if not m.name.startswith("_")]
    return names


def needs_triton(test: doctest.DocTest) -> bool:
    """pac_triton examples that launch the kernel (the module docstring's is guarded by is_available)."""
    import pac_triton
    return test.name.startswith("pac_triton.pac_") and not pac_triton.is_available()


def run_examples(module_name: str) -> tuple:
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report, skipped = [], []
    for test in doctest.DocTestFinder().find(module):
        if not test.examples:
            continue
        if needs_triton(test):
            skipped.append(test.name)
            continue
        runner.run(test, out=report.append)
    return runner.summarize(verbose=False), "".join(report), skipped


def test_every_public_module_is_listed():
    names = public_modules()
    assert {"pac", "paccrf", "weights", "tools.runtime", "task_semanticSegmentation.models",
            "task_jointUpsampling.models", "meta.make_sintel_split"} <= set(names)


@pytest.mark.parametrize("module_name", public_modules())
def test_docstring_examples_run(module_name, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    results, report, skipped = run_examples(module_name)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed:\n{report}"
    if skipped:
        pytest.skip(f"{', '.join(skipped)}: needs Triton (run with -m triton)")


@pytest.mark.triton
def test_pac_triton_examples_run_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    code = ("import doctest, pac_triton; "
            "r = doctest.testmod(pac_triton, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE); "
            "assert r.attempted >= 3 and r.failed == 0, r")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
