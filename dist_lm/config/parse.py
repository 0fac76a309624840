"""Reading options: a TOML file and dotted command-line overrides into a Config (precedence:
command line > file > defaults), an option dataclass from a table (read_options), one key set
(set_key), the large-batch keys made explicit, and a Config to and from JSON (a run's
config.json).

    cfg = load_config("configs/ptb_awd_lstm.toml", {"optim.lr": 30, "model.arch": "qrnn"})
    save_config(cfg, run_dir / "config.json")
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import write_text_atomic
from .checks import validate
from .keys import Keys, closest, coerce, flat_keys
from .sections import CHOICES, Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted run-config key, its value coerced to the field's type and checked against
    the key's choices; an unknown section or key names the closest valid one."""
    parts = key.split(".")
    sections = [f.name for f in dataclasses.fields(Config)]
    if len(parts) != 2:
        all_keys = list(flat_keys())
        raise UserError(f"config key '{key}' must look like section.field "
                        f"(e.g. optim.lr).{closest(key, all_keys)}")
    section, name = parts
    if section not in sections:
        raise UserError(f"unknown config section '{section}' in '{key}'."
                        f"{closest(section, sections)}")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise UserError(f"unknown config key '{key}'.{closest(key, list(flat_keys()))}")
    coerced = coerce(key, value, hints[name])
    choices = CHOICES.get(key)
    if choices and coerced not in choices:
        raise UserError(f"config key '{key}' must be one of {', '.join(choices)}; got {coerced!r}.")
    setattr(obj, name, coerced)


def _section_type(hint: Any) -> type | None:
    """The dataclass a field's type names (also `X | None`: a section off until set)."""
    return next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)),
                None)


def option_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the option dataclass `cls` with its type (a field that is itself a
    dataclass is a section of keys, as the run config's are)."""
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        section = _section_type(hint)
        if section is not None:
            out.update(option_types(section, f"{prefix}{name}."))
        else:
            out[prefix + name] = hint
    return out


def read_options(cls: type, table: dict[str, Any], keys: Keys, obj: Any = None) -> Any:
    """`table` (nested or dotted keys: a TOML table, fire's options, keyword arguments) as an
    instance of the option dataclass `cls` (or set on `obj`): every key checked against its
    fields, the closest valid key named for a misspelt one, every value coerced to its
    field's type, then `validate`d. Naming a key of an optional section turns it on."""
    hints = option_types(cls)
    obj = cls() if obj is None else obj
    for key, value in _leaves(table, hints).items():
        if key not in hints:
            raise UserError(f"unknown {keys.noun} {keys.show(key)}."
                            f"{closest(key, list(hints), keys)}")
        *path, name = key.split(".")
        target = obj
        for part in path:
            if getattr(target, part) is None:
                hint = typing.get_type_hints(type(target))[part]
                setattr(target, part, _section_type(hint)())
            target = getattr(target, part)
        setattr(target, name, coerce(key, value, hints[key], keys))
    validate(obj)
    return obj


def _leaves(table: dict, hints: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`flatten`, but a table given to a field that takes one (a study's budget) stays whole."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = prefix + str(k).replace("-", "_")
        if isinstance(v, dict) and key not in hints:
            out.update(_leaves(v, hints, key + "."))
        else:
            out[key] = v
    return out


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """A nested table ({"optim": {"lr": 30}}) as dotted keys ({"optim.lr": 30})."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then dotted `overrides` (e.g. {'optim.lr': 30})."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if p.is_dir():
            tomls = sorted(p.glob("*.toml"))[:3]
            example = ", ".join(str(t) for t in tomls) or "configs/cpu_smoke.toml"
            raise UserError(f"config file {p} is a directory; pass a TOML file such as "
                            f"{example}.")
        if not p.is_file():
            hint = ""
            if not p.suffix:
                cand = Path("configs") / f"{p.name}.toml"
                if cand.is_file():
                    hint = f" Did you mean {cand}?"
            raise UserError(f"config file {p} does not exist.{hint} "
                            f"Pass a TOML file such as configs/cpu_smoke.toml.")
        try:
            table = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {p} is not valid TOML: {exc}. Fix the file.") from None
        for key, value in flatten(table).items():
            set_key(cfg, key, value)
    # key -> 1 file, 2 CLI. A file's key counts only where it differs from the default: a
    # config written out whole (a search's cell.toml, a run's config) holds every key, and
    # its default warm-up keys say nothing about which one the user meant.
    defaults = flatten(to_dict(Config()))
    given = {k: 1 for k, v in flatten(table).items()
             if k not in defaults or defaults[k] != v} if path is not None else {}
    file_batch = cfg.train.global_batch  # the recipe's, before command-line overrides
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_") if "." in key else key
        set_key(cfg, key, value)
        given[key] = 2
    validate(cfg)
    _resolve_scaling_keys(cfg, file_batch, given)
    return cfg


def _resolve_scaling_keys(cfg: Config, file_batch: int, given: dict[str, int]) -> None:
    """Make the large-batch keys explicit (config.json then records what the run used) and
    refuse the combinations that contradict each other. schedule.base_batch 0 becomes the
    config file's train.global_batch (the recipe's: a user moving it from 1 GPU to 8 raises
    train.global_batch and expects the lr to scale from the recipe). schedule.scaling unset
    keeps the old meaning: linear when schedule.base_batch was set (with warm-up only when
    schedule.warmup_steps gives it), else none. `given`: where each key was set (1 the file,
    2 the command line); the command line wins over the file, a contradiction within one of
    them is refused."""
    s = cfg.schedule
    fixed = given.get("schedule.warmup_steps", 0)
    derive = given.get("schedule.warmup_base_steps", 0)
    if fixed and fixed == derive and s.warmup_steps >= 0:
        raise UserError("schedule.warmup_steps and schedule.warmup_base_steps are both set: "
                        "warmup_steps fixes the warm-up, warmup_base_steps derives it from the "
                        "batch ratio; drop one of them.")
    if derive > fixed:  # e.g. the file fixes the warm-up, the command line asks to derive it
        s.warmup_steps = -1
    if not s.scaling:
        if s.base_batch > 0:
            s.scaling = "linear"
            if s.warmup_steps < 0 and not derive:
                s.warmup_steps = 0  # exactly what base_batch alone did before
        else:
            s.scaling = "none"
    if s.scaling == "none" and derive and derive >= given.get("schedule.scaling", 0):
        raise UserError("schedule.warmup_base_steps derives the warm-up of a raised lr, and "
                        "schedule.scaling is none, which raises nothing; set "
                        "--schedule.scaling=linear or sqrt, or give a plain warm-up with "
                        "--schedule.warmup_steps=N.")
    if s.base_batch == 0:
        s.base_batch = file_batch

def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


RESOLVED = "resolved"  # config.json's block of values the trainer derived (lr rule, micro batch)


def from_dict(table: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's config.json)."""
    cfg = Config()
    for key, value in flatten(table).items():
        if key.split(".")[0] == RESOLVED:
            continue  # what the trainer derived (not config keys): see train.rundir.write_resolved
        set_key(cfg, key, value)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON (temporary name, then rename)."""
    write_text_atomic(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def help_text() -> str:
    """Every config key with its default and docstring, for --help."""
    defaults = flatten(to_dict(Config()))
    lines = []
    for key, doc in flat_keys().items():
        lines.append(f"  --{key}={defaults[key]!r}\n      {doc}")
    return "\n".join(lines)


def check_main(argv: list[str]) -> None:
    """`python -c 'from dist_lm.config import check_main; ...' CONFIG [--overrides]`: load the
    config as `dist-lm train CONFIG [--overrides]` would (fire parses the same signature) and
    exit 2 with the one-line error if it is refused. launch/torchrun.sh runs it once before
    torchrun, whose elastic restarts would otherwise repeat a permanent error on every rank."""
    import fire

    def train(config: str, resume: str | None = None, overwrite: bool = False,
              **overrides) -> None:
        load_config(config, overrides)

    try:
        fire.Fire(train, command=argv, name="dist-lm train")
    except UserError as exc:
        print(f"dist-lm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
