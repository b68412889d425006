"""The package surface: light import, documented public names, runnable docstring examples."""

import doctest
import importlib
import pkgutil
import subprocess
import sys

import pytest

import vanishing


def test_import_is_light():
    code = (
        "import sys, vanishing; "
        "heavy = [m for m in ('torch', 'matplotlib', 'pyarrow', 'pandas', 'rich', 'typer') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_are_documented_with_an_example():
    for name in vanishing.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(vanishing, name)
        doc = obj.__doc__ or ""
        assert doc.strip(), f"vanishing.{name} has no docstring"
        assert ">>>" in doc, f"vanishing.{name}'s docstring has no example"


def _modules():
    for info in pkgutil.walk_packages(vanishing.__path__, "vanishing."):
        yield info.name


@pytest.mark.parametrize("module", sorted(_modules()))
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if module.startswith("vanishing.integrations."):  # each needs its extra installed
        pytest.importorskip(module.rsplit(".", 1)[-1])
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(mod, module, globs={}):
        result = runner.run(test)
        assert result.failed == 0, f"doctest failed in {test.name}"
