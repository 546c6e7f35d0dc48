"""resnet_jax.config.validate and optim.check_config: values that pass a naive check and then
mislead (an infinite learning rate, a NaN mixing alpha, boundaries that merge or come before
the first step, accumulation that drops micro-batches) are one clear error before anything
runs. The plain out-of-range cases are in tests/test_trainer.py and the CLI's tests."""

import math
import re

import pytest

from configs import cifar10, imagenet
from resnet_jax import config as config_lib
from resnet_jax import optim

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    'overrides, message',
    [
        (
            {'optimizer.learning_rate': INF},
            'optimizer.learning_rate=inf; expected a finite number > 0',
        ),
        (
            {'optimizer.learning_rate': NAN},
            'optimizer.learning_rate=nan; expected a finite number > 0',
        ),
        (
            {'optimizer.weight_decay': INF},
            'optimizer.weight_decay=inf; expected a finite number >= 0',
        ),
        (
            {'optimizer.grad_clip_norm': INF},
            'optimizer.grad_clip_norm=inf; expected a finite number >= 0 (0: off)',
        ),
        ({'optimizer.momentum': 1.0}, 'optimizer.momentum=1.0; expected a number in [0, 1)'),
        ({'optimizer.momentum': -0.9}, 'optimizer.momentum=-0.9; expected a number in [0, 1)'),
        ({'optimizer.momentum': NAN}, 'optimizer.momentum=nan; expected a number in [0, 1)'),
        ({'optimizer.ema_decay': NAN}, 'optimizer.ema_decay=nan; expected a number in [0, 1)'),
        (
            {'optimizer.decay_factor': 0.0},
            'optimizer.decay_factor=0.0; expected a finite number > 0',
        ),
        ({'optimizer.decay_factor': -0.1}, 'optimizer.decay_factor=-0.1; expected a finite'),
        (
            {'optimizer.warmup_learning_rate': -0.01},
            'optimizer.warmup_learning_rate=-0.01; expected a finite number >= 0',
        ),
        (
            {'optimizer.backbone_lr_multiplier': INF},
            'optimizer.backbone_lr_multiplier=inf; expected a finite number >= 0',
        ),
        ({'label_smoothing': NAN}, 'label_smoothing=nan; expected [0, 1)'),
        (
            {'optimizer.boundaries': (32_000, 32_000)},
            'optimizer.boundaries=(32000, 32000); expected increasing values, each once',
        ),
        (
            {'optimizer.boundaries': (48_000, 32_000)},
            'optimizer.boundaries=(48000, 32000); expected increasing values, each once',
        ),
        ({'optimizer.boundaries': (0, 32_000)}, 'optimizer.boundaries has 0; expected steps >= 1'),
        (
            {'optimizer.boundaries': (300, 32_000), 'optimizer.warmup_steps': 400},
            'optimizer.boundaries has 300; expected steps >= 400 (after step 0 and the warm-up',
        ),
        (
            {'optimizer.boundaries_epochs': (0.0,)},
            'optimizer.boundaries_epochs has 0.0; expected epochs > 0',
        ),
        (
            {'optimizer.boundaries_epochs': (90.0, 30.0)},
            'optimizer.boundaries_epochs=(90.0, 30.0); expected increasing values, each once',
        ),
        (
            {'optimizer.boundaries_epochs': (INF,)},
            'optimizer.boundaries_epochs=(inf,); expected a tuple of finite numbers',
        ),
        # XLA made a cache folder named ' ' in the current directory.
        ({'compilation_cache_dir': ' '}, "compilation_cache_dir ' ' is blank; expected a path"),
        (
            {'init_from': ' /w/resnet20.pth'},
            "init_from ' /w/resnet20.pth' begins or ends with whitespace; expected a path",
        ),
        (
            {'dataset.data_dir': '/data/tfds\n'},
            "dataset.data_dir '/data/tfds\\n' begins or ends with whitespace",
        ),
        (
            {'optimizer.accumulate_steps': 3},
            'optimizer.accumulate_steps=3 does not divide total_steps=64000: the last 1 '
            'micro-batches would never be applied',
        ),
    ],
)
def test_values_that_would_mislead_are_refused(overrides, message):
    config = cifar10.get_config('resnet20')
    config_lib.apply_overrides(config, overrides)
    with pytest.raises(ValueError, match=f'^{re.escape(f"invalid config: {message}")}'):
        config_lib.validate(config, device_count=8, process_count=1)


def test_boundaries_in_epochs_must_not_merge_with_others_or_come_first():
    """Epochs become steps only where the epoch's length is known (the schedule is built
    before the workdir is touched); a repeat would decay once instead of twice."""
    cfg = optim.OptimizerConfig(boundaries=(702,), boundaries_epochs=(2,))
    with pytest.raises(ValueError, match=re.escape('give the steps [702, 702]: [702] twice')):
        optim.learning_rate_schedule(cfg, total_steps=2000, steps_per_epoch=351)
    cfg = optim.OptimizerConfig(boundaries=(), boundaries_epochs=(0.001,))
    with pytest.raises(ValueError, match=re.escape('give the steps [0]: [0] before step 1')):
        optim.learning_rate_schedule(cfg, total_steps=2000, steps_per_epoch=351)
    cfg = optim.OptimizerConfig(boundaries=(600,), boundaries_epochs=(2,))
    schedule = optim.learning_rate_schedule(cfg, total_steps=2000, steps_per_epoch=351)
    assert [float(schedule(s)) for s in (599, 600, 701, 702)] == pytest.approx(
        [0.1, 0.01, 0.01, 0.001]
    )


def test_the_shipped_configs_still_validate():
    for name in ('resnet20', 'resnet110', 'plain56'):
        config_lib.validate(cifar10.get_config(name), device_count=8, process_count=1)


def test_a_batchnorm_span_that_straddles_devices_is_refused_unless_asked_for():
    """The ImageNet configs' span of 32 at batch 4096 on a v5e-256 (16 images per chip) passed
    before and compiled into collectives in every BatchNorm layer (docs/scaling.md)."""
    config = imagenet.get_config('resnet50')
    config_lib.apply_overrides(config, {'batch_size': 4096})
    message = (
        'invalid config: bn_group_size=32 straddles devices: batch_size=4096 over 256 devices '
        'is 16 examples per device, not a multiple of 32; expected a bn_group_size that '
        'divides 16 (0: global statistics), or bn_span_across_devices=True to accept the '
        'collectives in every BatchNorm layer it costs (docs/scaling.md)'
    )
    with pytest.raises(ValueError, match=f'^{re.escape(message)}$'):
        config_lib.validate(config, device_count=256, process_count=64)
    config_lib.validate(config, device_count=32, process_count=8)  # 128 per device: inside
    # Groups of 8 over 12 examples per device straddle device boundaries unevenly.
    config_lib.apply_overrides(config, {'batch_size': 96, 'bn_group_size': 8})
    with pytest.raises(ValueError, match='is 12 examples per device, not a multiple of 8'):
        config_lib.validate(config, device_count=8, process_count=1)
    for overrides in ({'bn_span_across_devices': True}, {'bn_group_size': 0}):
        ok = imagenet.get_config('resnet50')
        config_lib.apply_overrides(ok, {'batch_size': 4096, **overrides})
        config_lib.validate(ok, device_count=256, process_count=64)


def test_an_eval_batch_smaller_than_the_devices_is_no_error():
    """eval_batch_size=512 on more than 512 devices was refused; it is rounded up instead
    (sharding.eval_batch_size; tests/test_sharding.py)."""
    config = imagenet.get_config('resnet50')
    config_lib.apply_overrides(config, {'batch_size': 4096, 'bn_group_size': 0})
    config_lib.validate(config, device_count=1024, process_count=256)
    config = cifar10.get_config('resnet20')
    config_lib.apply_overrides(config, {'eval_batch_size': 4})
    config_lib.validate(config, device_count=8, process_count=1)
    config_lib.apply_overrides(config, {'eval_batch_size': 0})
    with pytest.raises(ValueError, match=r'^invalid config: eval_batch_size=0; expected a'):
        config_lib.validate(config, device_count=8, process_count=1)
