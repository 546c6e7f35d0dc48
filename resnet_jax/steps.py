"""train_step and eval_step: pure functions, the only training code that is jitted.

    train_step(state, batch) -> (state, metrics)   batch = {'image', 'label'}
    eval_step(state, batch) -> sums                batch = {'image', 'label', 'mask'}

The trainer jits each once with explicit shardings. Its batches hold uint8 images, and the
steps' `normalize` (the input pipeline's `preprocessing.Preprocess.normalize`) turns them into the
network's float input on the device; without one, the images must be float already. Metrics
come back as device scalars; the caller fetches them late so the host never waits on the
accelerator between steps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from resnet_jax import metrics, mixing, models, xla_cpu
from resnet_jax.train_state import TrainState

Batch = dict[str, jax.Array]
Normalize = Callable[[jax.Array], jax.Array]  # uint8 images -> float32 network input
# mixup/CutMix draw from fold_in(fold_in(state.rng, step), MIX_STREAM): a key per step, so
# a resumed run mixes as an uninterrupted one, apart from any other use of the step's key.
MIX_STREAM = 2


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How a train step treats its batch, beyond the model and the optimizer.

    Attributes:
      label_smoothing: each one-hot target moved this far towards the uniform distribution.
      bn_group_size: 0 normalises with the statistics of the whole global batch (SyncBN, the
        default under jit). N > 0 splits the batch into consecutive groups of N examples, each
        normalised with its own statistics (the paper's per-GPU BN when N is the per-device
        batch; "ghost" BN for large batches); running statistics are averaged over groups.
        Groups never straddle devices when the per-device batch is a multiple of N.
      skip_nonfinite: on a non-finite loss or gradient, keep the parameters, BatchNorm
        statistics and optimizer state as they were (the step counter still advances, so the
        data and the schedule stay aligned). Otherwise the update is applied, and the caller
        must not save what follows.
      ema_decay: with a state that keeps `ema`, ema = decay * ema + (1 - decay) * the new
        parameters and BatchNorm statistics, after every step.
      mix: mixup and/or CutMix of the batch (resnet_jax.mixing), with a key of the step's own;
        the loss is then that of the mixed targets, the accuracies of the original labels.
    """

    label_smoothing: float = 0.0
    bn_group_size: int = 0
    skip_nonfinite: bool = False
    ema_decay: float = 0.0
    mix: mixing.MixConfig | None = None

    @classmethod
    def of(cls, config: Any) -> StepOptions:
        """The options an experiment config sets."""
        return cls(
            label_smoothing=config.label_smoothing,
            bn_group_size=config.bn_group_size,
            skip_nonfinite=config.nonfinite == 'skip',
            ema_decay=config.optimizer.ema_decay,
            mix=mixing.MixConfig(config.mixup_alpha, config.cutmix_alpha, config.cutmix_prob),
        )


def make_train_step(
    model: models.ResNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    options: StepOptions = StepOptions(),
    *,
    normalize: Normalize | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The train step of `model` under `tx`, with `options` (`StepOptions`).

    Its metrics always include `nonfinite`: 1.0 where the loss or the gradients hold a NaN or
    an Inf (the trainer stops there, or counts the skip), else 0.0.

    Args:
      normalize: turns the batch's uint8 images into the network's input (before mixing);
        None: the images are that input already.
    """
    label_smoothing, bn_group_size = options.label_smoothing, options.bn_group_size
    skip_nonfinite, ema_decay, mix = options.skip_nonfinite, options.ema_decay, options.mix
    forward = functools.partial(train_forward, model, bn_group_size=bn_group_size)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        check_batch(batch)
        images = model_input(batch['image'], normalize)
        targets = metrics.smooth_one_hot(batch['label'], model.num_classes, label_smoothing)
        if mix is not None and mix.enabled:
            key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), MIX_STREAM)
            images, targets = mixing.mix_batch(
                images, batch['label'], key, mix, model.num_classes, label_smoothing
            )

        def loss_fn(params):
            variables = {'params': params, 'batch_stats': state.batch_stats}
            logits, batch_stats = forward(variables, images)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # the norm is NaN if any is
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        if state.ema is not None:
            average = lambda e, new: ema_decay * e + (1 - ema_decay) * new
            new_state = new_state.replace(
                ema=jax.tree.map(average, state.ema, new_state.variables())
            )
        if skip_nonfinite:
            new_state = _keep_where_finite(finite, new_state, state)
        step_metrics = {
            'loss': loss,
            'top1_acc': metrics.top_k_correct(logits, batch['label'], 1).mean(),
            'top5_acc': metrics.top_k_correct(logits, batch['label'], 5).mean(),
            'learning_rate': schedule(state.step),
            'grad_norm': grad_norm,
            'nonfinite': 1.0 - finite.astype(jnp.float32),
        }
        return new_state, step_metrics

    return train_step


def make_multi_step(train_step: Callable) -> Callable:
    """K train steps in one call: `multi_step(state, batches)` scans `train_step` over batches
    stacked on a leading axis of K, and returns the state after the last and the metrics of
    each step stacked the same way. One dispatch and one host round trip per K steps, for
    steps so short (CIFAR nets on an accelerator) that the host's per-step work would dominate.
    """

    def multi_step(state: TrainState, batches: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        # XLA's CPU backend runs the gradient convolutions of a loop body as naive loops, 10x
        # slower: there the K steps are unrolled, compiling K copies of the step (xla_cpu).
        return jax.lax.scan(train_step, state, batches, unroll=xla_cpu.unroll_loops())

    return multi_step


def check_batch(batch: Batch, *, masked: bool = False) -> None:
    """The step's boundary: NHWC images, integer labels, (a mask) for the same examples. Shapes
    and dtypes are static under jit, so this costs nothing per step; a pipeline that hands the
    step something else fails at trace time, naming what it got."""
    chex.assert_rank(batch['image'], 4)
    chex.assert_rank(batch['label'], 1)
    chex.assert_type(batch['label'], int)
    arrays = [batch['image'], batch['label'], *([batch['mask']] if masked else [])]
    chex.assert_equal_shape_prefix(arrays, prefix_len=1)


def model_input(images: jax.Array, normalize: Normalize | None) -> jax.Array:
    """The network's input from a batch's images (the model casts it to its compute dtype)."""
    return images if normalize is None else normalize(images)


def train_forward(
    model: models.ResNet, variables: dict[str, Any], images: jax.Array, *, bn_group_size: int = 0
) -> tuple[jax.Array, Any]:
    """Train-mode logits and new BatchNorm statistics, of the whole batch or of its groups of
    `bn_group_size` examples (statistics averaged over the groups)."""
    if not bn_group_size:
        return models.apply_model(model, variables, images, train=True)
    groups = images.reshape(-1, bn_group_size, *images.shape[1:])
    logits, stats = jax.vmap(lambda x: models.apply_model(model, variables, x, train=True))(groups)
    return logits.reshape(-1, logits.shape[-1]), jax.tree.map(lambda x: x.mean(0), stats)


def _keep_where_finite(finite: jax.Array, new: TrainState, old: TrainState) -> TrainState:
    """`new` where the step was finite, else `old` (the step counter advances either way)."""
    keep = lambda n, o: jnp.where(finite, n, o)
    return new.replace(
        params=jax.tree.map(keep, new.params, old.params),
        batch_stats=jax.tree.map(keep, new.batch_stats, old.batch_stats),
        opt_state=jax.tree.map(keep, new.opt_state, old.opt_state),
        ema=jax.tree.map(keep, new.ema, old.ema),
    )


def make_eval_step(
    model: models.ResNet, normalize: Normalize | None = None
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """eval_step(state, batch): masked sums, so padded examples count for nothing.

    Evaluates `state.eval_variables()`: the moving average of the model where the run keeps one.
    `normalize` as for `make_train_step`.
    """

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        check_batch(batch, masked=True)
        images = model_input(batch['image'], normalize)
        logits, _ = models.apply_model(model, state.eval_variables(), images, train=False)
        mask = batch['mask'].astype(jnp.float32)
        return {
            'loss': jnp.sum(metrics.cross_entropy(logits, batch['label']) * mask),
            'top1_correct': jnp.sum(metrics.top_k_correct(logits, batch['label'], 1) * mask),
            'top5_correct': jnp.sum(metrics.top_k_correct(logits, batch['label'], 5) * mask),
            'num_examples': jnp.sum(mask),
        }

    return eval_step
