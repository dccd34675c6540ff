"""The README's ten-line example runs as printed, and its set-up commands match .ci/run."""

import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _section_code(markdown: str, heading: str, language: str) -> str:
    section = markdown.split(heading, 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_ten_line_example_runs_and_the_higher_order_samplers_win():
    code = _section_code((ROOT / "README.md").read_text(), "## Ten lines", "python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    errors = {name: float(err) for name, nfe, err in (line.split() for line in out.getvalue().splitlines())}
    assert set(errors) == {"ddim", "dpm_solver++_2m", "unipc"}
    assert errors["dpm_solver++_2m"] < errors["ddim"] and errors["unipc"] < errors["ddim"]


def test_ci_runs_the_readme_test_command_verbatim():
    commands = _section_code((ROOT / "README.md").read_text(), "## Set-up: two commands", "bash")
    test_command = [line for line in commands.splitlines() if line.startswith("pip install -e '.[test]'")][0]
    assert test_command in (ROOT / ".ci" / "run").read_text()
