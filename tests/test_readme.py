from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"


@pytest.mark.timeout(300)
def test_readme_python_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    printed = [line for line in capsys.readouterr().out.splitlines() if "lambda" in line]
    assert len(printed) == 5  # one line per collected batch


def test_readme_test_command_is_what_ci_runs():
    command = re.search(r"```bash\n(python -m pytest[^\n]*)\n```", README.read_text())
    assert command is not None
    ci = (README.parent / ".ci" / "run").read_text()
    assert command.group(1) in ci
