"""A missing extra is a one-line error that names the pip install to run."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module,library,extra",
    [
        ("vanishing.integrations.lightning", "lightning", "lightning"),
        ("vanishing.integrations.transformers", "transformers", "transformers"),
    ],
)
def test_an_integration_without_its_library_says_what_to_install(module, library, extra):
    code = f"import sys; sys.modules[{library!r}] = None\nimport {module}"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.endswith(f'{module} needs {library}: pip install "vanishing[{extra}]"'), last
