"""The README's Quick start is what CI runs: keep them in step."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^#+ .*quick ?start.*$", text, flags=re.IGNORECASE | re.MULTILINE)
    assert section, "README.md has no 'Quick start' heading"
    block = re.search(r"^```[^\n]*\n(.*?)^```", text[section.end():], flags=re.DOTALL | re.MULTILINE)
    assert block, "no code block under the Quick start heading"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_quick_start_has_main_job_then_tests():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "task_jointUpsampling.main" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert quick_start_commands()[1].strip() in ci_lines


def test_self_contained_python_examples_run():
    """Every README example that starts with `import torch` runs as written."""
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
              if b.startswith("import torch")]
    assert len(blocks) >= 2  # the PAC layers and the CRF examples
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
