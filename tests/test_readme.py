"""The README and the docs stay true: the set-up commands are what CI runs, every Python example
in README.md and docs/*.md runs and asserts what it claims (none prints a bool for a reader to
check), the README's results table is the render of the newest committed counts file, and every
relative link points to a file (and heading) that exists."""

import json
import pathlib
import re
import textwrap

import pytest

from bench import headline

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETUP = {"demo": "setup: install and demo", "tests": "setup: tests"}


def marked_block(marker: str, language: str = "bash") -> str:
    """The fenced block right after the README's `<!-- marker -->` comment."""
    found = re.search(rf"<!-- {re.escape(marker)} -->\n```{language}\n(.*?)```", README, flags=re.S)
    assert found, f"README.md has no ```{language} block right after <!-- {marker} -->"
    return found.group(1).strip()


def python_examples():
    for page in PAGES:
        text = page.read_text()
        # A block may sit indented inside a list item: its code is dedented by the fence's indent.
        for block in re.finditer(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M):
            line = text.count("\n", 0, block.start()) + 2
            # The docs pages' examples train small ViTs: the fast mode (-m "not slow") runs the README's.
            marks = () if page.name == "README.md" else pytest.mark.slow
            code = textwrap.dedent(block.group(2))
            yield pytest.param(page, line, code, id=f"{page.relative_to(ROOT)}:{line}", marks=marks)


EXAMPLES = list(python_examples())


def test_setup_commands():
    demo, tests = marked_block(SETUP["demo"]), marked_block(SETUP["tests"])
    assert demo.endswith("python bench/demo.py") and (ROOT / "bench" / "demo.py").exists()
    assert tests.endswith("python -m pytest -q -n auto")


def test_ci_runs_the_readme_test_command():
    readme_command = marked_block(SETUP["tests"])
    # .ci/run uses its own venv folder; everything after activation must match word for word.
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    ci_command = next(line for line in ci_lines if "pip install" in line)
    assert readme_command.split("activate", 1)[1] == ci_command.split("activate", 1)[1]


@pytest.mark.parametrize("page, line, code", EXAMPLES)
def test_python_example_runs(tmp_path, monkeypatch, page, line, code):
    monkeypatch.chdir(tmp_path)  # the examples write files (save_adapters)
    exec(compile("\n" * (line - 1) + code, str(page), "exec"), {})  # errors name the page's line


def test_examples_assert_their_claims():
    assert len(EXAMPLES) >= 8 and any(page.name == "README.md" for page, _, _ in (e.values for e in EXAMPLES))
    for page, line, code in (example.values for example in EXAMPLES):
        assert not re.search(r"print\((torch\.)?(allclose|equal)", code), f"{page.name}:{line} prints a bool"
    assert "assert" in marked_quickstart()


def marked_quickstart() -> str:
    section = README.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_results_table_is_the_newest_counts_file():
    newest = json.loads(headline.latest().read_text())
    assert headline.readme_block(newest) in README, (
        f"README.md's results table is not the render of {headline.latest().name}: "
        "run python -m bench.headline --readme on it")


def anchors(page: pathlib.Path) -> set:
    """The anchors of a markdown page's headings, as GitHub makes them (code blocks left out)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    titles = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") for title in titles}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
        if "://" in target:
            continue
        linked = page.parent / target if target else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name} links to {target}#{anchor}, a heading that does not exist"
