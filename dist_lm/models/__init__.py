"""Recurrent language models: AWD-LSTM / QRNN / GRU stacks with tied, adaptive or MoS heads."""

from .lm import LMOutput, RNNLanguageModel, build_model, detach_hidden

__all__ = ["LMOutput", "RNNLanguageModel", "build_model", "detach_hidden"]
