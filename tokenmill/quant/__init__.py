"""Weight-only int8 / int4 quantization applied to a loaded model."""

from tokenmill.quant.rewrite import quantize_model

__all__ = ["quantize_model"]
