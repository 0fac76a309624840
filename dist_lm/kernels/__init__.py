"""Custom ops for the recurrent layers: ForgetMult (QRNN) with CPU and Triton kernels."""

from .forget_mult import forget_mult, forget_mult_reference

__all__ = ["forget_mult", "forget_mult_reference"]
