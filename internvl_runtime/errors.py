"""One exception tree for the whole runtime.

Every error a user, a checkpoint folder, an HTTP request or a tensor-parallel group can trigger is one of
these, and ``http_status`` maps them to HTTP status codes in one place (the most specific class listed in
``_STATUS`` wins; a class without a status of its own has its parent's)::

    InternVLError                                                                                   (500)
    ├── ConfigError                 config.json missing, malformed or with an unknown value
    │   ├── UnknownArchitectureError  llm_config.architectures[0] is not in the registry
    │   └── CheckpointNotFound        neither a folder nor a hub id we could fetch (also a CheckpointError)
    ├── CheckpointError             folder lacks weights/tokenizer, or tensors do not match
    │   └── WeightMismatchError       missing / unexpected / misshaped tensors, named
    ├── InvalidRequest (ValueError) bad input from the caller                                      (400)
    │   ├── ImageDecodeError          an image that cannot be read or is too large
    │   ├── VideoDecodeError          a video that cannot be read, or a bad frame selection
    │   ├── PlaceholderMismatch       <image> placeholders and images / tiles disagree
    │   ├── ContextLengthExceeded     the prompt (plus max_new_tokens) exceeds the context
    │   ├── InvalidGenerationConfig   unknown key or out-of-range sampling value
    │   ├── RequestShapeError         the web framework's own request validation failed
    │   ├── MediaNotAllowed           a media URL or path the server refuses to read
    │   ├── MediaFetchError           a media URL that could not be fetched
    │   ├── HostNotAllowed            a Host header naming the server by a name it does not answer to
    │   ├── RequestTimeout            the request head or body did not arrive in time               (408)
    │   ├── PayloadTooLarge           the request body is over the size limit                       (413)
    │   └── UnsupportedMediaType      a request body that is not JSON                               (415)
    ├── Unauthorized                no API key, or the wrong one                                   (401)
    ├── RouteNotFound               no such path                                                   (404)
    │   └── MethodNotAllowed          the path exists, the method does not                          (405)
    ├── ModelNotFound               the request names a model that is not served                   (404)
    ├── EngineOverloaded            the engine's queue is full                                     (503)
    │   ├── TooManyRequests           the HTTP layer already handles its limit of requests          (429)
    │   └── ModelLoading              the weights are still loading, or failed to                   (503)
    ├── EngineDead                  the engine loop stopped; the process exits for a restart       (503)
    ├── RequestFailed               one request failed inside the engine (the others go on)
    ├── TensorParallelError         a rank of the tensor-parallel group died or stopped answering
    └── UnsupportedFeature (NotImplementedError)  asked for something this build cannot do         (400)

The OpenAI error ``type``/``code`` strings of the server's answers are protocol, not status: they live in
``serving.protocol``. Two exceptions stay outside the tree on purpose, as internal control flow that never
reaches a user as such: ``cli.CLIError`` (a message the CLI prints before exiting 1) and
``kernels.build.BuildLockTimeout`` (caught; the kernels fall back to torch with a warning).
"""

from __future__ import annotations


class InternVLError(Exception):
    """Base class of every error raised by internvl_runtime."""


class ConfigError(InternVLError):
    """The checkpoint's config.json is missing, malformed, or holds a value we cannot honour."""


class UnknownArchitectureError(ConfigError):
    """``llm_config.architectures[0]`` (or the vision architecture) is not in the model registry."""


class CheckpointError(InternVLError):
    """The checkpoint folder is incomplete: no weights, no tokenizer, a broken index."""


class CheckpointNotFound(ConfigError, CheckpointError):
    """The checkpoint reference is neither an existing folder nor a Hugging Face Hub id that could be fetched:
    no such folder, an unknown repository or revision, a gated repository without access, or offline
    (``HF_HUB_OFFLINE``, ``local_files_only``, no network) with no copy in the cache.

    Both a ``ConfigError`` (what a missing folder raised when loading the model) and a ``CheckpointError``
    (what it raised when loading the tokenizer), so that callers catching either still catch it."""


class WeightMismatchError(CheckpointError):
    """Checkpoint tensors do not match the model: missing, unexpected or misshaped keys (all named)."""


class InvalidRequest(InternVLError, ValueError):
    """Bad input from the caller: a prompt, a generation option, a file."""


class ImageDecodeError(InvalidRequest):
    """An image could not be opened or decoded, or breaks a size limit."""


class VideoDecodeError(InvalidRequest):
    """A video could not be opened or decoded, or the requested frame range is impossible."""


class PlaceholderMismatch(InvalidRequest):
    """The number of ``<image>`` placeholders, images and tiles do not agree."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt, with the tokens asked for, does not fit in the model's context."""


class InvalidGenerationConfig(InvalidRequest):
    """An unknown generation key, or a sampling value out of range."""


# -- the HTTP layer's refusals (raised in ``serving``) ------------------------------------------------


class RequestShapeError(InvalidRequest):
    """The web framework's own validation of a request (path or query parameters) failed."""


class MediaNotAllowed(InvalidRequest):
    """A media URL or path the server refuses to read (a private address, outside the allowed folder...)."""


class MediaFetchError(InvalidRequest):
    """A media URL could not be fetched (network error, HTTP error, too large, too slow)."""


class HostNotAllowed(InvalidRequest):
    """The Host header names this server by a name it was not told to answer to (DNS-rebinding guard)."""


class RequestTimeout(InvalidRequest):
    """The request head did not arrive within ``header_timeout_s``, or its body within ``body_timeout_s``."""


class PayloadTooLarge(InvalidRequest):
    """The request body is larger than ``max_body_bytes``."""


class UnsupportedMediaType(InvalidRequest):
    """A request body sent as anything but ``application/json``."""


class Unauthorized(InternVLError):
    """The request has no API key, or the wrong one."""


class RouteNotFound(InternVLError):
    """No route has this path."""


class MethodNotAllowed(RouteNotFound):
    """The path exists, but not with this HTTP method."""


class ModelNotFound(InternVLError):
    """A request names a model that this server does not serve."""


class EngineOverloaded(InternVLError):
    """The engine's queue is full; retry later."""


class TooManyRequests(EngineOverloaded):
    """The HTTP layer already handles ``max_concurrent_requests`` generation requests; retry later."""


class ModelLoading(EngineOverloaded):
    """The weights are still loading (or failed to load): nothing can be generated yet."""


class EngineDead(InternVLError):
    """The engine loop stopped (its cause is in the message); the server exits so that a supervisor restarts it."""


class RequestFailed(InternVLError):
    """One request failed inside the engine (an image that would not encode, a step that raised for it);
    the request ends with this error and the rest of the batch goes on."""


class TensorParallelError(InternVLError):
    """A rank of the tensor-parallel group died or stopped answering; the whole group must stop."""


class UnsupportedFeature(InternVLError, NotImplementedError):
    """The caller asked for something this build cannot do (yet); never silently ignored."""


#: The one HTTP mapping. Looked up along the error's MRO, so the most specific listed class wins.
_STATUS: dict[type[BaseException], int] = {
    InternVLError: 500,
    InvalidRequest: 400,
    RequestTimeout: 408,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    Unauthorized: 401,
    RouteNotFound: 404,
    MethodNotAllowed: 405,
    ModelNotFound: 404,
    EngineOverloaded: 503,
    TooManyRequests: 429,
    EngineDead: 503,
    UnsupportedFeature: 400,
}


def http_status(error: BaseException) -> int:
    """The HTTP status code an error maps to (500 for anything not in the tree)."""
    for cls in type(error).__mro__:
        status = _STATUS.get(cls)
        if status is not None:
            return status
    return 500
