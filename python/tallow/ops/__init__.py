"""tallow's ops: each declared once, with a pure-torch reference ``<op>_ref``
and backends chosen by device (``TALLOW_BACKEND`` overrides)."""

from .attention import attention, attention_ref
from .int8_conv2d import QuantizedConv2d, int8_conv2d_ref
from .int8_matmul import QuantizedLinear, int8_linear_ref, int8_matmul, int8_matmul_ref, quantize_rows_ref
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess, preprocess_ref, preprocess_tensors

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "QuantizedConv2d",
    "QuantizedLinear",
    "attention",
    "attention_ref",
    "int8_conv2d_ref",
    "int8_linear_ref",
    "int8_matmul",
    "int8_matmul_ref",
    "preprocess",
    "preprocess_ref",
    "preprocess_tensors",
    "quantize_rows_ref",
]
