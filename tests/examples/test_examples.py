"""The examples run end to end and learn, with few steps."""

import importlib.util
import pathlib
import sys

import pytest

pytestmark = [pytest.mark.xdist_group("examples"), pytest.mark.slow]

_EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  # Dataclasses (Linen modules) look their module up in sys.modules.
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def test_linen_trainstate_learns(capsys):
  losses = _load("linen_trainstate").main(["--steps", "40"])
  assert len(losses) == 40
  assert sum(losses[-5:]) / 5 < losses[0] - 0.5
  assert "optimizer state" in capsys.readouterr().out


def test_equinox_style_learns():
  losses = _load("equinox_style").main(["--steps", "40"])
  assert len(losses) == 40
  assert losses[-1] < 0.5 * losses[0]
