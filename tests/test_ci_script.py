"""`.ci/run` does what the README tells a user (issue 17.12): the README's install command and
test command, in a virtual environment of its own (never the clone's `.venv`), and pytest
says why each skipped test was skipped."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_install_and_test_commands_outside_the_clones_venv():
    readme = (ROOT / "README.md").read_text()
    script = (ROOT / ".ci/run").read_text()
    commands = [line for line in script.splitlines() if line and not line.startswith("#")]
    install = re.search(r"pip install -e '\.\[dev\]'", readme)
    assert install and "pip install -e '.[dev]'" in commands
    tests = readme.split("## Run the tests", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    assert tests.strip() == "pytest" and commands[-1] == "pytest"
    assert ".venv" not in "\n".join(commands)  # a user's environment is left alone


def test_pytest_reports_why_tests_were_skipped():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    assert "-rs" in options["ini_options"]["addopts"].split()
