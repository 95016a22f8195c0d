"""The exception of ``apollo_lm``'s option checks.

:class:`ConfigError` carries the option's name as a field, so callers that
present options differently (``--flag`` on the command line, a keyword in
Python) rename it without parsing the message.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """An invalid option value or combination.

  Attributes:
    option: the option's name as the raising code knows it (a
      ``TrainConfig`` field's flag such as ``"--rank"``, or a keyword argument
      such as ``"rank"`` from :mod:`apollo_lm.optimizers`).
    message: what is wrong and what is allowed, without the option's name.
  """

  def __init__(self, option: str, message: str):
    super().__init__(f"{option}: {message}")
    self.option = option
    self.message = message

  def renamed(self, option: str) -> ConfigError:
    """The same error under another name for the option."""
    return ConfigError(option, self.message)
