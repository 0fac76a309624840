"""A study file: the [study] table, fixed overrides, the search space and enqueued points.

    [study]
    name = "ptb-lr"
    base = "configs/ptb_small_cpu.toml"       # any recipe; trials override its keys
    objective = "valid_ppl"                    # valid_ppl | valid_bpc | valid_loss | valid
    trials = 20
    budget = { steps = 2000 }                  # or { epochs = 2 } or { seconds = 900 }
    eval_every_steps = 250                     # intermediate values for the pruner

    [fixed]
    "train.device" = "cpu"

    [space."optim.lr"]
    type = "loguniform"                        # uniform | loguniform | int | categorical
    low = 1
    high = 50

    [space."model.qrnn_window"]
    type = "categorical"
    choices = [1, 2]
    when = { "model.arch" = "qrnn" }           # sampled only in trials where this holds

    [[enqueue]]                                # points tried first (e.g. the paper's values)
    "optim.lr" = 30

A key may also be an array of tables, [[space."optim.lr"]], one per variant: each with its own
distribution and its own `when`. The variants' conditions must exclude each other; the one
that holds in a trial is sampled, under its own Optuna name (`optim.lr[optim.name=adam]`).

Everything is checked against the config's keys and field types before a trial starts; a
mistake is one UserError naming the key and, for a misspelt one, the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (BUDGETS, STUDY_KEYS, Config, StudyConfig, flat_keys, flatten, load_config,
                      option_types, read_options, set_key, suggest, to_dict, tomllib)
from ..errors import UserError

PARAM_TYPES = ("uniform", "loguniform", "int", "categorical")
PARAM_FIELDS = {"type", "low", "high", "step", "log", "choices", "when"}
# the sweep sets these for every trial; a space or [fixed] may not
MANAGED = ("train.run_dir", "log.group", "log.name", *BUDGETS.values())


def closest(name: str, options) -> str:
    """' Did you mean X?' for a misspelt name (dist_lm.config's suggestion, for sweep names)."""
    match = suggest(name, list(options))
    return f" Did you mean '{match}'?" if match else ""


def field_type(key: str) -> Any:
    """The Config field type of a dotted key (which must exist)."""
    return option_types(Config)[key]


def check_key(key: str, where: str) -> None:
    keys = flat_keys()
    if key not in keys:
        raise UserError(f"{where}: unknown config key '{key}'.{closest(key, keys)}")


def check_value(key: str, value: Any, where: str) -> Any:
    """The value as the config would hold it (type and choice checks from dist_lm.config)."""
    cfg = Config()
    try:
        set_key(cfg, key, value)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@dataclass
class Param:
    """One dimension of the search space (an Optuna distribution plus a condition)."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: list = field(default_factory=list)
    when: dict[str, list] = field(default_factory=dict)
    name: str = ""  # the Optuna parameter name: the key, or key[cond] for one of its variants

    def __post_init__(self):
        self.name = self.name or self.key

    def active(self, point: dict[str, Any], base: dict[str, Any]) -> bool:
        """Whether this key is sampled, given the keys sampled so far and the base config."""
        for key, allowed in self.when.items():
            if point.get(key, base.get(key)) not in allowed:
                return False
        return True

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            if any(isinstance(c, list) for c in self.choices):
                # Optuna's choices are None/bool/int/float/str: lists travel as JSON text
                return json.loads(trial.suggest_categorical(
                    self.name, [json.dumps(c) for c in self.choices]))
            return trial.suggest_categorical(self.name, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1,
                                     log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step,
                                   log=self.type == "loguniform")

    def json_choices(self) -> bool:
        """List choices travel through Optuna as their JSON text."""
        return self.type == "categorical" and any(isinstance(c, list) for c in self.choices)

    def describe(self) -> str:
        if self.type == "categorical":
            text = f"categorical {self.choices}"
        else:
            text = f"{self.type} [{self.low}, {self.high}]" + (f" step {self.step}" if self.step
                                                                 else "")
        if self.when:
            text += " when " + ", ".join(f"{k} in {v}" for k, v in self.when.items())
        return text


@dataclass
class Spec:
    """A parsed, validated study file."""

    path: Path
    name: str
    base: Path
    objective: str = "valid"
    trials: int = 20
    budget: dict[str, float] = field(default_factory=dict)
    eval_every_steps: int = 0
    sampler: dict[str, Any] = field(default_factory=lambda: {"kind": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"kind": "median"})
    storage: str = ""
    workers: int = 1
    launcher: str = ""
    retries: int = 2
    heartbeat: int = 60
    fixed: dict[str, Any] = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    base_table: dict[str, Any] = field(default_factory=dict)  # the recipe file's own keys
    base_values: dict[str, Any] = field(default_factory=dict)  # every key: recipe + fixed

    def budget_overrides(self) -> dict[str, Any]:
        """--train.max_steps / --train.epochs / --train.max_seconds for every trial."""
        (kind, amount), = self.budget.items()
        out: dict[str, Any] = {BUDGETS[kind]: amount}
        if kind != "steps":
            out["train.max_steps"] = 0  # max_steps > 0 would win over epochs in the trainer
        if self.eval_every_steps:
            out["train.eval_every_steps"] = self.eval_every_steps
        return out

    def budget_text(self) -> str:
        (kind, amount), = self.budget.items()
        return f"{amount:g} {kind}" if isinstance(amount, float) else f"{amount} {kind}"

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's point: every active key of the space, in file order."""
        point: dict[str, Any] = {}
        for p in self.params:
            if p.active(point, self.base_values):
                point[p.key] = p.suggest(trial)
        return point

    def keys(self) -> list[str]:
        """The swept config keys in file order, each once (a key's variants share it)."""
        return list(dict.fromkeys(p.key for p in self.params))

    def variants(self, key: str) -> list[Param]:
        return [p for p in self.params if p.key == key]

    def param_for(self, key: str, point: dict[str, Any]) -> Param:
        """The Param that samples `key` in a trial with this point: the key's one table, or
        the variant whose condition holds (UserError if none does)."""
        options = self.variants(key)
        if len(options) == 1:
            return options[0]
        for p in options:
            if p.active(point, self.base_values):
                return p
        raise UserError(f"{key}: none of its variants' conditions holds for the point {point}.")

    def optuna_params(self, point: dict[str, Any]) -> dict[str, Any]:
        """A point as Optuna stores it (variants under their own names, list choices as their
        JSON text), for enqueue_trial."""
        out = {}
        for k, v in point.items():
            p = self.param_for(k, point)
            out[p.name] = json.dumps(v) if p.json_choices() else v
        return out

    def point_of(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna's params of a trial as a point of config keys (the inverse of optuna_params;
        names that are not in this space are left out)."""
        by_name = {p.name: p for p in self.params}
        return {by_name[n].key: json.loads(v) if by_name[n].json_choices() else v
                for n, v in params.items() if n in by_name}

    def overrides(self, point: dict[str, Any]) -> dict[str, Any]:
        return {**self.fixed, **self.budget_overrides(), **point}

    def config_table(self, point: dict[str, Any]) -> dict[str, Any]:
        """The base recipe's keys with the fixed keys, the budget and the point applied."""
        return {**self.base_table, **self.overrides(point)}


def _number(value: Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise UserError(f"{what} must be finite, got {value!r}.")
    return value


def _param(key: str, table: Any, where: str) -> Param:
    if not isinstance(table, dict):
        raise UserError(f"{where}: write it as a table, e.g. [space.\"{key}\"] with "
                        f"type = \"loguniform\", low = 1, high = 50.")
    check_key(key, where)
    if key in MANAGED:
        raise UserError(f"{where}: {key} is set by the sweep for every trial; set the budget "
                        f"in [study] instead.")
    for name in table:
        if name not in PARAM_FIELDS:
            raise UserError(f"{where}: unknown field '{name}'.{closest(name, PARAM_FIELDS)} "
                            f"Fields: {', '.join(sorted(PARAM_FIELDS))}.")
    kind = table.get("type")
    if kind not in PARAM_TYPES:
        raise UserError(f"{where}: type must be one of {', '.join(PARAM_TYPES)}; got {kind!r}."
                        f"{closest(str(kind), PARAM_TYPES)}")
    hint = field_type(key)
    p = Param(key, kind, log=bool(table.get("log", False)))
    if kind == "categorical":
        choices = table.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: categorical needs a non-empty list, e.g. choices = [1, 2].")
        p.choices = [check_value(key, c, where) for c in choices]
        if len({json.dumps(c) for c in p.choices}) != len(p.choices):
            raise UserError(f"{where}: choices {choices} repeat a value.")
        for extra in ("low", "high", "step"):
            if extra in table:
                raise UserError(f"{where}: a categorical takes choices, not {extra}.")
    else:
        if "choices" in table:
            raise UserError(f"{where}: choices belong to type = \"categorical\"; {kind} takes "
                            f"low and high.")
        if kind in ("uniform", "loguniform") and hint is not float:
            name = getattr(hint, "__name__", str(hint))
            sugg = ' use type = "int"' if hint is int else ' use type = "categorical"'
            raise UserError(f"{where}: {key} holds {name} values, not floats;{sugg}.")
        if kind == "int" and hint not in (int, float):
            raise UserError(f"{where}: {key} holds {getattr(hint, '__name__', hint)} values; "
                            f"use type = \"categorical\".")
        for bound in ("low", "high"):
            if bound not in table:
                raise UserError(f"{where}: {kind} needs low and high.")
            value = _number(table[bound], f"{where}: {bound}")
            if kind == "int" and not float(value).is_integer():
                raise UserError(f"{where}: int bounds must be integers, got {bound} = {value}.")
            setattr(p, bound, int(value) if kind == "int" else float(value))
        if p.low >= p.high:
            raise UserError(f"{where}: empty range: low = {p.low} must be below high = {p.high}.")
        if (kind == "loguniform" or p.log) and p.low <= 0:
            raise UserError(f"{where}: a log scale needs low > 0, got low = {p.low}.")
        if "step" in table:
            step = _number(table["step"], f"{where}: step")
            if step <= 0 or (kind == "int" and not float(step).is_integer()):
                raise UserError(f"{where}: step must be a positive "
                                f"{'integer' if kind == 'int' else 'number'}, got {step}.")
            if kind == "loguniform" or p.log:
                raise UserError(f"{where}: step and a log scale do not go together.")
            p.step = int(step) if kind == "int" else float(step)
        for bound in (p.low, p.high):
            check_value(key, bound, where)
    when = table.get("when", {})
    if not isinstance(when, dict):
        raise UserError(f"{where}: when is a table, e.g. when = {{ \"model.arch\" = \"qrnn\" }}.")
    for ckey, allowed in flatten(when).items():
        check_key(ckey, f"{where}: when")
        if ckey == key:
            raise UserError(f"{where}: a key cannot be conditioned on itself.")
        is_list = typing.get_origin(field_type(ckey)) is list
        values = allowed if isinstance(allowed, list) and not is_list else [allowed]
        if not values:
            raise UserError(f"{where}: when {ckey} = [] is never true.")
        p.when[ckey] = [check_value(ckey, v, f"{where}: when") for v in values]
    return p


def _space_tables(table: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """[space."optim.lr"] and [space.optim.lr] both name the key optim.lr."""
    out = []
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "type" not in v and "." not in key:
            out.extend(_space_tables(v, key + "."))
        else:
            out.append((key, v))
    return out


def _kind_table(value: Any, what: str, default: str) -> dict[str, Any]:
    if value is None:
        return {"kind": default}
    if isinstance(value, str):
        return {"kind": value}
    if isinstance(value, dict) and isinstance(value.get("kind", default), str):
        return {"kind": default, **value}
    raise UserError(f"study.{what} must be a name or a table with kind = \"...\"; got {value!r}.")


def read_toml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid TOML: {exc}. Fix the file.") from None


def resolve_base(base: str, space_path: Path) -> Path:
    """A base recipe path as written (from the working directory), else from the study file's
    folder or one above it (configs/sweeps/x.toml names configs/ptb_small_cpu.toml)."""
    p = Path(base)
    if p.is_absolute() or p.is_file():
        return p.resolve()
    for folder in space_path.resolve().parents:
        if (folder / p).is_file():
            return (folder / p).resolve()
    return p


def load_spec(path: str | Path, base: str | None = None) -> Spec:
    """Parse and validate a study file; `base` replaces study.base (used by `sweep report`)."""
    path = Path(path)
    doc = read_toml(path, "study file")
    unknown = set(doc) - {"study", "fixed", "space", "enqueue"}
    for name in unknown:
        raise UserError(f"study file {path}: unknown table [{name}]."
                        f"{closest(name, ['study', 'fixed', 'space', 'enqueue'])}")
    st = doc.get("study")
    if not isinstance(st, dict):
        raise UserError(f"study file {path} has no [study] table (name, base, objective, "
                        f"trials, budget).")
    try:  # dist_lm.config's reading and checks: types, the closest key for a misspelt one
        study = read_options(StudyConfig, st, STUDY_KEYS)
    except UserError as exc:
        raise UserError(f"study file {path}: {exc}") from None
    spec = Spec(path=path, name=study.name, base=resolve_base(base or study.base, path))
    for key in ("objective", "trials", "budget", "eval_every_steps", "storage", "workers",
                "launcher", "retries", "heartbeat"):
        setattr(spec, key, getattr(study, key))
    spec.sampler = _kind_table(study.sampler, "sampler", "tpe")
    spec.pruner = _kind_table(study.pruner, "pruner", "median")

    fixed = doc.get("fixed", {})
    if not isinstance(fixed, dict):
        raise UserError("[fixed] must be a table of config keys, e.g. \"train.device\" = \"cpu\".")
    for key, value in flatten(fixed).items():
        check_key(key, "[fixed]")
        if key in MANAGED:
            raise UserError(f"[fixed]: {key} is set by the sweep for every trial"
                            f"{'; use study.budget' if key in BUDGETS.values() else ''}.")
        spec.fixed[key] = check_value(key, value, "[fixed]")

    space = doc.get("space", {})
    if not isinstance(space, dict) or not space:
        raise UserError(f"study file {path} has no [space.\"KEY\"] tables: nothing to search.")
    seen: set[str] = set()
    for key, table in _space_tables(space):
        if key in seen:
            raise UserError(f"[space.\"{key}\"]: {key} is in the space twice; for a range per "
                            f"condition give it as variants, [[space.\"{key}\"]] tables.")
        seen.add(key)
        if not isinstance(table, list):
            spec.params.append(_param(key, table, f"[space.\"{key}\"]"))
            continue
        if not table:
            raise UserError(f"[space.\"{key}\"] is an empty list: give it one [[space.\"{key}\"]] "
                            f"table per variant.")
        variants = [_param(key, t, f"[[space.\"{key}\"]] #{i + 1}") for i, t in enumerate(table)]
        if len(variants) > 1:
            _name_variants(key, variants)
        spec.params.extend(variants)
    _check_order(spec.params)
    for key in spec.fixed:
        if key in {p.key for p in spec.params}:
            raise UserError(f"{key} is both in [fixed] and in the space; keep one.")

    enqueue = doc.get("enqueue", [])
    if not isinstance(enqueue, list):
        raise UserError("enqueue points are written as [[enqueue]] tables.")
    swept = spec.keys()
    for i, point in enumerate(enqueue):
        where = f"[[enqueue]] #{i + 1}"
        point = flatten(point) if isinstance(point, dict) else {}
        if not point:
            raise UserError(f"{where} is empty: give it keys of the space, e.g. \"optim.lr\" = 30.")
        for key, value in point.items():
            if key not in swept:
                raise UserError(f"{where}: {key} is not in the space.{closest(key, swept)}")
            point[key] = check_value(key, value, where)
        spec.enqueue.append(point)

    spec.base_table = flatten(read_toml(spec.base, "base config"))
    cfg = load_config(spec.base, {**spec.fixed, **spec.budget_overrides()})  # base + fixed valid
    spec.base_values = flatten(to_dict(cfg))
    _check_conditions(spec)
    _check_exclusive(spec)
    for i, point in enumerate(spec.enqueue):  # the variant a point samples needs base_values
        _check_enqueued(spec, point, f"[[enqueue]] #{i + 1}")
    _check_ends(spec)
    return spec


def _when_text(when: dict[str, list]) -> str:
    """optim.name=adam, model.arch=lstm|gru: a condition as a readable parameter name part."""
    def one(v: Any) -> str:
        if isinstance(v, str) and v and not any(c in v for c in "[]=|, \"'"):
            return v
        if isinstance(v, (bool, int, float)):
            return _toml_value(v)
        return json.dumps(v, default=str)
    return ", ".join(f"{k}={'|'.join(one(v) for v in vs)}" for k, vs in when.items())


def _name_variants(key: str, variants: list[Param]) -> None:
    """Each variant its own Optuna name (TPE and the importance evaluators take one name for
    one distribution): key[its condition]."""
    for p in variants:
        p.name = f"{key}[{_when_text(p.when)}]"
    names = [p.name for p in variants]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UserError(f"[[space.\"{key}\"]] #{i + 1}: its condition is the same as variant "
                            f"#{names.index(name) + 1}'s; the variants' conditions must exclude "
                            f"each other.")


def _domain(spec: Spec, key: str) -> list | None:
    """Every value `key` can have in a trial, or None when that is not a short list: a key
    outside the space has its recipe value; a swept one its choices, and its recipe value
    where it may be absent."""
    variants = spec.variants(key)
    if not variants:
        return [spec.base_values.get(key)]
    if any(p.type != "categorical" for p in variants):
        return None
    values = [c for p in variants for c in p.choices]
    if any(p.when for p in variants):
        values.append(spec.base_values.get(key))
    return values


def _check_conditions(spec: Spec) -> None:
    """A condition no trial can meet: a key outside the space whose recipe (or [fixed]) value
    is not among the allowed ones, or a swept categorical key that never takes them (the
    parameter would never be sampled)."""
    for p in spec.params:
        for ckey, allowed in p.when.items():
            domain = _domain(spec, ckey)
            if domain is not None and not any(v in domain for v in allowed):
                where = ("its choices" if spec.variants(ckey) else
                         "it is not in the space, and the recipe with [fixed] sets it")
                values = sorted({repr(v) for v in domain})
                raise UserError(f"[space.\"{p.key}\"]: when {ckey} in {allowed} is never true: "
                                f"{where}: {', '.join(values)}; sweep {ckey} or change the "
                                f"condition.")


def _can_both_hold(spec: Spec, a: Param, b: Param) -> bool:
    """Whether the conditions of two variants may hold in one trial: yes unless some key that
    both name has no possible value that both allow. Keys are taken as independent, which
    errs on the side of yes."""
    for ckey in a.when.keys() & b.when.keys():
        both = [v for v in a.when[ckey] if v in b.when[ckey]]
        domain = _domain(spec, ckey)
        if not [v for v in both if domain is None or v in domain]:
            return False
    return True


def _check_exclusive(spec: Spec) -> None:
    """Two variants of one key must never hold in the same trial."""
    for key in spec.keys():
        variants = spec.variants(key)
        for i, a in enumerate(variants):
            for j, b in enumerate(variants[i + 1:], i + 1):
                if _can_both_hold(spec, a, b):
                    ca, cb = (_when_text(p.when) or "no when" for p in (a, b))
                    raise UserError(
                        f"[[space.\"{key}\"]]: variants #{i + 1} ({ca}) and #{j + 1} ({cb}) can "
                        f"hold in the same trial; give each a `when` on a common key with values "
                        f"the other's excludes, e.g. {{ \"optim.name\" = \"sgd\" }} and "
                        f"{{ \"optim.name\" = \"adam\" }}.")


def _check_enqueued(spec: Spec, point: dict[str, Any], where: str) -> None:
    """An enqueued value must fit the variant that samples it (a categorical's choices)."""
    for key, value in point.items():
        variants = spec.variants(key)
        if len(variants) > 1:
            swept = set(spec.keys())
            missing = sorted({c for p in variants for c in p.when if c in swept} - set(point))
            if missing:
                raise UserError(f"{where}: {key} has variants; give {', '.join(missing)} too, "
                                f"so that the point says which one samples it.")
            try:
                p = spec.param_for(key, point)
            except UserError:
                raise UserError(f"{where}: {key} = {value!r}: none of its variants' conditions "
                                f"holds for this point.") from None
        else:
            p = variants[0]
        if p.type == "categorical" and value not in p.choices:
            raise UserError(f"{where}: {key} = {value!r} is not one of the choices "
                            f"{p.choices}.")


def _check_ends(spec: Spec) -> None:
    """Each bound and choice must pass the config's own checks (model.dropout < 1, ...), with
    the key's conditions holding."""
    for p in spec.params:
        ends = p.choices if p.type == "categorical" else [p.low, p.high]
        cond = {k: v[0] for k, v in p.when.items()}
        for value in ends:
            try:
                load_config(spec.base, {**spec.overrides(cond), p.key: value})
            except UserError as exc:
                raise UserError(f"[space.\"{p.key}\"]: {p.key} = {value!r} is refused by the "
                                f"config: {exc}") from None


def _check_order(params: list[Param]) -> None:
    """A condition on a swept key must come after that key's table (sampled in file order)."""
    seen: set[str] = set()
    defined = {p.key for p in params}
    for p in params:
        for ckey in p.when:
            if ckey in defined and ckey not in seen:
                raise UserError(f"[space.\"{p.key}\"]: it is conditioned on {ckey}, which the "
                                f"space defines later; move [space.\"{ckey}\"] above it.")
            conds = [q for q in params if q.key == ckey]
            if conds and all(q.type == "categorical" for q in conds):
                choices = [c for q in conds for c in q.choices]
                if not any(v in choices for v in p.when[ckey]):
                    raise UserError(f"[space.\"{p.key}\"]: when {ckey} in {p.when[ckey]} is never "
                                    f"true: its choices are {choices}.")
        seen.add(p.key)


# ---- TOML out (the best trial as a recipe) --------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dump_toml(flat: dict[str, Any], header: str = "") -> str:
    """Dotted keys as [section] tables, in the config's section order."""
    sections = [f.name for f in dataclasses.fields(Config)]
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for section in sections:
        keys = [k for k in flat if k.split(".")[0] == section]
        if not keys:
            continue
        lines += ["", f"[{section}]"]
        lines += [f"{k.split('.', 1)[1]} = {_toml_value(flat[k])}" for k in keys]
    return "\n".join(lines).lstrip("\n") + "\n"
