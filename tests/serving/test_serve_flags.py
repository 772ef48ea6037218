"""``internvl serve``'s flags as vLLM users give them: several served names and API keys, ``--quantization``,
``--device auto``, ``--strict-protocol``; /v1/models cards with the context length, ``root`` and ``parent``;
``HEAD /health``."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from internvl_runtime import cli
from internvl_runtime.errors import InvalidRequest
from internvl_runtime.quantization import Int8Linear
from internvl_runtime.serving.config import ServerConfig

from .helpers import run_server

NAMES = ["internvl2-tiny", "gpt-4o-mini"]
KEYS = ["first-key", "second,key"]       # a key may hold a comma: values are taken whole


@pytest.fixture(scope="module")
def server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), served_model_name=NAMES, api_key=KEYS, max_model_len=1024,
                          num_blocks=128)
    with run_server(config) as running:
        yield running


def test_every_served_name_is_listed_with_its_context(server):
    models = httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    assert [card["id"] for card in models["data"]] == NAMES
    for card in models["data"]:
        assert card["max_model_len"] == 1024 and card["object"] == "model"
        assert card["root"] == server.config.model and card["parent"] is None
    one = httpx.get(server.base_url + f"/v1/models/{NAMES[1]}", headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert one.status_code == 200 and one.json()["id"] == NAMES[1] and one.json()["max_model_len"] == 1024


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("name", NAMES)
def test_any_key_and_any_name_is_accepted(server, key, name):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0) as client:
        answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2)
    assert answer.model == name          # the answer carries the name the request sent, as vLLM's
    assert answer.choices[0].message.content is not None


def test_unknown_names_and_keys_are_refused(server):
    with (openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEYS[0], max_retries=0) as client,
          pytest.raises(openai.NotFoundError) as refused):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    message = refused.value.body["message"]
    assert all(name in message for name in NAMES)
    for key in ("wrong", "first-key,second", KEYS[0] + "x"):
        response = httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 401
    assert httpx.get(server.base_url + "/metrics").status_code == 401


def test_head_health_answers_like_get_without_a_body(server):
    get = httpx.get(server.base_url + "/health")
    head = httpx.head(server.base_url + "/health")
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


def test_head_health_says_503_while_loading(tiny_1b):
    import threading

    release = threading.Event()

    def slow_loader():
        release.wait(60)
        raise RuntimeError("stopped")

    config = ServerConfig(model=str(tiny_1b))
    try:
        with run_server(config, loader=slow_loader, wait_ready=False) as running:
            head = httpx.head(running.base_url + "/health")
            assert head.status_code == 503 and head.content == b""
            assert httpx.get(running.base_url + "/health").json()["status"] == "loading"
    finally:
        release.set()


def test_quantization_int8_serves(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), quantization="int8", max_model_len=512, num_blocks=64)
    with run_server(config) as running:
        model = running.engine.engine.model
        assert model.quantization.mode == "int8"
        assert any(isinstance(m, Int8Linear) for m in model.language_model.modules())
        with openai.OpenAI(base_url=running.base_url + "/v1", api_key="none", max_retries=0) as client:
            answer = client.chat.completions.create(model="tiny-1B", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=3, temperature=0)
        assert answer.usage.completion_tokens >= 1


def test_pack_bf16_serves_the_same_answers(tiny_1b):
    """``--pack-bf16``: the packed layers in the served model, the same greedy answer as the unpacked server."""
    from internvl_runtime import kernels
    from internvl_runtime.quantization import PackedBf16Linear

    if not kernels.available():
        pytest.skip(f"no native kernels here: {kernels.describe()}")
    parser = cli.build_parser()
    args = parser.parse_args(["serve", str(tiny_1b), "--pack-bf16", "--dtype", "bfloat16"])
    assert args.pack_bf16 is True and parser.parse_args(["serve", "ckpt"]).pack_bf16 is False
    assert parser.parse_args(["chat", "ckpt", "--pack-bf16"]).pack_bf16 is True
    answers = []
    for pack in (False, True):
        config = ServerConfig(model=str(tiny_1b), dtype="bfloat16", pack_bf16=pack, max_model_len=512, num_blocks=64)
        with run_server(config) as running:
            model = running.engine.engine.model
            assert any(isinstance(m, PackedBf16Linear) for m in model.language_model.modules()) == pack
            with openai.OpenAI(base_url=running.base_url + "/v1", api_key="none", max_retries=0) as client:
                answer = client.chat.completions.create(
                    model="tiny-1B", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=12,
                    temperature=0)
            answers.append(answer.choices[0].message.content)
    assert answers[0] == answers[1]


@pytest.mark.parametrize("bad", ["int3", "int4:g7", "fp8"])
def test_a_bad_quantization_is_refused_at_once(bad, capsys, tmp_path):
    with pytest.raises(InvalidRequest):
        ServerConfig(quantization=bad)
    assert cli.main(["serve", str(tmp_path), "--quantization", bad]) == 1
    assert "quantization" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:       # chat / generate check it with the same parser
        cli.main(["generate", str(tmp_path), "--prompt", "x", "--quantization", bad])
    assert exit_info.value.code == 2


def test_flags_build_the_config():
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "ckpt", "--served-model-name", "a", "b,c", "--api-key", "k1",
                              "--api-key", "k2", "--quantization", "int4:g64", "--strict-protocol"])
    values = {f.name: getattr(args, f.name) for f in ServerConfig.cli_fields()}
    config = ServerConfig(model="ckpt", **values)
    assert config.model_names == ["a", "b,c"] and config.model_name == "a"
    assert config.api_key == ["k1", "k2"]
    assert config.quantization == "int4:g64" and config.strict_protocol is True
    defaults = parser.parse_args(["serve", "ckpt"])
    assert defaults.device == "auto" and defaults.strict_protocol is False and defaults.quantization is None


def test_device_auto_is_cuda_when_present(monkeypatch):
    monkeypatch.delenv("INTERNVL_API_KEY", raising=False)
    assert ServerConfig().device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert ServerConfig(device="cpu").device == "cpu"


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("INTERNVL_API_KEY", "env-key")
    assert ServerConfig().api_key == ["env-key"]
    assert ServerConfig(api_key=["given"]).api_key == ["given"]


def test_attention_backend_and_enforce_eager_reach_the_runner(tiny_1b):
    """--attention-backend triton runs the Triton paged kernel (here under Triton's interpreter, on CPU tensors);
    --enforce-eager turns the decode graphs off; a backend that does not exist is refused at once."""
    pytest.importorskip("triton")
    args = cli.build_parser().parse_args(["serve", str(tiny_1b), "--attention-backend", "triton", "--enforce-eager",
                                          "--max-model-len", "512", "--num-blocks", "64"])
    values = {f.name: getattr(args, f.name) for f in ServerConfig.cli_fields()}
    config = ServerConfig(model=str(tiny_1b), **values)
    with run_server(config) as running:
        runner = running.engine.engine.runner
        assert runner.attention_backend == "triton" and runner.graphs is None
        with openai.OpenAI(base_url=running.base_url + "/v1", api_key="none", max_retries=0) as client:
            answer = client.chat.completions.create(model="tiny-1B", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=3, temperature=0)
        assert answer.usage.completion_tokens >= 1
    with pytest.raises(InvalidRequest, match="attention_backend"):
        ServerConfig(attention_backend="flash")
