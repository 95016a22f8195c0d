"""One process of a multi-process APOLLO training run on CPU devices.

Trains a small LLaMA-block-shaped parameter tree for a few steps on a mesh of
all global devices (8 = processes x local devices) and prints the losses as
the last line of stdout, as JSON. Data and initialisation are deterministic,
so any number of processes must print the same losses.

Usage (two processes, each with 4 CPU devices)::

  python multihost_worker.py --coordinator localhost:12345 --num-processes 2 --process-id 0
  python multihost_worker.py --coordinator localhost:12345 --num-processes 2 --process-id 1
"""

import argparse
import json

import jax

TOTAL_DEVICES = 8
STEPS = 5
SHAPES = {
    "attn/q_proj/kernel": (2, 32, 32),
    "mlp/gate_proj/kernel": (2, 32, 64),
    "mlp/down_proj/kernel": (2, 64, 32),
    "attn_norm/scale": (2, 32),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--process-id", type=int, required=True)
  args = parser.parse_args()
  jax.config.update("jax_num_cpu_devices", TOTAL_DEVICES // args.num_processes)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(args.coordinator, args.num_processes,
                             args.process_id)

  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import numpy as np
  import optax
  import apollo_optax

  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
  specs = {k: P(None, "fsdp", "tensor") if len(s) == 3 else P(None, "fsdp")
           for k, s in SHAPES.items()}
  rng = np.random.default_rng(0)
  full = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  shardings = {k: NamedSharding(mesh, specs[k]) for k in SHAPES}
  params = {
      k: jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i])
      for k, v in full.items()
  }
  tx = apollo_optax.apollo(1e-2, rank=8, weight_decay=0.1)
  state = jax.jit(tx.init, out_shardings=apollo_optax.state_shardings(tx, params))(
      params)

  def loss_fn(params):
    return sum(jnp.sum(0.5 * p**2 + jnp.cos(3.0 * p)) for p in jax.tree.leaves(params))

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(STEPS):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  print(json.dumps({"losses": losses, "devices": jax.device_count(),
                    "local_devices": jax.local_device_count()}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
