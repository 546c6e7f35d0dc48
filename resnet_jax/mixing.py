"""mixup and CutMix: examples mixed in pairs on the device, and their labels with them.

mixup (Zhang et al., 2018) blends two images, x = lam * x_i + (1 - lam) * x_j; CutMix (Yun et
al., 2019) pastes a box of x_j into x_i, lam being the share of x_i's pixels left. Either way
the target is lam * onehot(y_i) + (1 - lam) * onehot(y_j), and the loss is the cross-entropy
with that soft target. Each example i is paired with example n - 1 - i of the batch (the batch
reversed, as timm does: no extra randomness to keep and no gather), and draws its own lam
from Beta(alpha, alpha) and, with both enabled, its own choice between the two.

Everything here runs inside the jitted train step, on the batch as it is sharded, with a key
from the step's own (so a resumed run mixes exactly as an uninterrupted one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from resnet_jax.metrics import smooth_one_hot


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """`config.mixup_alpha`, `config.cutmix_alpha`, `config.cutmix_prob`; alpha 0 turns one off."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_prob: float = 0.5  # with both on: the chance an example is CutMixed, else mixed up

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _beta(key: jax.Array, alpha: float, n: int) -> jax.Array:
    return jax.random.beta(key, alpha, alpha, (n,)) if alpha > 0 else jnp.ones((n,))


def cutmix_masks(key: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
    """Per example, True where its own pixels stay: all but one box of about (1 - lam) of the
    area (sides sqrt(1 - lam) of the image's), centred uniformly and clipped at the borders."""
    n = lam.shape[0]
    cy_key, cx_key = jax.random.split(key)
    cy = jax.random.randint(cy_key, (n,), 0, height)
    cx = jax.random.randint(cx_key, (n,), 0, width)
    cut = jnp.sqrt(1.0 - lam)
    half_h = jnp.round(cut * height / 2).astype(jnp.int32)
    half_w = jnp.round(cut * width / 2).astype(jnp.int32)
    top, bottom = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
    left, right = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    box = (
        (rows >= top[:, None, None])
        & (rows < bottom[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < right[:, None, None])
    )
    return ~box


def mix_batch(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    cfg: MixConfig,
    num_classes: int,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """(mixed images, soft targets of shape (n, num_classes), each row summing to one).

    Images keep their dtype (a mixed uint8 batch is rounded); lam is the share of the example's
    own pixels, so with CutMix it is the box's actual area after clipping, not the draw.
    """
    n, height, width = images.shape[:3]
    partner_images, partner_labels = images[::-1], labels[::-1]
    kind_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 4)
    use_cutmix = jnp.zeros((n,), bool)
    if cfg.cutmix_alpha > 0:
        use_cutmix = (
            jax.random.bernoulli(kind_key, cfg.cutmix_prob, (n,))
            if cfg.mixup_alpha > 0
            else jnp.ones((n,), bool)
        )
    lam_mixup = _beta(mixup_key, cfg.mixup_alpha, n)
    keep = cutmix_masks(box_key, _beta(cutmix_key, cfg.cutmix_alpha, n), height, width)
    lam_cutmix = keep.mean(axis=(1, 2))
    lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)

    compute = jnp.promote_types(images.dtype, jnp.float32)
    x, partner = images.astype(compute), partner_images.astype(compute)
    blended = lam_mixup[:, None, None, None] * x + (1 - lam_mixup[:, None, None, None]) * partner
    pasted = jnp.where(keep[..., None], x, partner)
    mixed = jnp.where(use_cutmix[:, None, None, None], pasted, blended)
    if jnp.issubdtype(images.dtype, jnp.integer):
        mixed = jnp.round(mixed)
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    partner_targets = smooth_one_hot(partner_labels, num_classes, label_smoothing)
    soft = lam[:, None] * targets + (1 - lam[:, None]) * partner_targets
    return mixed.astype(images.dtype), soft
