"""processing.data_url: the one decoder of data: URLs (server, image loader, pipeline)."""

from __future__ import annotations

import base64

import pytest

from internvl_runtime.errors import InvalidRequest
from internvl_runtime.processing.data_url import decode_data_url, is_data_url


def test_base64_and_percent_encoded() -> None:
    payload = base64.b64encode(b"\x89PNG-bytes").decode()
    url = decode_data_url(f"DATA:Image/PNG;name=a.png;base64,{payload[:5]}\n {payload[5:]}", max_bytes=100)
    assert (url.mime, url.is_base64, url.data) == ("image/png", True, b"\x89PNG-bytes")
    plain = decode_data_url("data:text/plain,hello%20world", max_bytes=100)
    assert (plain.mime, plain.is_base64, plain.data) == ("text/plain", False, b"hello world")
    assert is_data_url("Data:,x") and not is_data_url("http://x")


@pytest.mark.parametrize(("url", "words"), [
    ("data:image/png;base64", "malformed data URL for the clip"),
    ("data:image/png;base64,QUJD=QUJD", "the clip holds invalid base64"),
    ("data:image/png;base64,", "the clip holds no data"),
    ("data:image/png;base64," + base64.b64encode(b"x" * 101).decode(), "the clip is 101 bytes; the limit is 100"),
    ("data:image/png;base64," + "QUJD" * 1000, "the clip is larger than the limit of 100 bytes"),
    ("data:image/png," + "A" * 101, "the clip is 101 bytes; the limit is 100"),
    ("data:image/png," + "%41" * 101, "the clip is larger than the limit of 100 bytes"),
])
def test_bad_urls_name_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        decode_data_url(url, max_bytes=100, what="the clip")
