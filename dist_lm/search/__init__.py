"""Architecture search for the recurrent cell (ENAS, Pham et al. 2018): `dist-lm search`.

controller.py: the LSTM controller (sample, score); supernet.py: the shared-weight model;
loop.py: shared-weight and controller training, checkpoints, derive (docs/search.md).
"""

from .controller import Controller
from .loop import Search, search_command
from .supernet import build_supernet, set_cell

__all__ = ["Controller", "Search", "build_supernet", "search_command", "set_cell"]
