"""``data:`` URLs (RFC 2397), decoded in one place for every caller: the server's media fetcher, the
image loader and the offline pipeline.

``data:[<mime>][;<param>]*[;base64],<data>``: base64 payloads may be line-wrapped (whitespace is dropped)
and must be valid base64; other payloads are percent-decoded. The size is bounded before decoding (from
the payload's length) and after. What a caller accepts (a media type, base64 only) is the caller's rule,
checked on the returned :class:`DataURL`.

Example::

    url = decode_data_url("data:image/png;base64,iVBORw0KGgo...", max_bytes=16 * 2**20)
    url.mime, url.is_base64, len(url.data)      # ('image/png', True, ...)
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass

from ..errors import InvalidRequest

__all__ = ["DataURL", "decode_data_url", "is_data_url"]

_HEADER = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class DataURL:
    mime: str             # lower-case, "" when the URL names none
    is_base64: bool
    data: bytes


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def decode_data_url(url: str, *, max_bytes: int, what: str = "data URL") -> DataURL:
    """Decode a ``data:`` URL of at most ``max_bytes`` decoded bytes. Raises InvalidRequest (a 400) naming
    ``what`` when it is malformed, not valid base64, empty, or too large."""
    match = _HEADER.match(url)
    if match is None:
        raise InvalidRequest(f"malformed data URL for {what}: expected data:<type>;base64,<data>")
    mime = match.group("mime").strip().lower()
    params = [p.strip().lower() for p in match.group("params").split(";") if p.strip()]
    is_base64 = "base64" in params
    payload = url[match.end():]
    if is_base64:
        payload = re.sub(r"\s+", "", payload)
        if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
            raise InvalidRequest(f"{what} is larger than the limit of {max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"{what} holds invalid base64: {exc}") from None
    else:
        if len(payload) > 3 * max_bytes:            # percent-encoding triples a byte at most
            raise InvalidRequest(f"{what} is larger than the limit of {max_bytes} bytes")
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise InvalidRequest(f"{what} holds no data")
    if len(data) > max_bytes:
        raise InvalidRequest(f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    return DataURL(mime, is_base64, data)
