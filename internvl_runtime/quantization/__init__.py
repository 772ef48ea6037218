"""Weight-only int8 / int4 quantization of the LLM's linear layers, on CPU and CUDA.

``AutoModel.from_pretrained(path, load_in_8bit=True)`` / ``load_in_4bit=True`` / ``quantization=...``
quantize each layer on its device as soon as the loader has its weights (``LayerQuantizer``; a loaded
model: ``quantize_model``); see ``linear.py`` for the formats and kernels and ``apply.py`` for what is
quantized.
"""

from .apply import LayerQuantizer, model_bytes, quantize_model
from .config import QuantizationConfig, resolve_quantization
from .experts import QuantizedExperts
from .linear import Int4Linear, Int8Linear, int4_backend, int8_backend

__all__ = ["Int4Linear", "Int8Linear", "LayerQuantizer", "QuantizationConfig", "QuantizedExperts",
           "int4_backend", "int8_backend",
           "model_bytes", "quantize_model", "resolve_quantization"]
