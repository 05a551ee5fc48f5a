"""The package as a user installs it: every module imports without the test-only packages.

`.ci/run` checks the same in an environment that has only the runtime dependencies; this test
catches a test-only import on a developer's machine, where the test extras are installed, by
hiding them from the import system.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

tomllib = pytest.importorskip("tomllib")   # Python 3.11+


def distribution_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower() for requirement in requirements}


def packages_only_tests_need() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return distribution_names(project["optional-dependencies"]["test"]) - distribution_names(project["dependencies"])


IMPORT_EVERY_MODULE_WITHOUT = """
import importlib, pkgutil, sys

class HideTestOnlyPackages:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (a test-only package, hidden)")

sys.meta_path.insert(0, HideTestOnlyPackages())
import moe_offload

def fail(name):
    raise ImportError(f"cannot import {{name}}")

for module in pkgutil.walk_packages(moe_offload.__path__, "moe_offload.", onerror=fail):
    importlib.import_module(module.name)
"""


def test_every_module_imports_without_the_test_only_packages():
    hidden = packages_only_tests_need()
    assert {"transformers", "hqq", "openai", "hypothesis"} <= hidden
    done = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE_WITHOUT.format(hidden=hidden)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_a_test_only_import_is_caught():
    done = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE_WITHOUT.format(hidden={"tqdm"})],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "No module named 'tqdm'" in done.stderr
