"""One exception tree for the whole runtime.

Every error a user, a checkpoint folder or an HTTP request can trigger is one of these. The server maps
them to HTTP status codes in one place (``http_status``)::

    InternVLError
    ├── ConfigError                 config.json missing, malformed or with an unknown value        (500)
    │   └── UnknownArchitectureError  llm_config.architectures[0] is not in the registry
    ├── CheckpointError             folder lacks weights/tokenizer, or tensors do not match         (500)
    │   └── WeightMismatchError       missing / unexpected / misshaped tensors, named
    ├── InvalidRequest (ValueError) bad input from the caller                                      (400)
    │   ├── ImageDecodeError          an image that cannot be read or is too large
    │   ├── VideoDecodeError          a video that cannot be read, or a bad frame selection
    │   ├── PlaceholderMismatch       <image> placeholders and images / tiles disagree
    │   ├── ContextLengthExceeded     the prompt (plus max_new_tokens) exceeds the context
    │   └── InvalidGenerationConfig   unknown key or out-of-range sampling value
    ├── ModelNotFound               the request names a model that is not served                   (404)
    ├── EngineOverloaded            the queue is full                                              (503)
    ├── EngineDead                  the engine loop stopped; the process exits for a restart       (503)
    ├── RequestFailed               one request failed inside the engine (the others go on)        (500)
    └── UnsupportedFeature (NotImplementedError)  asked for something this build cannot do         (400)
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


class ModelNotFound(InternVLError):
    """A request names a model that this server does not serve."""


class EngineOverloaded(InternVLError):
    """The engine's queue is full; retry later."""


class EngineDead(InternVLError):
    """The engine loop stopped (its cause is in the message); the server exits so that a supervisor restarts it."""


class RequestFailed(InternVLError):
    """One request failed inside the engine (an image that would not encode, a step that raised for it);
    the request ends with this error and the rest of the batch goes on."""


class UnsupportedFeature(InternVLError, NotImplementedError):
    """The caller asked for something this build cannot do (yet); never silently ignored."""


_STATUS = (
    (ModelNotFound, 404),
    (EngineOverloaded, 503),
    (EngineDead, 503),
    (InvalidRequest, 400),
    (UnsupportedFeature, 400),
    (InternVLError, 500),
)


def http_status(error: BaseException) -> int:
    """The HTTP status code an error maps to (500 for anything not in the tree)."""
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500
