from pathlib import Path

import pytest

from gridswarm.config import ConfigError, load_run_config, parse_run_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_defaults_make_a_valid_run():
    cfg = parse_run_config({})
    assert cfg.comm.codec == "int8"
    assert cfg.tokens_per_step == cfg.train.seq_len * cfg.train.batch_size


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"train": {"inner_lr": -1}}, "train.inner_lr"),
        ({"comm": {"codec": "int3"}}, "comm.codec"),
        ({"round": {"quorum": 5, "max_nodes": 2}}, "quorum"),
        ({"model": {"n_embd": 30, "n_head": 4}}, "n_embd"),
        ({"train": {"batch_sise": 4}}, "train.batch_sise"),
        ({"budget": {"rounds": None, "tokens": None}}, "budget"),
        ({"model": {"kind": "hf"}}, "architecture"),
    ],
)
def test_invalid_settings_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_run_config(data)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    assert load_run_config(path).name


def test_bad_toml_is_reported(tmp_path):
    bad = tmp_path / "run.toml"
    bad.write_text("[train\nseq_len = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(bad)
