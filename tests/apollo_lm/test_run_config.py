"""Tests of ``apollo_lm.run_config`` (TrainConfig) and ``apollo_lm.cli``."""

import dataclasses

import pytest

from apollo_lm import cli
from apollo_lm import run_config as config_lib
from apollo_lm.run_config import TrainConfig
from apollo_lm.errors import ConfigError


def test_cli_defaults_are_the_dataclass_defaults():
  assert cli.parse_args([]) == TrainConfig()


def test_every_option_has_a_flag_with_help():
  text = " ".join(cli.build_parser().format_help().split())
  for field in dataclasses.fields(TrainConfig):
    if field.metadata.get("cli", True):
      assert TrainConfig.flag(field.name) in text, field.name
      assert field.metadata["help"].split()[0] in text


@pytest.mark.parametrize("argv, expected", [
    (["--config", "20m"], dict(model="20m")),
    (["--no-limiter", "--optimizer", "apollo_mini"],
     dict(limiter=False, optimizer="apollo_mini")),
    (["--lr", "3e-3", "--rank", "8", "--grad-clip", "1"],
     dict(lr=3e-3, rank=8, grad_clip=1.0)),
    (["--data", "a", "b", "--eval-data", "c"],
     dict(data=("a", "b"), eval_data=("c",))),
    (["--model-override", "hidden_size=64", "--model-override", "x=y"],
     dict(model_override=("hidden_size=64", "x=y"))),
])
def test_flags_map_to_fields(argv, expected):
  config = cli.parse_args(argv)
  for name, value in expected.items():
    assert getattr(config, name) == value


@pytest.mark.parametrize("options, option, message", [
    (dict(lr=-1.0), "--lr", "must be > 0, got -1.0."),
    (dict(lr=float("nan")), "--lr", "must be > 0, got nan."),
    (dict(non_lowrank_lr=0.0), "--non-lowrank-lr", "must be > 0, got 0.0."),
    (dict(grad_clip=-1.0), "--grad-clip", "must be > 0, got -1.0."),
    (dict(weight_decay=-1e-3), "--weight-decay", "must be >= 0, got -0.001."),
    (dict(warmup_steps=30, steps=30), "--warmup-steps",
     "must be in [0, --steps=30), got 30."),
    (dict(rank=0), "--rank", "must be an int >= 1, got 0."),
    (dict(batch_size=0), "--batch-size", "must be an int >= 1, got 0."),
    (dict(model="2b"), "--config", "unknown config '2b'"),
    (dict(optimizer="lion"), "--optimizer", "unknown optimizer 'lion'"),
    (dict(optimizer="adamw", rank=4), "--rank", "'adamw' has no rank"),
    (dict(optimizer="galore", limiter=False), "--no-limiter",
     "'galore' has no norm-growth limiter"),
    (dict(optimizer="adamw", projection="svd"), "--projection",
     "'adamw' has no projection"),
    (dict(stop_at_step=0), "--stop-at-step", "must be in [1, --steps=300]"),
    (dict(resume=True), "--resume", "needs --checkpoint-dir."),
    (dict(model_override=("hidden_size",)), "--model-override",
     "expected FIELD=VALUE"),
    (dict(layerwise=True, grad_clip=1.0), "--grad-clip",
     "--layerwise cannot clip"),
])
def test_invalid_options_raise_naming_the_flag(options, option, message):
  with pytest.raises(ConfigError) as error:
    TrainConfig(**options)
  assert error.value.option == option
  assert message in error.value.message
  assert str(error.value).startswith(f"{option}: ")


def test_rank_zero_on_the_command_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_or_exit(cli.build_parser(), ["--rank", "0"])
  assert exit_info.value.code == 2
  assert "error: --rank: must be an int >= 1, got 0.\n" in (
      capsys.readouterr().err)


def test_from_options_accepts_config_for_model_and_refuses_unknown_keys():
  assert TrainConfig.from_options({"config": "20m"}).model == "20m"
  with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
    TrainConfig.from_options({"learning_rate": 1.0})


def test_resume_mismatches_name_structural_options_only():
  stored = TrainConfig(optimizer="apollo", rank=8, steps=100).to_json()
  given = TrainConfig(optimizer="apollo_mini", steps=200, eval_every=5)
  assert config_lib.resume_mismatches(stored, given) == [
      "--optimizer: checkpoint 'apollo', given 'apollo_mini'",
      "--rank: checkpoint 8, given None"]
  assert config_lib.resume_mismatches(
      stored, TrainConfig(optimizer="apollo", rank=8, steps=500)) == []
