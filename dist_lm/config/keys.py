"""One key as a user writes it: how a family of options names its keys in messages (Keys),
the option meant by a misspelt key (suggest, closest, the reference implementations' flag
names), a value converted to its field's type (coerce), and every run-config key with its
docstring (flat_keys)."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .sections import Config


def _resolve(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


# Flags of the reference implementations (salesforce/awd-lstm-lm, its QRNN and MoS forks)
# whose dist-lm key is not the closest spelling: --model.nhid is hidden_size, not head.
ALIASES = {"nhid": "hidden_size", "emsize": "emb_size", "nlayers": "n_layers",
           "batch_size": "global_batch", "wdecay": "weight_decay", "alpha": "ar", "beta": "tar",
           "optimizer": "name", "when": "milestones", "save": "run_dir", "model": "arch",
           "log_interval": "every_steps"}


@dataclass(frozen=True)
class Keys:
    """How a family of options is named in its messages: the noun and the key as the user
    writes it ('optim.lr' in a config file or --optim.lr; --cache.window on `dist-lm eval`'s
    command line; 'window' in api.evaluate's cache dict; 'trials' in a study's [study])."""
    noun: str
    flag: bool = False
    """Written as --key on a command line (else quoted: 'key')."""
    help: str = ""
    """Where every key is listed, named when a misspelt key is close to none of them."""

    def show(self, key: str) -> str:
        return f"--{key}" if self.flag else f"'{key}'"


CONFIG_KEYS = Keys("config key", help="`dist-lm train --help` lists every key.")
EVAL_KEYS = Keys("eval option", flag=True)
STUDY_KEYS = Keys("[study] key")
_WANTS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          dict: "a table", list: "a list"}


def suggest(name: str, options: list[str]) -> str | None:
    """The option meant by a misspelt dotted key (or bare field name): a known alias of its
    field, the key whose field is spelt the same (`lr` -> `optim.lr`), else the closest
    spelling of the field (in the section the user wrote, if it has one close enough, else in
    any section); None when nothing is close."""
    field_of = {o: o.rsplit(".", 1)[-1] for o in options}
    last = name.rsplit(".", 1)[-1].replace("-", "_")
    section = name.rsplit(".", 1)[0] if "." in name else ""
    for want in (ALIASES.get(last), last):
        same = [o for o, f in field_of.items() if f == want]
        if same:  # the section the user wrote first, when it has that field
            return next((o for o in same if o.startswith(section + ".")), same[0])
    # the field's spelling alone: a shared "model." would make any two model keys look alike
    ranked = sorted(options, key=lambda o: (not o.startswith(section + "."),
                                            -difflib.SequenceMatcher(None, last,
                                                                     field_of[o]).ratio()))
    best = ranked[0] if ranked else None
    if best and difflib.SequenceMatcher(None, last, field_of[best]).ratio() >= 0.6:
        return best
    return None


def closest(name: str, options: list[str], keys: Keys | None = None) -> str:
    """' Did you mean X?' for a misspelt key, else where the valid keys are listed."""
    keys = keys or CONFIG_KEYS
    match = suggest(name, options)
    if match:
        return f" Did you mean {keys.show(match)}?"
    if keys.help and len(options) > 12:
        return f" {keys.help}"
    return f" Valid keys: {', '.join(sorted(keys.show(o) for o in options))}."


def coerce(key: str, value: Any, hint: Any, keys: Keys | None = None) -> Any:
    """Convert `value` (from TOML, fire or a keyword argument) to the field's type, or raise
    UserError naming the key as `keys` writes it (config key 'train.bptt', --cache.window)."""
    keys = keys or CONFIG_KEYS
    what = f"{keys.noun} {keys.show(key)}"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # e.g. str | dict: the first type that fits
        for arm in typing.get_args(hint):
            try:
                return coerce(key, value, arm, keys)
            except UserError:
                pass
        wants = " or ".join(_WANTS.get(a, str(a)) for a in typing.get_args(hint))
        raise UserError(f"{what} expects {wants}, got {value!r}.")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise UserError(f"{what} expects a table, got {value!r}.")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise UserError(f"{what}: cannot parse {value!r} as a list; "
                                    f"write it like [1, 2, 3].") from None
            else:
                value = [v for v in text.split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"{what} expects a list, got {value!r}; "
                            f"write it like [1, 2, 3].")
        return [coerce(key, v, item, keys) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise UserError(f"{what} expects true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, bool):
            raise UserError(f"{what} expects an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"{what} expects an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, bool):
            raise UserError(f"{what} expects a number, got {value!r}.")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):  # NaN passes every > and < test
            raise UserError(f"{what} expects a finite number, got {value!r}.")
        if number is not None:
            return number
        raise UserError(f"{what} expects a number, got {value!r}.")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{what} expects a string, got {value!r}.")
    raise TypeError(f"unsupported option type {hint!r} for {key}")  # a bug in this file


def flat_keys() -> dict[str, str]:
    """All dotted keys with their docstrings (used for help text and error suggestions)."""
    docs = field_docs()
    out = {}
    for sec in dataclasses.fields(Config):
        cls = _resolve(Config, sec.name)
        for f in dataclasses.fields(cls):
            out[f"{sec.name}.{f.name}"] = docs.get((cls.__name__, f.name), "")
    return out


def field_docs() -> dict[tuple[str, str], str]:
    """Read the string literal under each dataclass field from the source of the modules that
    define option dataclasses (sections.py, options.py)."""
    here = Path(__file__).parent
    body = [node for name in ("sections.py", "options.py")
            for node in ast.parse((here / name).read_text()).body]
    docs: dict[tuple[str, str], str] = {}
    for node in body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for a, b in zip(body, body[1:]):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                        and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                        and isinstance(b.value.value, str)):
                    docs[(node.name, a.target.id)] = " ".join(b.value.value.split())
    return docs
