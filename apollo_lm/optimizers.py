"""Optimizers compared by the pre-training job, with the paper's defaults.

One table, :data:`RECIPES`, holds each optimizer as data: its defaults for
pre-training (``apollo_lm.train``, ``apollo_lm.demo``, the benchmarks) and
for fine-tuning (``apollo_lm.finetune``), and its builder. Adding an
optimizer is one entry there. :func:`resolve_hparams` applies the defaults;
:func:`make_optimizer` turns a name and a model config into an
``optax.GradientTransformation`` with the paper's schedule (linear warm-up,
then cosine decay to 10% of the peak learning rate, APOLLO paper A.4).

Which leaves are low-rank is decided once, by
:func:`apollo_optax.default_lowrank_mask`: the attention and MLP kernels, each
a scanned ``(L, m, n)`` stack treated as ``L`` independent matrices. The token
embedding, the output head and the norms get AdamW, as in the official APOLLO
code, and GaLore uses the same split.

GaLore is ``optax.contrib.galore``. Its dimension numbers (optax 0.2.8) must
assign every axis to the reduction or the output side: it has no batch axes,
so a ``(L, m, n)`` stack could only be projected as one ``(L*m, n)`` matrix.
:func:`per_layer` therefore unstacks the low-rank stacks into ``L`` matrices
before GaLore and stacks the updates back, which gives each layer its own SVD
projector, as GaLore on an unscanned model would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

import apollo_optax
from apollo_lm.configs import LlamaConfig
from apollo_lm.errors import ConfigError

MIN_LR_RATIO: Final[float] = 0.1
"""Final learning rate of the cosine schedule, as a fraction of the peak."""

SCALE_TYPES: Final[tuple[str, ...]] = ("channel", "tensor")
PROJECTIONS: Final[tuple[str, ...]] = ("gaussian", "rademacher", "svd")


@dataclasses.dataclass(frozen=True)
class OptimizerDefaults:
  """Default hyper-parameters of one optimizer in one setting.

  Attributes:
    learning_rate: Peak learning rate.
    has_rank: whether the optimizer has a rank to set (APOLLO, GaLore).
    rank: the default (or, without ``has_rank``, fixed) rank; None with
      ``has_rank``: :func:`default_rank` of the model's hidden size.
      APOLLO-Mini is always rank 1.
    scale: APOLLO's ``scale`` (the update is multiplied by its square root) or
      GaLore's ``scale`` (multiplies the projected-back update); None if the
      optimizer has none.
    scale_types: APOLLO's allowed scaling granularities, the default first;
      empty for optimizers without one (then neither a projection nor the
      norm-growth limiter can be set either).
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Added to the root of the second moment.
    update_proj_gap: Steps between projection refreshes (APOLLO, GaLore).
  """

  learning_rate: float
  has_rank: bool = False
  rank: int | None = None
  scale: float | None = None
  scale_types: tuple[str, ...] = ()
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  update_proj_gap: int = 200

  @property
  def is_apollo(self) -> bool:
    """Whether APOLLO's options (projection, scale type, limiter) apply."""
    return bool(self.scale_types)


MAX_DEFAULT_RANK: Final[int] = 256


def default_rank(hidden_size: int) -> int:
  """The paper's APOLLO/GaLore rank: ``min(hidden_size // 4, 256)``.

  The official pre-training scripts use a quarter of the hidden size up to
  256: 128 (60M), 192 (130M) and 256 for 350M, 1B, 7B and 13B. The job, the
  memory benchmarks and the README tables all use this one rule.

  >>> [default_rank(h) for h in (512, 768, 1024, 2048, 4096, 5120)]
  [128, 192, 256, 256, 256, 256]
  """
  return max(1, min(hidden_size // 4, MAX_DEFAULT_RANK))


def make_schedule(peak_value: float, total_steps: int,
                  warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``peak_value``, then cosine to 10% of it.

  ``total_steps`` includes the warm-up (``optax.warmup_cosine_decay_schedule``
  counts ``decay_steps`` from step 0).
  """
  if not 0 <= warmup_steps < total_steps:
    raise ConfigError("warmup_steps", f"must be in [0, total_steps="
                      f"{total_steps}), got {warmup_steps}.")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_value, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=MIN_LR_RATIO * peak_value)


def decay_mask(params: Any) -> Any:
  """Weight decay applies to matrices only, not to norm scales or scalars.

  Also right for :func:`per_layer` trees, whose layer tuples hold matrices.
  """
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def _is_stacked(leaf: Any, is_lowrank: bool) -> bool:
  return is_lowrank and leaf.ndim == 3


def per_layer(inner: optax.GradientTransformation,
              lowrank_mask: Callable[[Any], Any]
              ) -> optax.GradientTransformation:
  """Runs ``inner`` on the layers of each stacked low-rank leaf separately.

  Every low-rank leaf of shape ``(L, m, n)`` is replaced by a tuple of ``L``
  ``(m, n)`` matrices before ``inner`` sees the tree, and ``inner``'s updates
  are stacked back; the other leaves pass unchanged. ``inner``'s state holds
  per-layer leaves.

  Args:
    inner: The transformation to apply, e.g. ``optax.contrib.galore``.
    lowrank_mask: Maps params to a pytree of bools: which leaves to unstack.
  """

  def unstack(tree: Any, mask: Any) -> Any:
    return jax.tree.map(
        lambda x, is_lowrank: tuple(x) if _is_stacked(x, is_lowrank) else x,
        tree, mask)

  def stack(tree: Any, like: Any, mask: Any) -> Any:
    return jax.tree.map(
        lambda ref, is_lowrank, x: (jnp.stack(x)
                                    if _is_stacked(ref, is_lowrank) else x),
        like, mask, tree, is_leaf=lambda x: isinstance(x, tuple))

  def init_fn(params: Any) -> optax.OptState:
    return inner.init(unstack(params, lowrank_mask(params)))

  def update_fn(updates: Any, state: optax.OptState,
                params: Any = None) -> tuple[Any, optax.OptState]:
    mask = lowrank_mask(updates)
    unstacked_params = None if params is None else unstack(params, mask)
    new_updates, state = inner.update(
        unstack(updates, mask), state, unstacked_params)
    return stack(new_updates, updates, mask), state

  return optax.GradientTransformation(init_fn, update_fn)


def galore_dimension_numbers(params: Any) -> Any:
  """GaLore dimension numbers for per-layer (unstacked) params.

  Low-rank matrices (after :func:`per_layer`) are ``(m, n)`` with the
  default axes; every other leaf gets None, i.e. plain Adam in GaLore.
  """

  def dims(subtree: Any, is_lowrank: bool) -> Any:
    spec = contrib.GaLoreDimensionNumbers() if is_lowrank else None
    if isinstance(subtree, tuple):
      return tuple(spec for _ in subtree)
    return spec

  mask = _unstacked_mask(params)
  return jax.tree.map(dims, params, mask,
                      is_leaf=lambda x: isinstance(x, tuple))


def _unstacked_mask(params: Any) -> Any:
  """``default_lowrank_mask`` for a tree whose stacks are tuples of layers."""

  def restack(x: Any) -> Any:
    return (jax.ShapeDtypeStruct((len(x),) + x[0].shape, x[0].dtype)
            if isinstance(x, tuple) else x)

  stacked = jax.tree.map(restack, params, is_leaf=lambda x: isinstance(x, tuple))
  return apollo_optax.default_lowrank_mask(stacked)


def _scale_non_lowrank(factor: float) -> optax.GradientTransformation:
  """Multiplies the final updates of the non-low-rank leaves by ``factor``.

  The schedule is multiplicative, so this is the same schedule with its peak
  times ``factor`` (decoupled weight decay included, as in a per-group lr).
  """

  def update_fn(updates, state, params=None):
    del params
    mask = apollo_optax.default_lowrank_mask(updates)
    return jax.tree.map(lambda u, is_lowrank: u if is_lowrank else u * factor,
                        updates, mask), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


class BuildArgs(NamedTuple):
  """What a recipe's builder gets (see :func:`make_optimizer`).

  Attributes:
    schedule: the learning-rate schedule.
    hparams: :func:`resolve_hparams`'s dict.
    weight_decay: decoupled weight decay on matrices.
    seed: seed of APOLLO's random projections.
    mu_dtype: dtype of the first moments, or None.
    projection_dtype: APOLLO's projection input dtype, or None.
    adam_schedule: APOLLO's schedule of the non-low-rank leaves, or None.
  """

  schedule: optax.Schedule
  hparams: dict[str, Any]
  weight_decay: float
  seed: int
  mu_dtype: Any
  projection_dtype: Any
  adam_schedule: optax.Schedule | None


def _moments(a: BuildArgs) -> dict[str, Any]:
  h = a.hparams
  return dict(b1=h["b1"], b2=h["b2"], eps=h["eps"], mu_dtype=a.mu_dtype)


def _apollo_options(a: BuildArgs) -> dict[str, Any]:
  h = a.hparams
  return dict(
      _moments(a), weight_decay=a.weight_decay, weight_decay_mask=decay_mask,
      update_proj_gap=h["update_proj_gap"], key=a.seed, scale=h["scale"],
      projection=h["projection"], projection_dtype=a.projection_dtype,
      adam_learning_rate=a.adam_schedule,
      **({} if h["limiter"] else {"norm_growth_limit": None}))


def _build_adamw(a: BuildArgs) -> optax.GradientTransformation:
  return optax.adamw(a.schedule, weight_decay=a.weight_decay, mask=decay_mask,
                     **_moments(a))


def _build_apollo(a: BuildArgs) -> optax.GradientTransformation:
  return apollo_optax.apollo(a.schedule, a.hparams["rank"],
                             scale_type=a.hparams["scale_type"],
                             **_apollo_options(a))


def _build_apollo_mini(a: BuildArgs) -> optax.GradientTransformation:
  return apollo_optax.apollo_mini(a.schedule, scale_front=True,
                                  **_apollo_options(a))


def _build_galore(a: BuildArgs) -> optax.GradientTransformation:
  h = a.hparams
  return per_layer(
      contrib.galore(
          a.schedule, rank=h["rank"], update_proj_gap=h["update_proj_gap"],
          scale=h["scale"], base_optimizer=optax.scale_by_adam(**_moments(a)),
          weight_decay=a.weight_decay, mask=decay_mask,
          weight_dimension_numbers=galore_dimension_numbers),
      apollo_optax.default_lowrank_mask)


def _build_adafactor(a: BuildArgs) -> optax.GradientTransformation:
  return optax.adafactor(a.schedule, multiply_by_parameter_scale=False,
                         weight_decay_rate=a.weight_decay or None,
                         weight_decay_mask=decay_mask)


class Recipe(NamedTuple):
  """One optimizer: its defaults for pre-training and fine-tuning, its builder.

  Attributes:
    pretrain: the defaults of ``apollo_lm.train``, the demo and benchmarks.
    finetune: the defaults of ``apollo_lm.finetune``.
    build: :class:`BuildArgs` -> the ``optax.GradientTransformation``.
    has_first_moment: whether ``mu_dtype`` can be set (Adafactor: no).
  """

  pretrain: OptimizerDefaults
  finetune: OptimizerDefaults
  build: Callable[[BuildArgs], optax.GradientTransformation]
  has_first_moment: bool = True


def _recipe(build, pretrain: OptimizerDefaults, has_first_moment: bool = True,
            **finetune: Any) -> Recipe:
  return Recipe(pretrain, dataclasses.replace(pretrain, **finetune), build,
                has_first_moment)


# Pre-training, sources: APOLLO paper A.4 and the official repository's
# pre-training scripts (paper.md section 5): lr 1e-2 for APOLLO and
# APOLLO-Mini, rank 1/4 of the hidden size, gap 200, APOLLO scale 1,
# APOLLO-Mini scale 128 applied before the norm-growth limiter, betas (0.9,
# 0.999), eps 1e-6 (APOLLOAdamW). AdamW is the baseline of GaLore's and
# APOLLO's scripts, torch.optim.AdamW at lr 1e-3 with its default eps 1e-8.
# GaLore: lr 1e-2 and scale 0.25 as in the GaLore paper's pre-training runs.
# Adafactor is not in the APOLLO paper: we use its absolute-step form
# (factored second moments, update clipping at RMS 1, no momentum) at AdamW's
# lr 1e-3. Its default relative step multiplies the lr by the parameter RMS,
# which assumes unit-scale weights (T5); with LLaMA's normal(0, 0.02) init it
# makes steps about 50x smaller than AdamW's.
# Fine-tuning: the APOLLO paper's Table 12 (commonsense fine-tuning of
# Llama-3.2-1B): rank 32, APOLLO-Mini rank 1 and scale 128, APOLLO scale 5,
# lr 3e-4 for the APOLLO family and GaLore, 2e-5 for AdamW (the paper sweeps
# 2e-5..5e-5); Adafactor (not in the paper) at AdamW's lr.
RECIPES: Final[dict[str, Recipe]] = {
    "adamw": _recipe(_build_adamw, OptimizerDefaults(learning_rate=1e-3),
                     learning_rate=2e-5),
    "apollo": _recipe(
        _build_apollo, OptimizerDefaults(
            learning_rate=1e-2, has_rank=True, scale=1.0, eps=1e-6,
            scale_types=SCALE_TYPES),
        learning_rate=3e-4, rank=32, scale=5.0),
    "apollo_mini": _recipe(
        _build_apollo_mini, OptimizerDefaults(
            learning_rate=1e-2, rank=1, scale=128.0, eps=1e-6,
            scale_types=("tensor",)),
        learning_rate=3e-4),
    "galore": _recipe(
        _build_galore, OptimizerDefaults(learning_rate=1e-2, has_rank=True,
                                         scale=0.25),
        learning_rate=3e-4, rank=32),
    "adafactor": _recipe(_build_adafactor,
                         OptimizerDefaults(learning_rate=1e-3),
                         has_first_moment=False, learning_rate=2e-5),
}
"""Every optimizer of ``apollo_lm``: adding one is one entry here."""

OPTIMIZER_NAMES: Final[tuple[str, ...]] = tuple(RECIPES)
APOLLO_NAMES: Final[tuple[str, ...]] = tuple(
    name for name, recipe in RECIPES.items() if recipe.pretrain.is_apollo)


def check_name(name: str, flag: str = "optimizer") -> None:
  """Raises a :class:`ConfigError` for ``flag`` unless ``name`` is known."""
  if name not in RECIPES:
    raise ConfigError(flag, f"unknown optimizer {name!r}; allowed: "
                      f"{', '.join(OPTIMIZER_NAMES)}.")


def _check_options(name: str, d: OptimizerDefaults, *, rank: int | None,
                   scale: float | None, scale_type: str | None,
                   projection: str | None, limiter: bool) -> None:
  """Raises a :class:`ConfigError` for an option ``name`` does not take."""
  for option, value, allowed in (("scale_type", scale_type, SCALE_TYPES),
                                 ("projection", projection, PROJECTIONS)):
    if value is None:
      continue
    if not d.is_apollo:
      raise ConfigError(option, f"{name!r} has no {option} (only "
                        f"{' and '.join(APOLLO_NAMES)} do).")
    if value not in allowed:
      raise ConfigError(option, f"unknown value {value!r}; allowed: "
                        f"{', '.join(allowed)}.")
  if scale_type is not None and scale_type not in d.scale_types:
    raise ConfigError(
        "scale_type", f"{name} is {d.scale_types[0]}-wise by definition, got "
        f"{scale_type!r}; for channel-wise rank 1 use optimizer 'apollo' "
        "with rank 1.")
  if not limiter and not d.is_apollo:
    raise ConfigError(
        "limiter", f"{name!r} has no norm-growth limiter to turn off (only "
        f"{' and '.join(APOLLO_NAMES)} do).")
  if rank is not None and not d.has_rank:
    raise ConfigError(
        "rank", f"{name!r} has no rank to set (only "
        f"{' and '.join(n for n, r in RECIPES.items() if r.pretrain.has_rank)}"
        " do; apollo_mini is rank 1).")
  if scale is not None and d.scale is None:
    raise ConfigError("scale", f"{name!r} has no scale to set.")


def resolve_hparams(name: str, config: LlamaConfig, *,
                    learning_rate: float | None = None,
                    rank: int | None = None,
                    scale: float | None = None,
                    scale_type: str | None = None,
                    projection: str | None = None,
                    limiter: bool = True) -> dict[str, Any]:
  """The hyper-parameters ``name`` gets for ``config``, overrides applied.

  Args:
    name: One of :data:`OPTIMIZER_NAMES`; its pre-training defaults
      (:data:`RECIPES`) fill what is None.
    config: The model config; its ``hidden_size`` sets the default rank.
    learning_rate: Peak learning rate; None for the default.
    rank: Projection rank; None for :func:`default_rank`.
    scale: APOLLO/GaLore scale; None for the default.
    scale_type: APOLLO's scaling granularity, ``"channel"`` or ``"tensor"``;
      None for the default (channel for apollo, tensor for apollo_mini).
    projection: APOLLO's projection, ``"gaussian"``, ``"rademacher"`` (the
      fast path's ±1/√r signs, issue 12) or ``"svd"``; None for
      ``"gaussian"``.
    limiter: APOLLO's norm-growth limiter (gamma 1.01) on or off.

  Returns:
    A JSON-serialisable dict with ``learning_rate``, ``rank``, ``scale``,
    ``b1``, ``b2``, ``eps``, ``update_proj_gap``, ``scale_type``,
    ``projection`` and ``limiter`` (None where they do not apply), for logs
    and summaries.

  Raises:
    ConfigError: unknown ``name``, or a rank/scale/APOLLO option for an
      optimizer without it; the message names the option.
  """
  check_name(name)
  d = RECIPES[name].pretrain
  _check_options(name, d, rank=rank, scale=scale, scale_type=scale_type,
                 projection=projection, limiter=limiter)
  if not d.has_rank:
    rank = d.rank
  elif rank is None:
    rank = d.rank if d.rank is not None else default_rank(config.hidden_size)
  if d.is_apollo:
    scale_type = scale_type or d.scale_types[0]
    projection = projection or PROJECTIONS[0]
  return dict(
      learning_rate=d.learning_rate if learning_rate is None else learning_rate,
      rank=rank, scale=d.scale if scale is None else scale,
      b1=d.b1, b2=d.b2, eps=d.eps, update_proj_gap=d.update_proj_gap,
      scale_type=scale_type, projection=projection,
      limiter=limiter if d.is_apollo else None)


def _check_build_options(name: str, recipe: Recipe, *, learning_rate: Any,
                         non_lowrank_lr: float | None, projection_dtype: Any,
                         mu_dtype: Any) -> None:
  if non_lowrank_lr is not None:
    if callable(learning_rate):
      raise ConfigError(
          "non_lowrank_lr", "needs a float learning_rate (or None), not a "
          "schedule, to put the other leaves on the same schedule.")
    if not non_lowrank_lr > 0:
      raise ConfigError("non_lowrank_lr", f"must be > 0, got {non_lowrank_lr}.")
  if projection_dtype is not None and not recipe.pretrain.is_apollo:
    raise ConfigError("projection_dtype", f"{name!r} has no projection (only "
                      f"{' and '.join(APOLLO_NAMES)} do).")
  if mu_dtype is not None and not recipe.has_first_moment:
    raise ConfigError("mu_dtype", f"{name} has no first moment (no "
                      "momentum) whose dtype could be set.")


def make_optimizer(
    name: str,
    *,
    learning_rate: float | optax.Schedule | None = None,
    total_steps: int,
    warmup_steps: int,
    config: LlamaConfig,
    rank: int | None = None,
    scale: float | None = None,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    seed: int = 0,
    scale_type: str | None = None,
    projection: str | None = None,
    limiter: bool = True,
    non_lowrank_lr: float | None = None,
    mu_dtype: Any = None,
    projection_dtype: Any = None,
) -> optax.GradientTransformation:
  """Builds optimizer ``name`` with the paper's schedule and defaults.

  Args:
    name: One of :data:`OPTIMIZER_NAMES`.
    learning_rate: Peak learning rate (a float, wrapped in the warm-up +
      cosine schedule), a schedule used as is, or None for the default peak.
    total_steps: Length of the schedule (including warm-up).
    warmup_steps: Linear warm-up steps.
    config: Model config; sets the default rank (:func:`default_rank`).
    rank: Projection rank of ``apollo``/``galore``; None for the default.
    scale: ``scale`` of ``apollo``/``apollo_mini``/``galore``; None for the
      default.
    weight_decay: Decoupled weight decay on matrices (0 in the paper).
    grad_clip: If set, clip the global gradient norm to it first.
    seed: Seed of APOLLO's random projections.
    scale_type: APOLLO's scaling granularity (``"channel"``/``"tensor"``);
      None for the optimizer's default. For the paper's ablations.
    projection: APOLLO's projection (``"gaussian"``/``"rademacher"``/
      ``"svd"``); None for ``"gaussian"``.
    limiter: False turns APOLLO's norm-growth limiter off.
    non_lowrank_lr: Peak learning rate of the leaves outside
      :func:`apollo_optax.default_lowrank_mask` (embedding, output head,
      norms), on the same schedule; None: the same peak as the rest. The
      official APOLLO code gives those leaves APOLLO's lr (1e-2) while the
      paper's AdamW baseline uses 1e-3 everywhere; this separates the two
      effects. Requires a float ``learning_rate`` or the default. For
      ``apollo``/``apollo_mini`` it is their ``adam_learning_rate`` (the
      same warm-up + cosine schedule at this peak); the other optimizers'
      updates of those leaves are scaled by ``non_lowrank_lr / peak``.
    projection_dtype: input dtype of APOLLO's projection product
      (``jnp.bfloat16``: the fast path of issue 12, float32 accumulation);
      None: the gradient's compute dtype.
    mu_dtype: dtype of the first moments (AdamW, APOLLO's low-rank
      moments, GaLore's Adam); None: optax's default (the parameters'
      dtype for AdamW, at least float32 for APOLLO). Adafactor has none.
  Returns:
    The ``optax.GradientTransformation``.

  Raises:
    ConfigError: unknown ``name``, bad warm-up, or a rank/scale that the
      optimizer does not take.
  """
  check_name(name)
  recipe = RECIPES[name]
  _check_build_options(name, recipe, learning_rate=learning_rate,
                       non_lowrank_lr=non_lowrank_lr,
                       projection_dtype=projection_dtype, mu_dtype=mu_dtype)
  hparams = resolve_hparams(
      name, config, learning_rate=None if callable(learning_rate)
      else learning_rate, rank=rank, scale=scale, scale_type=scale_type,
      projection=projection, limiter=limiter)
  schedule = (learning_rate if callable(learning_rate)
              else make_schedule(hparams["learning_rate"], total_steps,
                                 warmup_steps))
  adam_schedule = (None if non_lowrank_lr is None
                   else make_schedule(non_lowrank_lr, total_steps,
                                      warmup_steps))
  tx = recipe.build(BuildArgs(schedule, hparams, weight_decay, seed,
                              mu_dtype, projection_dtype, adam_schedule))
  if non_lowrank_lr is not None and not recipe.pretrain.is_apollo:
    # APOLLO takes it as its own `adam_learning_rate` (`adam_schedule`); the
    # others have no such split, so their final updates are scaled.
    tx = optax.chain(tx, _scale_non_lowrank(
        non_lowrank_lr / hparams["learning_rate"]))
  if grad_clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx


# ---------------------------------------------------------------------------
# Freezing parts of a model (fine-tuning).

FREEZABLE: Final[dict[str, tuple[str, ...]]] = {
    "embedding": ("embed", "embed_tokens", "wte"),
    "head": ("lm_head",),
}
"""Parts that can be frozen, and the path keys that name their leaves."""


def frozen_mask(params: Any, parts: tuple[str, ...] | list[str]) -> Any:
  """A pytree of bools: True for the leaves of ``params`` in ``parts``.

  A leaf belongs to a part when a key on its path is one of
  ``FREEZABLE[part]`` (``embed/embedding``, ``lm_head/kernel``). Works on any
  subtree (the layer-wise step runs the optimizer per group of leaves).

  Raises:
    ValueError: a part not in :data:`FREEZABLE`.
  """
  unknown = [p for p in parts if p not in FREEZABLE]
  if unknown:
    raise ValueError(f"freeze: unknown part(s) {unknown}; allowed: "
                     f"{', '.join(FREEZABLE)}.")
  keys = {k for p in parts for k in FREEZABLE[p]}

  def frozen(path: Any, _: Any) -> bool:
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return bool(names & keys)

  return jax.tree_util.tree_map_with_path(frozen, params)


def freeze(tx: optax.GradientTransformation,
           parts: tuple[str, ...] | list[str]) -> optax.GradientTransformation:
  """``tx`` on every leaf except those of ``parts``, which stay unchanged.

  ``optax.partition`` with ``optax.set_to_zero()`` on the frozen leaves: they
  get zero updates and no optimizer state, and since their gradients are not
  read, XLA drops the computation of those gradients (e.g. the embedding's
  scatter-add) from a jitted step unless something else reads them.

  Example::

    tx = freeze(apollo_optax.apollo_mini(3e-4), ["embedding"])
  """
  if not parts:
    return tx
  return train_only(
      tx, lambda params: jax.tree.map(lambda f: not f,
                                      frozen_mask(params, parts)))


def train_only(tx: optax.GradientTransformation,
               trainable: Callable[[Any], Any]) -> optax.GradientTransformation:
  """``tx`` on the leaves where ``trainable(params)`` is True; the others get
  zero updates and no optimizer state (their gradients are not read).

  Example (LoRA: only the adapters train)::

    tx = train_only(optax.adamw(1e-4), apollo_lm.lora.adapter_mask)
  """

  def labels(params: Any) -> Any:
    return jax.tree.map(lambda t: "train" if t else "frozen",
                        trainable(params))

  return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)
