"""Checkpoint files: written whole or not at all, read without running pickled code, and
weights loaded into a module with one clear error when they do not fit.

Everything dist-lm writes into a step directory is torch.save of plain tensors and containers;
everything it reads back goes through torch.load(weights_only=True) (load_tensor_file).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .layout import weights_file



class _Writer:
    """A file for torch.save that keeps the OSError of a failed write: torch reports a full
    disk or a size limit only as an opaque RuntimeError ('unexpected pos ...')."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        self.f.flush()


def save_file(obj, path: Path) -> None:
    """torch.save under a temporary name, then rename: a file is either whole or absent. A
    failed write is the OSError that caused it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            w = _Writer(f)
            try:
                torch.save(obj, w)
            except RuntimeError:
                if w.error is not None:
                    raise w.error from None
                raise
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise



def load_tensor_file(path: Path) -> Any:
    """torch.load with weights_only=True: loading a checkpoint never runs pickled code.

    A file holding any other pickled object is refused with dist-lm's own message (never
    torch's, which suggests turning the check off); an unreadable file is reported as damaged."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing; the checkpoint is damaged, "
                        f"use another step.") from None
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("Weights only load failed"):
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f" (it names {found.group(1)})" if found else ""
            raise UserError(
                f"refused to load checkpoint file {path}: it holds pickled objects that are not "
                f"plain tensors and containers{what}, and loading them could run code. dist-lm "
                f"never loads such files; use another checkpoint, or re-create this one by "
                f"training.") from None
        failure = exc
    except Exception as exc:  # corrupt zip, truncated or foreign file, ...
        failure = exc
    text = str(failure).strip()
    first = text.splitlines()[0].split(". ")[0][:160] if text else ""  # torch's are paragraphs
    reason = f"{type(failure).__name__}: {first}" if first else type(failure).__name__
    raise UserError(f"cannot read checkpoint file {path}: it is damaged or not a torch "
                    f"checkpoint ({reason}); use another step.")


def state_dict_mismatch(exc: RuntimeError) -> str:
    """The first specific line of torch's load_state_dict error (its first line is only
    'Error(s) in loading state_dict for ...'): a size mismatch or a missing key."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:240]



def load_weights(module: torch.nn.Module, step_dir: Path, averaged: bool = True) -> None:
    """Load a checkpoint's weights (layout.weights_file: averaged.pt if present and `averaged`,
    else model.pt) into module; a config mismatch is a UserError (resume and finetune)."""
    try:
        module.load_state_dict(load_tensor_file(weights_file(step_dir, averaged)))
    except RuntimeError as exc:
        raise UserError(f"checkpoint {step_dir} does not fit this model config: "
                        f"{state_dict_mismatch(exc)}; use the model flags of the run that wrote "
                        f"it.") from None


@contextlib.contextmanager
def weights_of(module: torch.nn.Module, step_dir: Path):
    """The module with a checkpoint's weights (averaged where saved), restored after."""
    live = {k: v.detach().clone() for k, v in module.state_dict().items()}
    load_weights(module, step_dir)
    try:
        yield module
    finally:
        module.load_state_dict(live)
