"""Weight-only int8 / int4 quantization of the LLM's linear layers, on CPU and CUDA.

``AutoModel.from_pretrained(path, load_in_8bit=True)`` / ``load_in_4bit=True`` / ``quantization=...``
quantize each layer on its device as soon as the loader has its weights (``LayerQuantizer``; a loaded
model: ``quantize_model``); see ``linear.py`` for the formats and kernels and ``apply.py`` for what is
quantized. ``packed_bf16.py``: bf16 weights kept losslessly in ~12 bits (``pack_bf16=True``; not a
quantization: every value kept), for batch-1 decode on the CPU.
"""

from .apply import LayerQuantizer, model_bytes, quantize_model
from .config import QuantizationConfig, resolve_quantization
from .experts import QuantizedExperts
from .linear import Int4Linear, Int8Linear, int4_backend, int8_backend
from .packed_bf16 import LayerPacker, PackedBf16Linear

__all__ = ["Int4Linear", "Int8Linear", "LayerPacker", "LayerQuantizer", "PackedBf16Linear", "QuantizationConfig",
           "QuantizedExperts",
           "int4_backend", "int8_backend",
           "model_bytes", "quantize_model", "resolve_quantization"]
