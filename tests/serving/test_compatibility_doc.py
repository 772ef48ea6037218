"""docs/compatibility.md: every ```python block runs as written, on the tiny checkpoint.

Only names a reader would replace are replaced: the checkpoint folder ``pretrained/InternVL2-1B`` becomes the
tiny 1B checkpoint, ``cat.jpg`` a fixture image, and ``http://127.0.0.1:23333`` the address of a real server on
a free loopback port (started once for the blocks that call it). Each block runs on its own, in a fresh
namespace, as a reader pasting it would; its printed output is checked for what the block shows. The doc's
links into README.md must name headings that exist there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

from .helpers import RunningServer, run_server

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "compatibility.md"
README = ROOT / "README.md"
SERVER = "http://127.0.0.1:23333"
IMAGE = FIXTURES / "data" / "img_800x600.png"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def section_of(code: str) -> str:
    """The ``## `` heading above ``code`` in the doc (a test id a reader can find)."""
    text = DOC.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.*)$", text[:text.index(code)], re.MULTILINE)
    return headings[-1] if headings else "(top)"


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation other than '-' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.fixture(scope="module")
def server(tiny_1b: Path) -> Iterator[RunningServer]:
    with run_server(ServerConfig(model=str(tiny_1b), num_blocks=512)) as running:
        yield running


def test_doc_has_a_snippet_for_each_api():
    sections = {section_of(code).split(":")[0] for code in blocks()}
    assert sections == {"1. transformers", "2. LMDeploy", "3. vLLM's and LMDeploy's OpenAI-compatible servers"}
    assert len(blocks()) == len(EXPECTED)


def test_doc_links_to_readme_headings_that_exist():
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.*)$", README.read_text(encoding="utf-8"), re.MULTILINE)}
    links = re.findall(r"\(\.\./README\.md#([^)]+)\)", DOC.read_text(encoding="utf-8"))
    assert links and set(links) <= anchors, set(links) - anchors


def test_readme_links_the_doc():
    assert "docs/compatibility.md" in README.read_text(encoding="utf-8")


# What each block prints that shows it did what the doc says (one marker per block, in doc order).
EXPECTED = [
    "Hermes-2 256 ['Qwen2ForCausalLM']",   # model attributes after beam search and max_length
    "torch.Size([1, 264, ",                 # forward's logits: 256 image tokens + the question
    "loss: [",                              # get_ppl's list of losses
    "tool_calls get_weather {'city': ",     # a forced tool call whose arguments parse
]


@pytest.mark.parametrize("index", range(len(blocks())))
def test_doc_snippet_runs(index: int, tiny_1b: Path, request: pytest.FixtureRequest,
                          capsys: pytest.CaptureFixture[str], restored_logging: None) -> None:
    code = blocks()[index]
    code = code.replace("pretrained/InternVL2-1B", str(tiny_1b)).replace("cat.jpg", str(IMAGE))
    if SERVER in code:
        code = code.replace(SERVER, request.getfixturevalue("server").base_url)
    exec(compile(code, f"{DOC.name}[{section_of(blocks()[index])}]", "exec"), {"__name__": "__doc_snippet__"})
    assert EXPECTED[index] in capsys.readouterr().out
