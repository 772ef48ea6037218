"""Weight-only int8 / int4 quantization of the LLM's linear layers, on CPU and CUDA.

``AutoModel.from_pretrained(path, load_in_8bit=True)`` / ``load_in_4bit=True`` / ``quantization=...``
load the model in its 16/32-bit dtype and then call ``quantize_model``; see ``linear.py`` for the
formats and kernels and ``apply.py`` for what is quantized.
"""

from .apply import model_bytes, quantize_model
from .config import QuantizationConfig, resolve_quantization
from .linear import Int4Linear, Int8Linear, int4_backend, int8_backend

__all__ = ["Int4Linear", "Int8Linear", "QuantizationConfig", "int4_backend", "int8_backend", "model_bytes",
           "quantize_model", "resolve_quantization"]
