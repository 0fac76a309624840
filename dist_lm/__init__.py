"""dist-lm: regularized recurrent language models, from one GPU to many."""

__version__ = "0.1.0"
