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
        (
            {"model": {"kind": "hf", "architecture": "gpt2", "hf_config": {"attn_pdrop": 0.1}}},
            "attn_pdrop",
        ),
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


def test_a_transformers_model_trains_without_dropout_whatever_its_defaults():
    """GPT-2's config defaults to dropout 0.1 in three places; dropout draws random masks, so a
    node's training could not be replayed by an audit. The run's model has none (an explicit
    non-zero dropout is refused above)."""
    from gridswarm.config import is_dropout_field
    from gridswarm.train.model import build_model

    cfg = parse_run_config(
        {
            "model": {
                "kind": "hf",
                "architecture": "gpt2",
                "hf_config": {"n_layer": 1, "n_embd": 32, "n_head": 2},
            }
        }
    )
    config = build_model(cfg.model, seq_len=16, seed=0).hf.config
    assert {k: v for k, v in config.to_dict().items() if is_dropout_field(k, v)} == {}
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.0
