"""Losses, accuracies, masked sums, and the metric writers (JSONL and TensorBoard).

Writers write on process 0 only; every other process gets a no-op writer, so callers never
branch on the process index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import paths

logger = logging.getLogger('resnet_jax')


def smooth_one_hot(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """One-hot targets, each moved `label_smoothing` of the way to the uniform distribution."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
    return targets


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = smooth_one_hot(labels, logits.shape[-1], label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label's logit is strictly above all but at most k - 1 others, per example.

    Counts the logits at or above the label's instead of sorting (lax.top_k), at a fraction of
    the cost. A tie counts against the label (a model that outputs equal logits for every class
    has not classified anything), and so does a NaN or an Inf anywhere in the row: a collapsed
    or diverged model scores 0, never 100% (an Inf at the label is above every finite logit).
    """
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    at_or_above = jnp.sum(logits >= label_logit, axis=-1) - 1  # the label itself excluded
    finite_row = jnp.all(jnp.isfinite(logits), axis=-1)
    return ((at_or_above < k) & finite_row).astype(jnp.float32)


class MetricWriter:
    """Appends `{'step': s, **metrics}` lines to workdir/metrics.jsonl and TensorBoard files.

    Exactly once per step, whatever interrupted the run before: a run that resumes from the
    checkpoint of step N first drops every record after N (written after that checkpoint by
    the run that was interrupted; the resumed run writes them again) and any cut-off last line,
    and tells TensorBoard to discard its events after N (`purge_step`). Every append is one
    whole line.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = paths.join(workdir, 'metrics.jsonl')
        self._tensorboard = None
        self._tensorboard_upload: tuple[str, str] | None = None
        self._records: list[dict[str, Any]] = []
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._records = _truncate_after(self.path, resume_step)
            events_dir = paths.join(workdir, 'tensorboard')
            if paths.is_url(workdir):
                # tensorboardX's own gs:// writer needs google-cloud-storage credentials of its
                # own and re-uploads the file on every flush anyway: the events are written to
                # a local staging folder and the file is copied up after each write.
                staging = tempfile.mkdtemp(prefix='resnet_jax-tensorboard-')
                self._tensorboard_upload = (staging, events_dir)
                events_dir = staging
            self._tensorboard = SummaryWriter(events_dir, purge_step=resume_step + 1)

    def recorded(self, step: int, prefix: str) -> dict[str, float]:
        """The values under `prefix` already written at `step` (empty if none)."""
        found: dict[str, float] = {}
        for r in self._records:
            if r['step'] == step:
                found.update({k: v for k, v in r.items() if k.startswith(prefix)})
        return found

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {'step': int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
        self._records.append(record)
        line = json.dumps(record) + '\n'
        # One append locally (a crash cuts at most this line); on an object store, which cannot
        # append, the object is replaced whole.
        paths.append_text(
            self.path, line, whole=lambda: ''.join(json.dumps(r) + '\n' for r in self._records)
        )
        for key, value in record.items():
            if key != 'step':
                self._tensorboard.add_scalar(key, value, int(step))
        if self._tensorboard_upload:
            self._upload_tensorboard()

    def _upload_tensorboard(self) -> None:
        self._tensorboard.flush()
        staging, target = self._tensorboard_upload
        for name in os.listdir(staging):
            paths.upload(os.path.join(staging, name), paths.join(target, name))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            if self._tensorboard_upload:
                self._upload_tensorboard()
                shutil.rmtree(self._tensorboard_upload[0], ignore_errors=True)
            self._tensorboard = None


def _truncate_after(path: str, step: int) -> list[dict[str, Any]]:
    """Rewrites `path` without the records after `step` or unreadable lines; returns the rest."""
    try:
        text = paths.read_text(path)
    except FileNotFoundError:
        return []
    kept, dropped, bad = [], 0, []
    for number, line in enumerate(text.splitlines(), 1):
        record = _parse_line(line)
        if record is None:
            if line.strip():
                bad.append(number)
        elif record['step'] > step:
            dropped += 1
        else:
            kept.append(record)
    if dropped or bad or (text and not text.endswith('\n')):
        logger.warning(
            '%s: dropped %d records after step %d (the run was interrupted after writing them; '
            'they are written again) and %d unreadable lines %s',
            path,
            dropped,
            step,
            len(bad),
            bad[:5],
        )
        paths.write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))
    return kept


def _parse_line(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get('step'), int):
        return None
    return record


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file; a line that is not a record is skipped with a
    warning naming it (a run killed mid-write leaves a cut-off last line).

    Raises:
      ValueError: naming the file if it cannot be read.
    """
    try:
        lines = paths.read_text(path).splitlines()
    except OSError as e:
        raise ValueError(f'cannot read {path}: {e.strerror or e}') from None
    records = []
    for number, line in enumerate(lines, 1):
        record = _parse_line(line)
        if record is not None:
            records.append(record)
        elif line.strip():
            logger.warning('%s line %d is not a metrics record; skipped: %.80r', path, number, line)
    return records
