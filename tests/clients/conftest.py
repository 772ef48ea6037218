"""Fixtures of the client tests: each test module talks to one real server, started as ``internvl serve``
starts it (``serving.helpers.run_server``: uvicorn on a free 127.0.0.1 port, weights loaded in the app's
lifespan) with the tiny random-weight InternVL2-1B checkpoint, through the real client libraries pinned in the
``test`` extra (openai, litellm, langchain-openai) or, for clients we do not install (LMDeploy's ``APIClient``,
lmms-eval), through httpx with the exact JSON they send.

A module may set ``SERVER_OPTIONS = {...}`` (``ServerConfig`` fields) to change its server; the request limits
otherwise stay at their defaults, since what fits real clients by default is part of what is tested.

The weights are random: answers are gibberish, so tests check shapes, counts, and that structured outputs
parse and validate, never the words.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import openai
import pytest

from internvl_runtime.serving.config import ServerConfig
from serving.helpers import MODEL, TINY_1B, RunningServer, run_server

# litellm fetches its model cost map from the network when imported unless told to use the copy it ships;
# set before any test module imports it (conftest files load first). The run stays offline.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
# langchain would otherwise try to reach its tracing service when an API key for it is in the environment.
os.environ["LANGCHAIN_TRACING_V2"] = "false"
os.environ["LANGSMITH_TRACING"] = "false"

#: The server's sizing for these tests (small, as the tiny checkpoint allows), before SERVER_OPTIONS.
BASE_OPTIONS: dict[str, object] = {"max_model_len": 8192, "num_blocks": 1024, "max_num_seqs": 8}

#: The api key every client sends: the servers require it, as a deployed server would.
API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    if not (TINY_1B / "config.json").is_file():
        pytest.fail(f"tiny checkpoint missing: {TINY_1B} (tests/fixtures, committed with the repository)")
    options = {**BASE_OPTIONS, "api_key": API_KEY, **getattr(request.module, "SERVER_OPTIONS", {})}
    with run_server(ServerConfig(model=str(TINY_1B), **options)) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(server: RunningServer) -> str:
    """The OpenAI base URL clients are given: ``http://127.0.0.1:PORT/v1``."""
    return server.base_url + "/v1"


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model() -> str:
    """The model id the server answers to (the checkpoint folder's name)."""
    return MODEL
