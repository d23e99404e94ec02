"""The README stays true: its set-up commands are what CI runs, and its Python example runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_two_setup_commands():
    blocks = bash_blocks()
    assert len(blocks) == 2, "the README gives exactly two set-up commands"
    main_job, tests = (block.strip() for block in blocks)
    assert "python bench/demo.py" in main_job
    assert (ROOT / "bench" / "demo.py").exists()
    assert tests.endswith("python -m pytest -q -n auto")


def test_ci_runs_the_readme_test_command():
    readme_command = bash_blocks()[1].strip()
    # .ci/run uses its own venv folder; everything after activation must match word for word.
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    ci_command = next(line for line in ci_lines if "pip install" in line)
    assert readme_command.split("activate", 1)[1] == ci_command.split("activate", 1)[1]


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files (save_adapters)
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
