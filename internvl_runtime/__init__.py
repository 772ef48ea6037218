"""internvl-runtime: a fast, native PyTorch runtime for the InternVL2 series, without remote code.

The official quick start works with only its import line changed::

    from internvl_runtime import AutoModel, AutoTokenizer, load_image

and so do LMDeploy's InternVL2 snippets::

    from internvl_runtime import pipeline, TurbomindEngineConfig, GenerationConfig
    from internvl_runtime.vl import load_image
"""

from .api.auto import AutoModel, InternVLChatModel
from .api.lmdeploy_config import ChatTemplateConfig, PytorchEngineConfig, TurbomindEngineConfig, VisionConfig
from .api.pipeline import GenerationConfig, Pipeline, Response, Session, Video, pipeline
from .api.streamer import TextIteratorStreamer, TextStreamer
from .config import InternVLConfig
from .engine.async_engine import AsyncEngine
from .engine.engine import EngineConfig, LLMEngine, RequestOutput
from .engine.sampling_params import SamplingParams
from .errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigError,
    ContextLengthExceeded,
    EngineDead,
    EngineOverloaded,
    HostNotAllowed,
    ImageDecodeError,
    InternVLError,
    InvalidGenerationConfig,
    InvalidRequest,
    MediaFetchError,
    MediaNotAllowed,
    MethodNotAllowed,
    ModelLoading,
    ModelNotFound,
    PayloadTooLarge,
    PlaceholderMismatch,
    RequestFailed,
    RequestShapeError,
    RequestTimeout,
    RouteNotFound,
    TensorParallelError,
    TooManyRequests,
    Unauthorized,
    UnknownArchitectureError,
    UnsupportedFeature,
    UnsupportedMediaType,
    VideoDecodeError,
    WeightMismatchError,
)
from .hub import HubOptions
from .processing.grounding import Grounding, parse_grounding
from .processing.image import build_transform, dynamic_preprocess, load_image
from .processing.tokenization import AutoTokenizer, Tokenizer
from .processing.video import load_video
from .version import __version__

__all__ = [
    "AsyncEngine", "EngineConfig", "GenerationConfig", "LLMEngine", "Pipeline", "RequestOutput", "Response",
    "SamplingParams", "Session", "Video", "pipeline",
    "ChatTemplateConfig", "PytorchEngineConfig", "TurbomindEngineConfig", "VisionConfig",
    "AutoModel", "AutoTokenizer", "HubOptions", "InternVLChatModel", "InternVLConfig", "TextIteratorStreamer",
    "TextStreamer", "Tokenizer", "build_transform", "dynamic_preprocess", "load_image", "load_video",
    "Grounding", "parse_grounding",
    "CheckpointError", "CheckpointNotFound", "ConfigError", "ContextLengthExceeded", "EngineDead", "EngineOverloaded",
    "HostNotAllowed",
    "ImageDecodeError", "InternVLError", "InvalidGenerationConfig", "InvalidRequest", "MediaFetchError",
    "MediaNotAllowed", "MethodNotAllowed", "ModelLoading", "ModelNotFound", "PayloadTooLarge",
    "PlaceholderMismatch", "RequestFailed", "RequestShapeError", "RequestTimeout", "RouteNotFound",
    "TensorParallelError", "TooManyRequests", "Unauthorized", "UnknownArchitectureError", "UnsupportedFeature",
    "UnsupportedMediaType", "VideoDecodeError", "WeightMismatchError",
    "__version__",
]
