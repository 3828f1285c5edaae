"""Config: YAML load, command-line override, unknown keys and bad values rejected with the key's name."""

import pytest

from betadpo import Config, validate
from common import UserError, parse_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_cli_override(tmp_path):
    path = write(tmp_path, "loss:\n  beta: 0.25\n  alpha: 0.6\ntrain:\n  batch_size: 8\n")
    cfg = parse_config(Config, ["--config", str(path), "--loss.alpha", "1.5", "--train.output_dir", "x"])
    assert cfg.loss.beta == 0.25  # from the file
    assert cfg.loss.alpha == 1.5  # the command line wins
    assert cfg.train.batch_size == 8 and cfg.train.output_dir == "x"
    assert cfg.loss.filter_ratio == 0.0  # untouched default


def test_cli_booleans_and_literals():
    cfg = parse_config(Config, ["--loss.learn_scale", "true", "--loss.type", "ipo"])
    assert cfg.loss.learn_scale is True and cfg.loss.type == "ipo"


def test_yaml_on_off_is_the_choice_not_a_boolean(tmp_path):
    """YAML reads a bare `off` as false; data.chat_template takes it as the choice "off" it means."""
    for text, want in (("off", "off"), ("on", "on"), ("auto", "auto")):
        cfg = parse_config(Config, ["--config", str(write(tmp_path, f"data:\n  chat_template: {text}\n"))])
        assert cfg.data.chat_template == want
    with pytest.raises(UserError, match="data.chat_template must be one of"):
        parse_config(Config, ["--config", str(write(tmp_path, "data:\n  chat_template: maybe\n"))])


def test_unknown_yaml_key_is_named(tmp_path):
    path = write(tmp_path, "loss:\n  mode_weight: 0.2\n")
    with pytest.raises(UserError, match="loss.mode_weight"):
        parse_config(Config, ["--config", str(path)])
    with pytest.raises(UserError, match="'optimiser'"):
        parse_config(Config, ["--config", str(write(tmp_path, "optimiser: {}\n"))])


def test_unknown_cli_flag_rejected():
    with pytest.raises(SystemExit):
        parse_config(Config, ["--loss.mode_weight", "0.2"])


def test_bad_literal_in_yaml(tmp_path):
    with pytest.raises(UserError, match="loss.type"):
        parse_config(Config, ["--config", str(write(tmp_path, "loss:\n  type: kto\n"))])


def test_wrong_type_in_yaml(tmp_path):
    with pytest.raises(UserError, match="train.lr"):
        parse_config(Config, ["--config", str(write(tmp_path, "train:\n  lr: fast\n"))])


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        parse_config(Config, ["--config", "no/such.yaml"])


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--loss.beta", "-0.1"], "loss.beta"),
        (["--loss.filter_ratio", "1.0"], "loss.filter_ratio"),
        (["--loss.momentum", "1.0"], "loss.momentum"),
        (["--train.batch_size", "10", "--train.grad_accum", "4"], "train.batch_size"),
        (["--data.max_prompt_length", "64", "--data.max_length", "64"], "data.max_prompt_length"),
    ],
)
def test_out_of_range_values(flags, key):
    cfg = parse_config(Config, flags)
    with pytest.raises(UserError, match=key):
        validate(cfg)


def test_batch_must_divide_by_processes_times_accumulation():
    cfg = parse_config(Config, ["--train.batch_size", "12", "--train.grad_accum", "2"])
    validate(cfg, num_processes=2)  # 12 = 2 × 2 × 3
    with pytest.raises(UserError, match=r"processes × grad_accum \(4 × 2\)"):
        validate(cfg, num_processes=4)


def test_every_shipped_config_parses_and_validates():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        validate(parse_config(Config, ["--config", str(path)]))
