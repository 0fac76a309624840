"""The checks of every option group (`validate`): values nothing could use are refused with
one line naming the key and the fix, in one wording for the run config (with its search
section), the eval options and a [study] table; and the W&B login and prepared-corpus checks a
run config gets before anything starts."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from .keys import STUDY_KEYS, closest, coerce, field_docs
from .options import BUDGETS, OBJECTIVES, CacheOptions, DynamicOptions, EvalOptions, StudyConfig
from .sections import Config, SearchConfig


def wandb_credentials() -> str | None:
    """Where wandb would find an API key without prompting (the same places wandb.login reads:
    $WANDB_API_KEY or an identity-token file, the netrc entry of the W&B host, an api_key in
    the settings file), or None. Read here with the standard library: wandb's own lookup is
    private API that moves between releases, and importing wandb costs seconds."""
    import netrc
    from urllib.parse import urlparse

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return f"${var}"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        if netrc.netrc(str(path)).authenticators(host or ""):
            return str(path)
    except (OSError, netrc.NetrcParseError):
        pass
    conf = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    try:
        if "api_key" in (conf / "settings").read_text(errors="replace"):
            return str(conf / "settings")
    except OSError:
        pass
    return None


def check_corpus(cfg: Config) -> None:
    """A misspelt data.corpus with nothing prepared under its name: name the closest preset
    (the trainer would say `dist-lm prepare ptbb`, which prepare refuses in turn)."""
    from ..data.corpora import PRESETS

    d = cfg.data
    if d.shards or d.corpus in PRESETS or d.corpus.startswith("text:"):
        return
    if (cfg.shards_dir() / "manifest.json").is_file():  # a corpus prepared under that name
        return
    match = difflib.get_close_matches(d.corpus, list(PRESETS), n=1, cutoff=0.5)
    hint = f" Did you mean --data.corpus={match[0]}?" if match else ""
    raise UserError(f"data.corpus '{d.corpus}' is not a corpus preset ({', '.join(PRESETS)}) "
                    f"and {cfg.shards_dir()} holds no prepared corpus.{hint} Use a preset, "
                    f"text:DIR, or set data.shards to a directory written by `dist-lm prepare`.")


def check_wandb_login(cfg: Config) -> None:
    """Online W&B without credentials: wandb.init waits for its login prompt to time out
    (about 100 s), then raises; refuse before anything is started or written."""
    mode = os.environ.get("WANDB_MODE") or cfg.log.wandb_mode
    if mode == "online" and wandb_credentials() is None:
        raise UserError("log.wandb_mode is online but no W&B login was found (no $WANDB_API_KEY, "
                        "no api.wandb.ai entry in ~/.netrc); run `wandb login` first, or pass "
                        "--log.wandb_mode=offline and upload later with `wandb sync`.")


def validate(cfg: Config | EvalOptions | CacheOptions | DynamicOptions | StudyConfig) -> None:
    """Refuse values nothing could use, naming the key to change (one line, one wording for
    every option group: a run config with its search section, eval options, a [study])."""
    if not isinstance(cfg, Config):
        _CHECKS[type(cfg)](cfg)
        return
    t, m = cfg.train, cfg.model
    if t.global_batch < 1:
        raise UserError("train.global_batch must be >= 1.")
    if t.micro_batch < 0:
        raise UserError("train.micro_batch must be >= 0 (0 means global_batch / world_size).")
    if t.bptt < 2:
        raise UserError("train.bptt must be >= 2.")
    for name in ("emb_size", "hidden_size", "n_layers", "n_experts"):
        if getattr(m, name) < 1:
            raise UserError(f"model.{name} must be >= 1; got {getattr(m, name)}.")
    for name in ("mos_latent", "hsm_classes"):
        if getattr(m, name) < 0:
            raise UserError(f"model.{name} must be >= 0 (0 chooses it); got {getattr(m, name)}.")
    for name in ("dropout", "dropouth", "dropouti", "dropoute", "wdrop", "zoneout", "dropoutl"):
        v = getattr(m, name)
        if not 0.0 <= v < 1.0:
            raise UserError(f"model.{name} must be in [0, 1); got {v}.")
    if m.qrnn_window not in (1, 2):
        raise UserError(f"model.qrnn_window must be 1 or 2; got {m.qrnn_window}.")
    if cfg.dist.zero_stage not in (0, 1, 2):
        raise UserError(f"dist.zero_stage must be 0, 1 or 2; got {cfg.dist.zero_stage} (stage 3 "
                        f"partitions the parameters themselves, which model.pt and NT-ASGD "
                        f"averaging need whole; recurrent LMs of this size fit per device).")
    for m_ in cfg.schedule.milestones:
        if m_ <= 0 or (m_ >= 1 and not float(m_).is_integer()):
            raise UserError(f"schedule.milestones: {m_} is neither a whole epoch (>= 1) nor a "
                            f"fraction of the run (0 < m < 1); e.g. [12, 18] or [0.5, 0.75].")
    if t.max_seconds < 0 or t.max_steps < 0 or t.epochs < 0:
        raise UserError("train.max_seconds, train.max_steps and train.epochs must be >= 0.")
    if t.epochs == 0 and t.max_steps == 0:  # the run would stop before its first step
        raise UserError("train.epochs = 0 with train.max_steps = 0 trains nothing; set "
                        "train.epochs >= 1 or train.max_steps >= 1.")
    if cfg.optim.clip < 0:
        raise UserError(f"optim.clip must be >= 0 (0 turns clipping off); got {cfg.optim.clip}.")
    if cfg.optim.lr <= 0:
        raise UserError(f"optim.lr must be > 0; got {cfg.optim.lr}.")
    s = cfg.schedule
    if s.scaling not in ("", "none", "linear", "sqrt", "adascale"):
        raise UserError(f"schedule.scaling must be none, linear, sqrt or adascale; got "
                        f"{s.scaling!r}.")
    if s.scaling == "adascale" and (cfg.dist.engine == "deepspeed" or t.noise_scale_every == 0):
        raise UserError("schedule.scaling=adascale reads the measured gradient noise scale, which "
                        + ("DeepSpeed does not give; use --dist.engine=ddp or local"
                           if cfg.dist.engine == "deepspeed" else
                           "train.noise_scale_every=0 turns off; drop it or set it to N > 0")
                        + ", or pick another --schedule.scaling.")
    if s.base_batch < 0:
        raise UserError(f"schedule.base_batch must be >= 0 (0: the config file's "
                        f"train.global_batch); got {s.base_batch}.")
    if s.warmup_steps < -1 or s.warmup_base_steps < 0:
        raise UserError(f"schedule.warmup_steps must be >= 0 (or -1: derived) and "
                        f"schedule.warmup_base_steps >= 0; got {s.warmup_steps} and "
                        f"{s.warmup_base_steps}.")
    if t.noise_scale_every < -1:
        raise UserError(f"train.noise_scale_every must be N > 0 (every N steps), 0 (off) or -1 "
                        f"(every step where it can be measured); got {t.noise_scale_every}.")
    if t.noise_scale_every > 0 and cfg.dist.engine == "deepspeed":
        raise UserError("train.noise_scale_every needs dist.engine=local or ddp: DeepSpeed "
                        "reduces, clips and steps in one call, with no norm of the whole unclipped "
                        "gradient to read; drop --train.noise_scale_every or use "
                        "--dist.engine=ddp.")
    if t.max_micro_tokens < -1:
        raise UserError(f"train.max_micro_tokens must be > 0, 0 (the device's default) or -1 (no "
                        f"cap); got {t.max_micro_tokens}.")
    _check_search(cfg.search)
    check_corpus(cfg)
    check_wandb_login(cfg)


def _need(ok: bool, key: str, rule: str, value: Any) -> None:
    """One refused value, in the wording every check shares."""
    if not ok:
        raise UserError(f"{key} must be {rule}; got {value!r}.")


def _check_search(s: SearchConfig) -> None:
    _need(s.n_nodes >= 1, "search.n_nodes", ">= 1", s.n_nodes)
    _need(s.derive_samples >= 1, "search.derive_samples", ">= 1", s.derive_samples)
    for name in ("rounds", "shared_steps", "controller_steps", "derive_windows", "max_seconds",
                 "temperature", "tanh_constant", "entropy_weight"):
        _need(getattr(s, name) >= 0, f"search.{name}", ">= 0", getattr(s, name))
    for name in ("controller_hidden", "controller_lr", "reward_c"):
        _need(getattr(s, name) > 0, f"search.{name}", "> 0", getattr(s, name))
    _need(0.0 <= s.baseline_decay < 1.0, "search.baseline_decay", "in [0, 1)", s.baseline_decay)


def _check_cache(c: CacheOptions) -> None:  # named as `dist-lm eval` spells them
    _need(c.window >= 1, "--cache.window", ">= 1", c.window)
    _need(c.theta >= 0, "--cache.theta", ">= 0", c.theta)
    _need(0 <= c.lambdah <= 1, "--cache.lambdah", "in [0, 1]", c.lambdah)


def _check_dynamic(d: DynamicOptions) -> None:
    _need(d.bptt >= 1, "--dynamic.bptt", ">= 1", d.bptt)
    _need(d.stat_batch >= 1, "--dynamic.stat_batch", ">= 1", d.stat_batch)
    _need(d.lr >= 0, "--dynamic.lr", ">= 0", d.lr)
    _need(d.decay >= 0, "--dynamic.decay", ">= 0", d.decay)


def _check_eval(e: EvalOptions) -> None:
    if e.cache is not None and e.dynamic is not None:
        raise UserError("use either the cache (--cache.*) or dynamic evaluation (--dynamic.*), "
                        "not both in one command.")
    if e.cache is not None:
        _check_cache(e.cache)
    if e.dynamic is not None:
        _check_dynamic(e.dynamic)


def _check_study(st: StudyConfig) -> None:
    for key in ("name", "base"):
        if not getattr(st, key):
            doc = field_docs()[("StudyConfig", key)].rstrip(".")
            raise UserError(f"study.{key} is required ({doc[0].lower()}{doc[1:]}).")
    if st.objective not in OBJECTIVES:
        raise UserError(f"study.objective must be one of {', '.join(OBJECTIVES)}; got "
                        f"{st.objective!r}.{closest(st.objective, list(OBJECTIVES), STUDY_KEYS)}")
    for key in ("trials", "workers", "heartbeat"):
        _need(getattr(st, key) >= 1, f"study.{key}", "an integer >= 1", getattr(st, key))
    for key in ("retries", "eval_every_steps"):
        _need(getattr(st, key) >= 0, f"study.{key}", "an integer >= 0", getattr(st, key))
    b = st.budget
    if len(b) != 1 or next(iter(b)) not in BUDGETS:
        raise UserError(f"study.budget must be one of {{ steps = N }}, {{ epochs = N }} or "
                        f"{{ seconds = S }}; got {b!r}.")
    (kind, amount), = b.items()  # typed here: the one table whose values are not fields
    b[kind] = coerce(f"budget.{kind}", amount, float if kind == "seconds" else int, STUDY_KEYS)
    _need(b[kind] > 0, f"study.budget.{kind}",
          f"a positive {'number' if kind == 'seconds' else 'integer'}", b[kind])


_CHECKS = {EvalOptions: _check_eval, CacheOptions: _check_cache,
           DynamicOptions: _check_dynamic, StudyConfig: _check_study}
