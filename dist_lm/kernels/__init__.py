"""Custom ops for the recurrent layers: ForgetMult (QRNN) with CPU and Triton kernels, and the
fused QRNN step (gates + zoneout + forget-mult + output gate): a C kernel on CPU, Triton on CUDA."""

from .forget_mult import forget_mult, forget_mult_reference
from .qrnn_fused import qrnn_fused, qrnn_fused_reference

__all__ = ["forget_mult", "forget_mult_reference", "qrnn_fused", "qrnn_fused_reference"]
