"""A float64 NumPy transcription of APOLLOAdamW (apollo-torch 1.0.3).

Written from the issue's steps 1-8 and the official ``APOLLOAdamW.step`` loop,
one matrix at a time, with no shared code from the library except the
projection matrices themselves (drawn by ``projection_for``), which both sides
must agree on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import numpy as np

# projection_for(path, refresh_index, matrix_index, rank, d) -> (rank, d)
ProjectionFor = Callable[[str, int, int, int, int], np.ndarray]


@dataclasses.dataclass
class ReferenceConfig:
  """Hyperparameters; ``adam_lr`` / ``adam_weight_decay`` (None: ``lr`` /
  ``weight_decay``) apply to the leaves outside ``lowrank``; a learning rate
  may be a function of the step index t - 1 (a schedule)."""

  lr: float
  rank: int
  scale_type: str = "channel"
  scale: float = 1.0
  scale_front: bool = False
  gamma: Optional[float] = 1.01
  gap: int = 200
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  weight_decay: float = 0.0
  adam_lr: Union[None, float, Callable[[int], float]] = None
  adam_weight_decay: Optional[float] = None


def _at(lr, step):
  return float(lr(step)) if callable(lr) else lr


class _Matrix:
  """State of one matrix: low-rank moments and the limiter's last norm."""

  def __init__(self):
    self.m = None
    self.v = None
    self.previous_norm = 0.0


def _norm(x, axis=None):
  return np.sqrt(np.sum(np.square(x), axis=axis))


class ReferenceApollo:
  """Runs APOLLO on a dict of float64 arrays.

  ``lowrank`` names the leaves that get APOLLO. A low-rank leaf of shape
  (..., m, n) is a stack of independent matrices over the leading axes.
  """

  def __init__(
      self,
      config: ReferenceConfig,
      params: dict[str, np.ndarray],
      lowrank: set[str],
      projection_for: ProjectionFor,
  ):
    self.c = config
    self.params = {k: np.array(v, np.float64) for k, v in params.items()}
    self.lowrank = lowrank
    self.projection_for = projection_for
    self.t = 0
    self.matrices = {
        k: [_Matrix() for _ in range(int(np.prod(v.shape[:-2])))]
        for k, v in params.items()
        if k in lowrank
    }
    self.adam = {
        k: (np.zeros_like(self.params[k]), np.zeros_like(self.params[k]))
        for k in params
        if k not in lowrank
    }

  def _apollo_direction(self, key, index, g):
    c = self.c
    state = self.matrices[key][index]
    m, n = g.shape
    tall = m >= n
    d = min(m, n)
    r = min(c.rank, d)
    p = self.projection_for(key, (self.t - 1) // c.gap, index, r, d)
    low = g @ p.T if tall else p @ g
    if state.m is None:
      state.m, state.v = np.zeros_like(low), np.zeros_like(low)
    state.m = c.b1 * state.m + (1 - c.b1) * low
    state.v = c.b2 * state.v + (1 - c.b2) * low * low
    normalized = state.m / (np.sqrt(state.v) + c.eps)
    if c.scale_type == "channel":
      axis = 1 if tall else 0
      s = _norm(normalized, axis) / (_norm(low, axis) + 1e-8)
      s = s[:, None] if tall else s[None, :]
    else:
      s = _norm(normalized) / (_norm(low) + 1e-8)
    u = g * s
    if c.scale_front:
      u = u * np.sqrt(c.scale)
    if c.gamma is not None:
      norm = _norm(u)
      if state.previous_norm > 0:
        limit = max(norm / (state.previous_norm + 1e-8), c.gamma) / c.gamma
        u = u / limit
        state.previous_norm = norm / limit
      else:
        state.previous_norm = norm
    if not c.scale_front:
      u = u * np.sqrt(c.scale)
    return u

  def step(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One step; returns the updates (new params minus old)."""
    c = self.c
    self.t += 1
    correction = np.sqrt(1 - c.b2**self.t) / (1 - c.b1**self.t)
    updates = {}
    for key, param in self.params.items():
      g = np.asarray(grads[key], np.float64)
      if key in self.lowrank:
        stack = g.reshape((-1,) + g.shape[-2:])
        direction = np.stack(
            [self._apollo_direction(key, i, stack[i]) for i in range(len(stack))]
        ).reshape(g.shape)
      else:
        mu, nu = self.adam[key]
        mu[...] = c.b1 * mu + (1 - c.b1) * g
        nu[...] = c.b2 * nu + (1 - c.b2) * g * g
        direction = mu / (np.sqrt(nu) + c.eps)
      lr, decay = _at(c.lr, self.t - 1), c.weight_decay
      if key not in self.lowrank:
        if c.adam_lr is not None:
          lr = _at(c.adam_lr, self.t - 1)
        if c.adam_weight_decay is not None:
          decay = c.adam_weight_decay
      updates[key] = -lr * direction * correction - lr * decay * param
    for key in self.params:
      self.params[key] = self.params[key] + updates[key]
    return updates
