"""Config: TOML + dotted overrides, precedence, type coercion, clear errors, JSON round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dist_lm.config import Config, flat_keys, from_dict, load_config, save_config, to_dict
from dist_lm.errors import UserError
from helpers.cli import REPO


def write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_defaults_are_the_papers_values():
    cfg = load_config()
    assert (cfg.model.emb_size, cfg.model.hidden_size, cfg.model.n_layers) == (400, 1150, 3)
    assert cfg.optim.lr == 30.0 and cfg.optim.clip == 0.25 and cfg.optim.weight_decay == 1.2e-6
    assert cfg.optim.nonmono == 5 and cfg.train.bptt == 70 and cfg.train.seed == 141


def test_precedence_cli_over_file_over_defaults(tmp_path):
    p = write(tmp_path, "[optim]\nlr = 10\nclip = 0.5\n[model]\narch = 'qrnn'\n")
    cfg = load_config(p, {"optim.lr": "7.5"})
    assert cfg.optim.lr == 7.5          # command line wins
    assert cfg.optim.clip == 0.5        # file beats default
    assert cfg.model.arch == "qrnn"
    assert cfg.train.bptt == 70         # default kept


def test_overrides_coerced_to_field_type(tmp_path):
    cfg = load_config(None, {"train.bptt": "35", "model.tie_weights": "false",
                             "schedule.milestones": "[0.5, 0.75]", "optim.lr": 30,
                             "log.tags": "a,b", "model.cutoffs": [2800, 20000]})
    assert cfg.train.bptt == 35 and isinstance(cfg.train.bptt, int)
    assert cfg.model.tie_weights is False
    assert cfg.schedule.milestones == [0.5, 0.75]
    assert isinstance(cfg.optim.lr, float)
    assert cfg.log.tags == ["a", "b"]
    assert cfg.model.cutoffs == [2800, 20000]


@pytest.mark.parametrize("key,value,needle", [
    ("optim.lrr", 1, "did you mean 'optim.lr'"),
    ("optm.lr", 1, "did you mean 'optim'"),
    ("train.bptt", "seventy", "train.bptt' expects an integer"),
    ("model.tie_weights", "maybe", "expects true or false"),
    ("model.arch", "transformer", "must be one of lstm, qrnn, gru"),
    ("lr", 1, "section.field"),
])
def test_bad_keys_and_types_name_the_key(key, value, needle):
    with pytest.raises(UserError) as err:
        load_config(None, {key: value})
    assert needle.lower() in str(err.value).lower()


def test_unknown_key_in_file_is_an_error(tmp_path):
    p = write(tmp_path, "[model]\nhiden_size = 10\n")
    with pytest.raises(UserError, match="model.hidden_size"):
        load_config(p)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    p = write(tmp_path, "[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(p)


def test_cross_field_validation():
    with pytest.raises(UserError, match="model.dropout"):
        load_config(None, {"model.dropout": 1.5})
    with pytest.raises(UserError, match="dist.zero_stage"):
        load_config(None, {"dist.zero_stage": 4})
    with pytest.raises(UserError, match="dist.zero_stage must be 0, 1 or 2"):
        load_config(None, {"dist.zero_stage": 3})  # the engine cannot run it: refused up front
    with pytest.raises(UserError, match="whole epoch"):
        load_config(None, {"schedule.milestones": [1.5]})
    assert load_config(None, {"schedule.milestones": [0.5, 12]}).schedule.milestones == [0.5, 12]


def test_json_round_trip(tmp_path):
    cfg = load_config(None, {"model.arch": "qrnn", "schedule.milestones": [0.5], "log.tags": ["x"]})
    save_config(cfg, tmp_path / "config.json")
    back = from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert to_dict(back) == to_dict(cfg)
    assert not list(tmp_path.glob("*.tmp"))


def test_every_field_has_a_docstring():
    missing = [k for k, doc in flat_keys().items() if not doc]
    assert missing == []
    assert set(flat_keys()) == {f"{s}.{f}" for s, sec in to_dict(Config()).items() for f in sec}


def test_shipped_configs_load():
    configs = sorted(REPO.glob("configs/*.toml"))
    names = {p.stem for p in configs}
    # the shipped recipes (the docs name them): each must be found, or the glob has gone wrong
    assert {"cpu_smoke", "ptb_small_cpu", "ptb_5min_cpu", "ptb_15min_cpu", "ptb_awd_lstm",
            "ptb_char_lstm", "ptb_cell_search_cpu", "wt2_awd_lstm", "wt103_qrnn_12h",
            "enwik8_lstm"} <= names, names
    for p in configs:
        load_config(p)


def test_cli_reports_config_errors_without_traceback(tmp_path):
    p = write(tmp_path, "[optim]\nlr = 30\n")
    proc = subprocess.run([sys.executable, "-m", "dist_lm", "train", str(p), "--optim.lrr=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "optim.lr" in proc.stderr
