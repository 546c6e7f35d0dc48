"""Losses, accuracies, masked sums, and the metric writers (JSONL and TensorBoard).

Writers write on process 0 only; every other process gets a no-op writer, so callers never
branch on the process index.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits, targets)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits, per example.

    Counts the logits above the label's instead of sorting (lax.top_k): the same answer
    except for exact ties, which count in the label's favour, at a fraction of the cost.
    """
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)


class MetricWriter:
    """Appends `{'step': s, **metrics}` lines to workdir/metrics.jsonl and TensorBoard files."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, 'metrics.jsonl')
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        with open(self.path, 'a') as f:
            f.write(json.dumps({'step': int(step), **values}) + '\n')
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
