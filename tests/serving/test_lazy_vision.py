"""``internvl serve`` on the CPU reads the vision encoder only on the first request with an image (issue #18):
a text-only server never loads it, and the first image request is answered exactly as an eager server answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from internvl_runtime.serving.config import ServerConfig

from .helpers import MODEL, data_url, png_bytes, run_server


def _chat(base: str, content: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
    response = httpx.post(base + "/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


IMAGE = [{"type": "text", "text": "What is in the image?"},
         {"type": "image_url", "image_url": {"url": data_url(png_bytes(96, 64, noise=True))}}]


def test_text_only_server_never_loads_the_encoder_and_the_first_image_matches_eager(tiny_1b: Path) -> None:
    with run_server(ServerConfig(model=str(tiny_1b), device="cpu", max_num_seqs=2, num_blocks=256)) as server:
        model = server.engine.engine.model
        text = _chat(server.base_url, "Hello there")
        assert text["choices"][0]["message"]["content"] is not None
        assert not model.vision_loaded                               # "auto" on the CPU: lazy
        assert all(p.is_meta for n, p in model.named_parameters() if n.startswith(("vision_model.", "mlp1.")))
        lazy_answer = _chat(server.base_url, IMAGE)
        assert model.vision_loaded
    with run_server(ServerConfig(model=str(tiny_1b), device="cpu", max_num_seqs=2, num_blocks=256,
                                 vision_load="eager", no_mmap=True)) as server:
        assert server.engine.engine.model.vision_loaded
        eager_answer = _chat(server.base_url, IMAGE)
    assert lazy_answer["choices"][0]["message"] == eager_answer["choices"][0]["message"]
    assert lazy_answer["usage"] == eager_answer["usage"]


def test_serve_flags_reach_the_config() -> None:
    import pytest

    from internvl_runtime import cli
    from internvl_runtime.errors import InvalidRequest

    parser = cli.build_parser()
    args = parser.parse_args(["serve", "ckpt", "--no-mmap", "--vision-load", "eager"])
    config = ServerConfig(model="ckpt", **{f.name: getattr(args, f.name) for f in ServerConfig.cli_fields()})
    assert config.no_mmap is True and config.vision_load == "eager"
    defaults = parser.parse_args(["serve", "ckpt"])
    assert defaults.no_mmap is False and defaults.vision_load == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "ckpt", "--vision-load", "sometimes"])
    with pytest.raises(InvalidRequest):
        ServerConfig(model="ckpt", vision_load="sometimes")
    assert cli.build_parser().parse_args(["generate", "ckpt", "--prompt", "hello", "--no-mmap"]).no_mmap is True
