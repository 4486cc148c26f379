"""README and docs/: every relative link resolves, and every Python example runs as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from tests.train_helpers import REPO, subprocess_env

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's (and MyST's) anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    text = CODE.sub("", page.read_text())
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _links():
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if not re.match(r"[a-z]+:", target):  # http(s) needs the network: not checked
                yield pytest.param(page, target, id=f"{page.name}->{target}")


@pytest.mark.parametrize(("page", "target"), list(_links()))
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{page.name} links to {target}: no file {linked}"
    if anchor:
        assert anchor in _anchors(linked), f"{page.name} links to {target}: no heading with that anchor"


def test_link_checks_catch_a_missing_file_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section\n")
    assert _anchors(page) == {"title", "a-section"}
    with pytest.raises(AssertionError, match="no file"):
        test_relative_link_resolves(page, "missing.md")
    with pytest.raises(AssertionError, match="no heading"):
        test_relative_link_resolves(page, "page.md#another-section")


def _examples():
    for page in PAGES:
        text = page.read_text()
        for match in CODE.finditer(text):
            line = text[: match.start()].count("\n") + 2
            yield pytest.param(page, line, match.group(1), id=f"{page.name}:{line}")


@pytest.fixture
def example_directory(tmp_path, request):
    """A working directory for an example: with ``runs/digits`` (a trained workdir) and its
    exported ``digits.jax`` when the example uses them."""
    code = request.node.callspec.params["code"]
    if "runs/digits" in code or "digits.jax" in code:
        workdir = request.getfixturevalue("trained_digits")
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "digits").symlink_to(workdir)
        if "digits.jax" in code:
            picture = REPO / "colabs" / "images" / "attention_maps.png"  # any picture will do
            args = ["-m", "train.predict", "--workdir", str(workdir), str(picture), "--export", "digits.jax"]
            result = subprocess.run(
                [sys.executable, *args], capture_output=True, text=True, env=subprocess_env(1), cwd=tmp_path
            )
            assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path


@pytest.mark.parametrize(("page", "line", "code"), list(_examples()))
def test_example_runs(page, line, code, example_directory):
    """The example as written, in a fresh Python process, from a working directory of its own."""
    env, cwd = subprocess_env(1), example_directory
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd)
    assert result.returncode == 0, f"{page.name}, line {line}:\n{result.stderr[-3000:]}"


def test_every_page_is_in_the_site_and_linked_from_the_readme():
    index = (REPO / "docs" / "index.md").read_text()
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        if page.name != "index.md":
            assert f"\n{page.stem}\n" in index, f"{page.name} is missing from the toctree of docs/index.md"
            assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
    assert len(readme.splitlines()) <= 150, "README is the short front door: detail goes to docs/"


def test_every_python_block_is_an_example():
    blocks = sum(page.read_text().count("```python\n") for page in PAGES)
    assert len(list(_examples())) == blocks >= 4
