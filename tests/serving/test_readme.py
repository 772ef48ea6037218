"""The README's OpenAI-client example works as written (only the port differs: a free one here)."""

from __future__ import annotations

import re
from pathlib import Path

from internvl_runtime.serving.config import ServerConfig

from .helpers import run_server

README = Path(__file__).resolve().parents[2] / "README.md"


def serve_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Serve")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_readme_shows_the_three_newcomer_commands():
    section = serve_section()
    bash = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in bash.splitlines() if line.strip()]
    assert commands == ['python3 -m pip install torch==2.13.0 -e ".[test]"', "python3 -m pytest -q",
                        "internvl serve --demo"]


def test_readme_openai_example_runs(tiny_1b, capsys):
    code = re.search(r"```python\n(.*?)```", serve_section(), re.DOTALL).group(1)
    assert "http://127.0.0.1:23333/v1" in code
    with run_server(ServerConfig(model=str(tiny_1b), num_blocks=512)) as server:
        exec(compile(code.replace("http://127.0.0.1:23333", server.base_url), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "CompletionUsage(" in out and "prompt_tokens=" in out
