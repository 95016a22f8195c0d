"""The command line of ``python -m apollo_lm.train``, built from TrainConfig.

Flag names, defaults, types, choices and help all come from the fields of
:class:`apollo_lm.run_config.TrainConfig` and their metadata; nothing here
repeats them. Errors (:class:`apollo_lm.errors.ConfigError`) become argparse
errors naming the flag: one line ``prog: error: --flag: ...`` on stderr and
exit status 2 (:func:`fail`), for every entry point of ``apollo_lm``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import jax

from apollo_lm.run_config import TrainConfig
from apollo_lm.errors import ConfigError

_GROUPS = {
    "model": "model",
    "optimizer": "optimizer (defaults: apollo_lm.optimizers)",
    "memory": "memory (layer-wise updates, Q-APOLLO; apollo_lm.layerwise)",
    "run": "run",
    "data": "data",
    "output": "evaluation, logging, checkpoints",
    "distributed": "multi-process (one process per host)",
    "finetune": "fine-tuning (apollo_lm.finetune)",
}


def _scalar_type(annotation: Any) -> type:
  """``int`` for ``int | None``, ``str`` for ``tuple[str, ...] | None``, ..."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  if typing.get_origin(annotation) is tuple:
    return args[0]
  if args:
    return _scalar_type(args[0])
  return annotation


def build_parser(
    cls: type[TrainConfig] = TrainConfig, *,
    prog: str = "python -m apollo_lm.train",
    description: str = ("Pre-train a LLaMA model (APOLLO paper setup: warm-up "
                        "+ cosine to 10%% of the peak lr) on a local corpus "
                        "or C4."),
) -> argparse.ArgumentParser:
  """The argparse parser of every option of ``cls`` (a TrainConfig class,
  e.g. ``apollo_lm.finetune.FinetuneConfig``)."""
  parser = argparse.ArgumentParser(
      prog=prog, description=description,
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  groups = {key: parser.add_argument_group(title)
            for key, title in _GROUPS.items()}
  types = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    meta = field.metadata
    if not meta.get("cli", True):
      continue
    kwargs: dict[str, Any] = dict(dest=field.name, help=meta["help"])
    flag = cls.flag(field.name)
    if field.default is True:
      kwargs.update(action="store_false")
    elif field.default is False:
      kwargs.update(action="store_true")
    else:
      kwargs["default"] = field.default
      if "action" in meta:
        kwargs.update(action=meta["action"], default=[])
      else:
        kwargs["type"] = _scalar_type(types[field.name])
      for key in ("choices", "nargs", "metavar"):
        if key in meta:
          kwargs[key] = meta[key]
    groups[meta["group"]].add_argument(flag, **kwargs)
  return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
  """``argv`` (``sys.argv[1:]`` when None) -> a validated TrainConfig.

  Raises:
    ConfigError: an option is invalid.
    SystemExit: argparse refused the command line (unknown flag, bad type).
  """
  namespace = build_parser().parse_args(argv)
  return TrainConfig(**vars(namespace))


def as_config(options: TrainConfig | Mapping[str, Any] | Sequence[str] | None
              ) -> TrainConfig:
  """A :class:`TrainConfig` from itself, a dict of options, or argv strings."""
  if isinstance(options, TrainConfig):
    return options
  if options is None or (isinstance(options, Sequence)
                         and not isinstance(options, str)):
    return parse_args(list(options or []))
  return TrainConfig.from_options(options)


def fail(prog: str, message: str) -> NoReturn:
  """Exits as argparse does on a usage error (status 2), without a traceback
  and without the usage text: one line ``prog: error: message`` on stderr.

  The command-line error of every entry point (``apollo_lm.train``,
  ``.finetune``, ``.generate``) for an invalid option or input: a missing
  folder or tokenizer, an unsupported architecture, a corrupt weight file.
  (A data report listing bad records, ``--strict-data``, follows on the next
  lines.)
  """
  print(f"{prog}: error: {message}", file=sys.stderr)
  raise SystemExit(2)


def parse_or_exit(parser: argparse.ArgumentParser,
                  argv: Sequence[str] | None,
                  cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
  """Like :func:`parse_args`, but a ConfigError exits via :func:`fail`."""
  namespace = parser.parse_args(argv)
  try:
    return cls(**vars(namespace))
  except ConfigError as e:
    fail(parser.prog, str(e))


def run_main(run: Callable[[Any], Any], argv: Sequence[str] | None,
             cls: type[TrainConfig] = TrainConfig, **parser_kwargs: Any) -> int:
  """Parses ``argv`` into ``cls``, calls ``run(config)``, prints its summary.

  The shared body of the ``main()`` of ``apollo_lm.train`` and
  ``apollo_lm.finetune``: option errors (also those raised by ``run``) exit
  via :func:`fail` with status 2; process 0 prints ``result.summary()`` as
  JSON.
  """
  parser = build_parser(cls, **parser_kwargs)
  config = parse_or_exit(parser, argv, cls)
  try:
    result = run(config)
  except ConfigError as e:
    fail(parser.prog, str(e))
  if jax.process_index() == 0:
    print(json.dumps(result.summary(), indent=1))
  return 0
