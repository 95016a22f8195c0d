"""Worker timing ``apollo_torch.APOLLOAdamW.step()``; runs in ``.venv-torch``.

Started by ``update_speed.py --torch-python``; not a project module (torch
is never a project dependency). argv[1] is a JSON spec of the LLaMA shape
(hidden, intermediate, layers, vocab, rank). The worker builds the same
parameters as ``apollo_lm.model.Llama`` as separate per-layer tensors in
torch layout ``(out, in)``, with fixed random gradients, prints one JSON line
of information, then answers each stdin line ``[variant, calls, warmup]``
with a JSON list of per-call seconds. Each request builds a fresh optimizer,
takes ``warmup`` steps, then times ``calls`` steps.

Variants: ``torch_apollo`` (rank, channel, scale 1, gap 200, random
projection: the paper's APOLLO), ``torch_apollo_mini`` (rank 1, tensor,
scale 128, scale_front) and ``torch_adamw`` (``torch.optim.AdamW``, default
implementation selection).
"""

import json
import sys
import time

import apollo_torch
import torch


def build(spec: dict) -> tuple[list, list]:
  """(low-rank params, other params), gradients attached."""
  d, f, L, V = spec["hidden"], spec["intermediate"], spec["layers"], spec["vocab"]
  gen = torch.Generator().manual_seed(0)

  def tensor(*shape):
    p = torch.nn.Parameter(0.02 * torch.randn(*shape, generator=gen))
    p.grad = 1e-3 * torch.randn(*shape, generator=gen)
    return p

  lowrank, other = [], [tensor(V, d), tensor(V, d), tensor(d)]
  for _ in range(L):
    lowrank += [tensor(d, d) for _ in range(4)]
    lowrank += [tensor(f, d), tensor(f, d), tensor(d, f)]
    other += [tensor(d), tensor(d)]
  return lowrank, other


def make(variant: str, lowrank: list, other: list, rank: int):
  """A fresh optimizer of ``variant`` over the parameters."""
  if variant == "torch_adamw":
    return torch.optim.AdamW(lowrank + other, lr=1e-3, weight_decay=0.0)
  mini = variant == "torch_apollo_mini"
  group = {"params": lowrank, "rank": 1 if mini else rank, "proj": "random",
           "scale_type": "tensor" if mini else "channel",
           "scale": 128.0 if mini else 1.0, "update_proj_gap": 200,
           "proj_type": "std"}
  return apollo_torch.APOLLOAdamW(
      [{"params": other}, group], lr=1e-3, scale_front=mini)


def main() -> None:
  spec = json.loads(sys.argv[1])
  lowrank, other = build(spec)
  print(json.dumps({"torch_version": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "params": sum(p.numel() for p in lowrank + other)}),
        flush=True)
  for line in sys.stdin:
    variant, calls, warmup = json.loads(line)
    with torch.no_grad():
      for p in lowrank + other:
        p.normal_(0.0, 0.02)
    opt = make(variant, lowrank, other, spec["rank"])
    for _ in range(warmup):
      opt.step()
    times = []
    for _ in range(calls):
      t0 = time.perf_counter()
      opt.step()
      times.append(time.perf_counter() - t0)
    del opt
    print(json.dumps(times), flush=True)


if __name__ == "__main__":
  main()
