"""Config: YAML load, command-line override, unknown keys and bad values rejected with the key's name."""

import pytest

from betadpo import Config
from plumbing.config import parse_config, validate
from plumbing.errors import UserError


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


def test_unknown_cli_flag_rejected(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config(Config, ["--loss.mode_weight", "0.2"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: unrecognized arguments: --loss.mode_weight 0.2")


def test_misspelt_yaml_key_gets_a_suggestion(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'train.max_step' \(did you mean 'train.max_steps'\?\)"):
        parse_config(Config, ["--config", str(write(tmp_path, "train:\n  max_step: 3\n"))])


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-4 as a string; the command line reads it as a float; so do we."""
    cfg = parse_config(Config, ["--config", str(write(tmp_path, "train:\n  lr: 1e-4\nloss:\n  beta: 5E-2\n"))])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.loss.beta == 0.05


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: 1e-4\n  max_steps: 3\n  lr: 3e-4\n", r"c.yaml' line 4: key 'lr' appears twice"),
        ("train:\n  lr: [1e-4\n", r"c.yaml' line 3: not valid YAML"),
        ("- train\n- loss\n", r"c.yaml': expected a mapping of sections"),
        (b"train:\n  output_dir: caf\xe9\n", r"c.yaml' is not UTF-8 text"),
        ("train:\n  lr: .nan\n", r"train.lr must be a finite number"),
    ],
)
def test_bad_yaml_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match=message):
        validate(parse_config(Config, ["--config", str(path)]))


def test_help_shows_flags_not_dataclass_reprs(capsys):
    import eval as ev

    for description in ("", ev.HELP):
        with pytest.raises(SystemExit):
            parse_config(Config, ["--help"], description=description)
        text = capsys.readouterr().out
        assert "--train.lr float" in text and "--config FILE" in text
        assert "<factory>" not in text and "Config(" not in text and "--config None" not in text and "(default: None)" not in text
    assert "--plot RUN_DIR" in text and "--compare EVAL_DIR" in text  # eval.py's help names its other modes


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
        (["--loss.learn_scale", "true", "--train.mixed_precision", "fp16"], "loss.learn_scale"),  # c's optimizer: no loss scaler
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
