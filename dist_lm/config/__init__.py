"""Every option a user types, in one system: run configs (a TOML file and dotted command-line
overrides), `dist-lm eval`'s options and api.evaluate's dicts, a sweep's [study] table and the
search keys are parsed, coerced and checked here, and every mistake is one line naming the key
and the fix.

    sections  the run config's dataclasses and defaults (one per [section])
    options   the eval options and the [study] table
    keys      one key: its naming in messages, the closest valid key, coercion, docstrings
    checks    validate: the checks of every option group, the W&B login, the corpus name
    parse     load_config, read_options, set_key, to/from JSON, --help text

This package's face: `from dist_lm.config import X` for every name below.
"""

from .checks import check_corpus, check_wandb_login, validate, wandb_credentials
from .keys import (ALIASES, CONFIG_KEYS, EVAL_KEYS, STUDY_KEYS, Keys, closest, coerce,
                   field_docs, flat_keys, suggest)
from .options import (BUDGETS, OBJECTIVES, CacheOptions, DynamicOptions, EvalOptions,
                      StudyConfig)
from .parse import (RESOLVED, check_main, flatten, from_dict, help_text, load_config,
                    option_types, read_options, save_config, set_key, to_dict, tomllib)
from .sections import (CHOICES, CheckpointConfig, Config, DataConfig, DistConfig, LogConfig,
                       ModelConfig, OptimConfig, ScheduleConfig, SearchConfig, TrainConfig)

__all__ = [
    "ALIASES", "BUDGETS", "CHOICES", "CONFIG_KEYS", "EVAL_KEYS", "OBJECTIVES", "RESOLVED",
    "STUDY_KEYS", "CacheOptions", "CheckpointConfig", "Config", "DataConfig", "DistConfig",
    "DynamicOptions", "EvalOptions", "Keys", "LogConfig", "ModelConfig", "OptimConfig",
    "ScheduleConfig", "SearchConfig", "StudyConfig", "TrainConfig", "check_corpus",
    "check_main", "check_wandb_login", "closest", "coerce", "field_docs", "flat_keys",
    "flatten", "from_dict", "help_text", "load_config", "option_types", "read_options",
    "save_config", "set_key", "suggest", "to_dict", "tomllib", "validate", "wandb_credentials",
]
