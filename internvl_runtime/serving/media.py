"""Fetching request images safely: data URLs, http(s) URLs, and files under one allowed folder.

The server never lets a request make it read what it should not:

- **http(s) URLs** are resolved first; every address the name resolves to must be public (not loopback,
  private, link-local, shared/CGNAT, multicast, reserved, unspecified, nor a cloud metadata address).
  ``allow_private_urls`` allows loopback, private and the other non-public addresses, but not link-local
  ones (169.254.0.0/16, fe80::/10: where cloud metadata services live), which have their own switch,
  ``allow_link_local_urls``. Cloud metadata addresses are always refused: no media lives there. An IPv6
  address that carries an IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo) is judged by both. The
  connection then goes to the address that was checked (the
  ``Host`` header and TLS SNI keep the name), so a second DNS answer cannot swap in another address.
  Redirects are not followed by the HTTP client: each ``Location`` is checked like the first URL, at most
  ``max_redirects`` times. Proxies from the environment are ignored. The body is streamed and cut at
  ``max_image_bytes``; the whole fetch, redirects included, is bounded by ``timeout_s``.
- **Local files** (``file://`` URLs or paths) are refused unless a folder is allowed; the path is resolved
  (symlinks and ``..`` included) and must stay inside that folder.
- **data: URLs** must say ``image/...;base64`` and hold valid base64 of at most ``max_image_bytes``.

Bytes are then decoded by :func:`decode_image`, which refuses images whose header declares more than
``max_pixels`` pixels before decoding (decompression bombs) and truncated or non-image data, or by
:func:`decode_video`, which opens only an allowlist of container formats (never one that reads other
files) and stops decoding at the first frame over the pixel, duration or decoded-bytes limits.

Example::

    fetcher = MediaFetcher(max_image_bytes=16 << 20, timeout_s=10)
    data = await fetcher.fetch("https://example.com/cat.png")
    image = decode_image(data, max_pixels=25_000_000)
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image

from ..errors import InvalidRequest, MediaFetchError, MediaNotAllowed
from ..processing.data_url import decode_data_url
from ..processing.image import open_image
from ..processing.video import FrameRule, sample_frames
from .config import ServerConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``resolver(host, port) -> addresses`` (async), replaceable in tests.
Resolver = Callable[[str, int], Awaitable[list[str]]]
#: ``check(address) -> reason it is refused, or None``; the default is :func:`refused_address_reason`.
AddressCheck = Callable[[IPAddress], str | None]

#: Cloud instance-metadata endpoints (AWS/GCP/Azure/OpenStack, AWS ECS, AWS IPv6, Alibaba, Azure wire server).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16"))

_REDIRECTS = (301, 302, 303, 307, 308)


#: NAT64's well-known prefix (RFC 6052): 64:ff9b::a.b.c.d reaches a.b.c.d through a NAT64 gateway.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

_METADATA = "a cloud metadata address"
_LINK_LOCAL = "a link-local address"


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, NAT64, 6to4 or Teredo IPv6 address (they reach it)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)


def is_metadata_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is a cloud metadata endpoint, directly or inside an IPv6 address."""
    embedded = _embedded_ipv4(ip)
    return ip in METADATA_ADDRESSES or (embedded is not None and embedded in METADATA_ADDRESSES)


def refused_address_reason(ip: IPAddress, *, allow_private: bool = False,
                           allow_link_local: bool = False) -> str | None:
    """Why ``ip`` may not be fetched from, or None when it may.

    Cloud metadata addresses are always refused; link-local addresses (169.254.0.0/16, fe80::/10) unless
    ``allow_link_local``; loopback, private and every other non-public address unless ``allow_private``.
    An IPv6 address carrying an IPv4 address is refused when the IPv4 address is; an IPv4-mapped one is
    judged as its IPv4 address only.
    """
    if is_metadata_address(ip):
        return _METADATA
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        reason = refused_address_reason(embedded, allow_private=allow_private, allow_link_local=allow_link_local)
        if reason is not None or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None):
            return reason
    if ip.is_link_local:
        return None if allow_link_local else _LINK_LOCAL
    if allow_private:
        return None
    for attribute, label in (("is_loopback", "a loopback address"), ("is_unspecified", "an unspecified address"),
                             ("is_multicast", "a multicast address"), ("is_reserved", "a reserved address"),
                             ("is_private", "a private address")):
        if getattr(ip, attribute):
            return label
    if not ip.is_global:
        return "not a public address"
    return None


def _refusal_hint(reason: str) -> str:
    """Which server flag would allow an address refused for ``reason``."""
    if reason == _METADATA:
        return "no setting allows cloud metadata addresses"
    if reason == _LINK_LOCAL:
        return "the server's --allow-link-local-media-urls flag allows link-local addresses"
    return "the server's --allow-private-media-urls flag allows private addresses"


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), through the event loop's getaddrinfo."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MediaFetcher:
    """Reads the bytes of an image given as a data URL, an http(s) URL or a local path, within limits."""

    def __init__(self, *, max_image_bytes: int = 16 * 2**20, timeout_s: float = 10.0, max_redirects: int = 3,
                 allowed_local_media_path: str | None = None, allow_private_urls: bool = False,
                 allow_link_local_urls: bool = False, resolver: Resolver | None = None,
                 address_check: AddressCheck | None = None, media_kind: str = "image") -> None:
        self.media_kind = media_kind          # "image" or "video": the data-URL type and Accept header
        self.max_image_bytes = max_image_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.allowed_root = os.path.realpath(allowed_local_media_path) if allowed_local_media_path else None
        self.allow_private_urls = allow_private_urls
        self.allow_link_local_urls = allow_link_local_urls
        self.resolver = resolver or system_resolver
        self.address_check = address_check or (
            lambda ip: refused_address_reason(ip, allow_private=allow_private_urls,
                                              allow_link_local=allow_link_local_urls))

    @classmethod
    def from_config(cls, config: ServerConfig, **overrides: Any) -> MediaFetcher:
        """The fetcher a ``ServerConfig`` describes."""
        kwargs: dict[str, Any] = {
            "max_image_bytes": config.max_image_bytes, "timeout_s": config.media_fetch_timeout_s,
            "max_redirects": config.max_redirects, "allowed_local_media_path": config.allowed_local_media_path,
            "allow_private_urls": config.allow_private_media_urls,
            "allow_link_local_urls": config.allow_link_local_media_urls}
        kwargs.update(overrides)
        return cls(**kwargs)

    async def fetch(self, url: str) -> bytes:
        """The encoded image bytes behind ``url``. Raises MediaNotAllowed / MediaFetchError /
        ImageDecodeError (all 400s)."""
        scheme = url.split(":", 1)[0].lower() if ":" in url[:10] else ""
        if scheme == "data":
            return self.read_data_url(url)
        if scheme in ("http", "https"):
            try:
                return await asyncio.wait_for(self._fetch_http(url), timeout=self.timeout_s)
            except asyncio.TimeoutError:
                raise MediaFetchError(f"fetching image {_short(url)} took more than {self.timeout_s:g} s") from None
        if scheme == "file":
            parsed = urllib.parse.urlsplit(url)
            if parsed.netloc not in ("", "localhost"):
                raise MediaNotAllowed(f"file URL {_short(url)} names a remote host")
            return await asyncio.to_thread(self.read_local, urllib.parse.unquote(parsed.path))
        if len(scheme) > 1 and re.fullmatch(r"[a-z][a-z0-9+.\-]*", scheme) and url[len(scheme) + 1:].startswith("//"):
            raise InvalidRequest(f"unsupported image URL scheme {scheme!r}: use data:, http(s): or file:")
        return await asyncio.to_thread(self.read_local, url)

    # -- data URLs -------------------------------------------------------------------------------
    def read_data_url(self, url: str) -> bytes:
        """The bytes of a base64 ``data:`` URL of this fetcher's media kind (``processing.data_url`` decodes)."""
        what = f"{self.media_kind} in data URL"
        decoded = decode_data_url(url, max_bytes=self.max_image_bytes, what=what)
        if not decoded.mime.startswith(f"{self.media_kind}/"):
            raise InvalidRequest(f"data URL has media type {decoded.mime or 'none'!r}; expected a "
                                 f"{self.media_kind}/* type")
        if not decoded.is_base64:
            raise InvalidRequest(f"data URL must be base64-encoded (data:{self.media_kind}/<type>;base64,...)")
        return decoded.data

    # -- local files -----------------------------------------------------------------------------
    def read_local(self, path: str) -> bytes:
        if self.allowed_root is None:
            raise MediaNotAllowed("local image files are disabled on this server (start it with "
                                  "--allowed-local-media-path FOLDER to allow files under FOLDER)")
        if "\x00" in path:
            raise MediaNotAllowed("image path contains a NUL character")
        real = os.path.realpath(os.path.join(self.allowed_root, path))   # resolves .. and symlinks
        try:
            inside = os.path.commonpath([real, self.allowed_root]) == self.allowed_root
        except ValueError:
            inside = False
        if not inside:
            raise MediaNotAllowed(f"image path {_short(path)!r} is outside the allowed folder")
        # O_NONBLOCK: no FIFO hang; O_NOFOLLOW: no late symlink
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(real, flags)
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidRequest(f"image file {_short(path)!r} does not exist") from None
        except OSError:
            raise MediaNotAllowed(f"image file {_short(path)!r} cannot be read") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise MediaNotAllowed(f"image path {_short(path)!r} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            if info.st_size > self.max_image_bytes:
                raise InvalidRequest(f"image file {_short(path)!r} is {info.st_size} bytes; the limit is "
                                     f"{self.max_image_bytes}")
            data = f.read(self.max_image_bytes + 1)
        if len(data) > self.max_image_bytes:
            raise InvalidRequest(f"image file {_short(path)!r} is larger than the limit of "
                                 f"{self.max_image_bytes} bytes")
        return data

    # -- http(s) ---------------------------------------------------------------------------------
    async def check_url(self, url: str) -> tuple[urllib.parse.SplitResult, str]:
        """Parse and vet an http(s) URL; returns it parsed and the checked address to connect to."""
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port or (443 if parsed.scheme.lower() == "https" else 80)
        except ValueError as exc:
            raise InvalidRequest(f"malformed image URL {_short(url)}: {exc}") from None
        if parsed.scheme.lower() not in ("http", "https"):
            raise MediaNotAllowed(f"image URL {_short(url)} must use http or https")
        if not parsed.hostname:
            raise InvalidRequest(f"image URL {_short(url)} has no host")
        if parsed.username is not None or parsed.password is not None:
            raise MediaNotAllowed("image URLs with credentials are not allowed")
        try:
            addresses = await self.resolver(parsed.hostname, port)
        except (OSError, UnicodeError) as exc:
            raise MediaFetchError(f"cannot resolve the host of image URL {_short(url)}: {exc}") from None
        if not addresses:
            raise MediaFetchError(f"the host of image URL {_short(url)} has no address")
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            # Metadata endpoints are refused whatever the policy says: no image lives there.
            reason = _METADATA if is_metadata_address(ip) else self.address_check(ip)
            if reason is not None:
                raise MediaNotAllowed(f"image URL {_short(url)} resolves to {ip}, {reason}; refused "
                                      f"({_refusal_hint(reason)})")
        return parsed, addresses[0]

    async def _fetch_http(self, url: str) -> bytes:
        import httpx

        async with httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                     timeout=httpx.Timeout(self.timeout_s)) as client:
            for _ in range(self.max_redirects + 1):
                parsed, address = await self.check_url(url)
                host = parsed.hostname or ""
                ip_host = f"[{address}]" if ":" in address else address
                netloc = ip_host + (f":{parsed.port}" if parsed.port else "")
                target = urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path or "/", parsed.query, ""))
                host_header = (f"[{host}]" if ":" in host else host) + (f":{parsed.port}" if parsed.port else "")
                extensions = {"sni_hostname": host} if parsed.scheme.lower() == "https" else {}
                try:
                    async with client.stream("GET", target, headers={"Host": host_header,
                                                                     "User-Agent": "internvl-runtime",
                                                                     "Accept": f"{self.media_kind}/*"},
                                             extensions=extensions) as response:
                        if response.status_code in _REDIRECTS:
                            location = response.headers.get("location")
                            if not location:
                                raise MediaFetchError(f"image URL {_short(url)} redirects without a Location")
                            url = urllib.parse.urljoin(url, location)
                            continue
                        if response.status_code != 200:
                            raise MediaFetchError(f"fetching image {_short(url)} returned HTTP "
                                                  f"{response.status_code}")
                        length = response.headers.get("content-length")
                        if length is not None and length.isdigit() and int(length) > self.max_image_bytes:
                            raise InvalidRequest(f"image at {_short(url)} is {int(length)} bytes; the limit is "
                                                 f"{self.max_image_bytes}")
                        data = bytearray()
                        async for chunk in response.aiter_bytes():
                            data += chunk
                            if len(data) > self.max_image_bytes:
                                raise InvalidRequest(f"image at {_short(url)} is larger than the limit of "
                                                     f"{self.max_image_bytes} bytes")
                        return bytes(data)
                except httpx.HTTPError as exc:
                    raise MediaFetchError(f"cannot fetch image {_short(url)}: {type(exc).__name__}: {exc}") from None
            raise MediaFetchError(f"image URL redirected more than {self.max_redirects} times")


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes to RGB, refusing more than ``max_pixels`` pixels (checked from the header,
    before decoding) and truncated or non-image data (ImageDecodeError, a 400)."""
    return open_image(data, max_pixels=max_pixels)


#: Frames kept from a video are scaled down to at most this many pixels (1920x1080) while decoding: the
#: server gives the model each frame as one tile (448x448), so more resolution would only cost memory.
VIDEO_FRAME_PIXELS = 1920 * 1080


def decode_video(data: bytes, *, num_segments: int, max_pixels: int, max_seconds: float,
                 max_decoded_bytes: int, rule: FrameRule | None = None) -> list[Image.Image]:
    """The ``num_segments`` RGB frames the official ``load_video`` samples from an encoded clip, within
    the server's limits: an accepted container format, at most ``max_pixels`` per frame, ``max_seconds``
    spanned by the decoded frames' timestamps, ``max_decoded_bytes`` of decoded frames (VideoDecodeError,
    a 400, as soon as one is broken); kept frames are scaled down to :data:`VIDEO_FRAME_PIXELS`. ``rule``: the
    checkpoint's frame choice (``InputProcessor.video_frame_rule``; default the official one)."""
    sampled = sample_frames(data, num_segments=num_segments, max_pixels=max_pixels, max_seconds=max_seconds,
                            max_decoded_bytes=max_decoded_bytes, max_kept_pixels=VIDEO_FRAME_PIXELS, rule=rule)
    return list(sampled.frames)
