"""``/tokenize``, ``/detokenize`` (vLLM's shapes) and ``/version`` against a real server on 127.0.0.1 (the tiny
random-weight InternVL2-1B checkpoint, with an API key), compared with the checkpoint's own tokenizer and with
the chat completion's ``usage.prompt_tokens``."""

from __future__ import annotations

import httpx
import openai
import pytest

from internvl_runtime.processing.prompt_encoder import PromptEncoder
from internvl_runtime.processing.tokenization import AutoTokenizer
from internvl_runtime.serving.config import ServerConfig
from internvl_runtime.version import __version__
from paths import FIXTURES

from .helpers import MODEL, data_url, png_bytes, run_server

KEY = "tokenize-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=2048, num_blocks=512, max_tiles_per_image=2,
                          max_num_seqs=4, api_key=KEY)
    with run_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_1b):
    return AutoTokenizer.from_pretrained(tiny_1b)


def tokenize(http, **body):
    response = http.post("/tokenize", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------------------------------------------


def test_prompt_round_trip(http, tokenizer):
    result = tokenize(http, prompt=TEXT)
    assert result["tokens"] == tokenizer.encode(TEXT)
    assert result["count"] == len(result["tokens"]) > 1
    assert result["max_model_len"] == 2048 and result["token_strs"] is None
    back = http.post("/detokenize", json={"model": MODEL, "tokens": result["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": TEXT}


def test_token_strings_on_request(http, tokenizer):
    result = tokenize(http, prompt=TEXT, return_token_strs=True)
    assert result["token_strs"] == tokenizer.convert_ids_to_tokens(result["tokens"])


def test_messages_count_what_the_chat_completion_counts(http, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    result = tokenize(http, messages=messages)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert result["count"] == len(result["tokens"]) == chat.usage.prompt_tokens
    assert tokenize(http, messages=messages[1:])["count"] != result["count"]     # the system message counts


def test_messages_with_an_image_count_its_tiles(http, client):
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(96, 48, (10, 200, 10)))}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
    one = tokenize(http, messages=messages, max_dynamic_patch=1)
    two = tokenize(http, messages=messages, max_dynamic_patch=2)
    chat_one = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                              extra_body={"max_dynamic_patch": 1})
    assert one["count"] == chat_one.usage.prompt_tokens
    assert two["count"] - one["count"] == 2 * 256      # 2:1 image: 2 tiles + thumbnail instead of one tile


def test_detokenize_refuses_ids_outside_the_vocabulary(http, tokenizer):
    for tokens, bad in (([5, len(tokenizer) + 10], f"tokens[1]: {len(tokenizer) + 10}"), ([-1], "tokens[0]: -1")):
        response = http.post("/detokenize", json={"model": MODEL, "tokens": tokens})
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert bad in message and "fixtures" not in message       # no server path in the answer


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "does not exist"),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_dynamic_patch": "1"}, 400,
     "max_dynamic_patch"),
    ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ("/tokenize", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "does not exist"),
    ("/detokenize", {"model": MODEL, "tokens": "1 2"}, 400, "tokens"),
])
def test_bad_requests(http, path, body, status, needle):
    response = http.post(path, json=body)
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


def test_api_key_guards_the_token_routes_not_the_version(server):
    for path, body in (("/tokenize", {"model": MODEL, "prompt": "x"}),
                       ("/detokenize", {"model": MODEL, "tokens": [1]})):
        assert httpx.post(server.base_url + path, json=body, timeout=10).status_code == 401
    version = httpx.get(server.base_url + "/version", timeout=10)
    assert version.status_code == 200 and version.json() == {"version": __version__}


@pytest.mark.parametrize("large_bytes", [1 << 20, 8])      # on the calling thread; in the worker process
def test_prompt_encoder_add_special_tokens(large_bytes):
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "ckpt" / "tiny-2B")      # InternLM2: adds <s>
    encoder = PromptEncoder(tokenizer, max_tokens=512, large_bytes=large_bytes)
    try:
        assert encoder.encode(TEXT) == tokenizer.encode(TEXT)
        assert encoder.encode(TEXT, add_special_tokens=False) == tokenizer.encode(TEXT, add_special_tokens=False)
        assert encoder.encode(TEXT) == [tokenizer.bos_token_id, *encoder.encode(TEXT, add_special_tokens=False)]
    finally:
        encoder.close()
