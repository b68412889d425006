"""README examples run as written, and the README keeps its two fresh-machine commands."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_readme_has_the_setup_and_run_commands():
    commands = [
        line
        for block in _blocks("bash")
        for line in block.splitlines()
        if line and not line.startswith("#")
    ]
    assert any(c.rstrip().endswith("vanishing demo") and "pip install" in c for c in commands)
    assert any("pytest" in c and "pip install" in c for c in commands)


def test_toml_example_is_a_valid_config():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    from vanishing.experiments.config import parse_config

    blocks = _blocks("toml")
    assert blocks
    for text in blocks:
        cfg = parse_config(tomllib.loads(text))
        assert cfg.model.depth >= 1
