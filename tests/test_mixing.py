"""mixup and CutMix (resnet_jax.mixing): images that mix as specified, targets that sum to one
and say how much of each image is in the mix, and a train step that uses them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj
from configs import imagenet
from resnet_jax import config as config_lib
from resnet_jax import mixing, optim, steps
from resnet_jax.train_state import create_train_state

N, H, W, C = 8, 12, 10, 4


def _constant_images(dtype=jnp.float32):
    """Image i is filled with the value i + 1: a pixel says which image it came from."""
    return jnp.broadcast_to(jnp.arange(1, N + 1, dtype=dtype)[:, None, None, None], (N, H, W, 3))


LABELS = jnp.arange(N) % C  # partners (i, N-1-i) have different labels: 8 - 1 - i != i mod 4


def _own_share(targets):
    """The weight of each example's own label in its target."""
    return np.asarray(targets)[np.arange(N), np.asarray(LABELS)]


def test_mixup_blends_each_image_with_its_partner_by_its_target_weight():
    cfg = mixing.MixConfig(mixup_alpha=0.4)
    images, targets = mixing.mix_batch(_constant_images(), LABELS, jax.random.key(0), cfg, C)
    np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, rtol=1e-5)
    lam = _own_share(targets)
    partner = N - np.arange(N)  # the value of image N - 1 - i
    np.testing.assert_allclose(
        np.asarray(images)[:, 0, 0, 0], lam * np.arange(1, N + 1) + (1 - lam) * partner, rtol=1e-5
    )
    assert np.ptp(np.asarray(images), axis=(1, 2, 3)).max() == 0  # a blend is uniform
    assert len(set(np.round(lam, 6))) > 1  # each example draws its own weight
    np.testing.assert_allclose(
        np.asarray(targets)[np.arange(N), np.asarray(LABELS[::-1])], 1 - lam, rtol=1e-5
    )


def test_cutmix_pastes_one_box_of_the_partner_whose_area_is_the_partner_weight():
    cfg = mixing.MixConfig(cutmix_alpha=1.0)
    images, targets = mixing.mix_batch(_constant_images(), LABELS, jax.random.key(1), cfg, C)
    images, targets = np.asarray(images)[..., 0], np.asarray(targets)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
    for i in range(N):
        own = images[i] == i + 1
        pasted = images[i] == N - i
        assert (own | pasted).all()
        np.testing.assert_allclose(own.mean(), targets[i, LABELS[i]], rtol=1e-5)
        if pasted.any():  # one axis-aligned box
            rows, cols = np.nonzero(pasted)
            box = pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all() and box.sum() == pasted.sum()
    assert 0 < np.mean([(images[i] != i + 1).mean() for i in range(N)]) < 1


def test_with_both_each_example_is_either_blended_or_boxed():
    cfg = mixing.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, cutmix_prob=0.5)
    images, targets = mixing.mix_batch(
        _constant_images(), LABELS, jax.random.key(2), cfg, C, label_smoothing=0.1
    )
    images, targets = np.asarray(images)[..., 0], np.asarray(targets)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
    kinds = set()
    for i in range(N):
        values = set(np.unique(images[i]).tolist())
        if values <= {i + 1.0, N - i * 1.0}:
            kinds.add('cutmix')
        else:
            assert len(values) == 1, values  # a blend: one value between the two
            kinds.add('mixup')
    assert kinds == {'cutmix', 'mixup'}
    # Label smoothing applies to both one-hots: every class keeps 0.1 / C.
    assert targets.min() >= 0.1 / C - 1e-7


def test_uint8_images_stay_uint8_and_off_changes_nothing():
    cfg = mixing.MixConfig(mixup_alpha=0.4)
    images, _ = mixing.mix_batch(_constant_images(jnp.uint8), LABELS, jax.random.key(0), cfg, C)
    assert images.dtype == jnp.uint8
    off = mixing.MixConfig()
    assert not off.enabled
    same, targets = mixing.mix_batch(_constant_images(), LABELS, jax.random.key(0), off, C)
    np.testing.assert_array_equal(same, _constant_images())
    np.testing.assert_array_equal(targets, jax.nn.one_hot(LABELS, C))


@pytest.mark.slow  # two train-step compiles
def test_the_train_step_mixes_with_a_key_of_its_step():
    model = rj.create_model('resnet20', num_classes=C)
    shape = (8, 8, 3)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    tx, schedule = optim.create_optimizer(
        optim.OptimizerConfig(), params, total_steps=10, steps_per_epoch=5
    )
    state = create_train_state(model, tx, 0, shape)
    batch = {'image': jax.random.normal(jax.random.key(3), (N, *shape)), 'label': LABELS}
    mixed = jax.jit(
        steps.make_train_step(
            model, tx, schedule, steps.StepOptions(mix=mixing.MixConfig(1.0, 1.0))
        )
    )
    plain = jax.jit(steps.make_train_step(model, tx, schedule))
    _, first = mixed(state, batch)
    _, again = mixed(state, batch)
    _, unmixed = plain(state, batch)
    assert float(first['loss']) == float(again['loss'])  # resumable: a pure function of the state
    assert float(first['loss']) != float(unmixed['loss'])
    _, next_step = mixed(state.replace(step=state.step + 1), batch)
    assert float(next_step['loss']) != float(first['loss'])  # another step, another mix


def test_the_modern_imagenet_recipe_mixes():
    config = imagenet.get_config('resnet50,modern')
    assert config.mixup_alpha > 0 and config.cutmix_alpha > 0
    assert imagenet.get_config('resnet50').mixup_alpha == 0  # the paper's does not


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('mixup_alpha', '-0.2', 'mixup_alpha=-0.2; expected a finite number >= 0 (0: off)'),
        ('cutmix_alpha', '-1.0', 'cutmix_alpha=-1.0; expected a finite number >= 0 (0: off)'),
        # Inf passes `>= 0`, then Beta(inf, inf) draws NaN mixing weights; NaN passes nothing.
        ('mixup_alpha', float('inf'), 'mixup_alpha=inf; expected a finite number >= 0 (0: off)'),
        ('cutmix_alpha', float('nan'), 'cutmix_alpha=nan; expected a finite number >= 0 (0: off)'),
        ('cutmix_prob', '1.5', 'cutmix_prob=1.5; expected [0, 1]'),
        ('cutmix_prob', float('nan'), 'cutmix_prob=nan; expected [0, 1]'),
    ],
)
def test_bad_mixing_fields_are_one_clear_error(field, value, message):
    config = config_lib.base_config()
    config_lib.apply_overrides(config, {field: value})
    with pytest.raises(ValueError, match=re.escape(f'invalid config: {message}')):
        config_lib.validate(config, device_count=1, process_count=1)
