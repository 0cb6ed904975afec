"""The promises the repository makes about itself."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.strip().startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command_verbatim():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    test_command = [c for c in commands if c.endswith("&& pytest")]
    assert len(test_command) == 1
    assert test_command[0] in (ROOT / ".ci" / "run").read_text()


def test_main_quick_start_runs_the_search():
    assert any(c.endswith("&& python -m nasops.search") for c in quick_start_commands())


def test_top_level_layout():
    for name in ("setup.py", "pyproject.toml", "csrc", "nasops", "benchmarks", "tests", "README.md", ".ci/run"):
        assert (ROOT / name).exists(), name
