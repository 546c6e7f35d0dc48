"""The whole training state as one explicit pytree, and its creation.

`TrainState(step, params, batch_stats, opt_state, rng, ema)` is everything a step reads and
writes: checkpoint it and training resumes exactly. `ema`, present when the config asks for a
moving average of the model (`optimizer.ema_decay`), averages the parameters and the BatchNorm
statistics alike, so the averaged model is a whole model that evaluation and export use.

It is created by a pure function so the trainer can `jax.eval_shape` it, derive shardings, and
build it directly on the devices with `jax.jit(create, out_shardings=...)` (never on one device
first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import jax
import optax

from resnet_jax import models


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics, float32
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key; the key of step s is fold_in(rng, s)
    ema: Any = None  # {'params', 'batch_stats'}: their moving averages, or None

    def variables(self) -> dict[str, Any]:
        return {'params': self.params, 'batch_stats': self.batch_stats}

    def eval_variables(self) -> dict[str, Any]:
        """What evaluation and export use: the moving average where the run keeps one."""
        return dict(self.ema) if self.ema is not None else self.variables()


def create_train_state(
    model: models.ResNet,
    tx: optax.GradientTransformation,
    seed: int,
    image_shape: Sequence[int],
    *,
    ema: bool = False,
) -> TrainState:
    """Initial state: parameters from `seed`, fresh optimizer state, step 0; with `ema`, the
    moving average starts at the initial model."""
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    variables = models.init_variables(model, init_rng, image_shape)
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        opt_state=tx.init(variables['params']),
        rng=state_rng,
        ema=dict(variables) if ema else None,
    )
