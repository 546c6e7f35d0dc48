"""Tests of resnet_jax.sharding: global batches over the data axis."""

import numpy as np

from resnet_jax import (
    sharding,
)


def test_global_batch_is_sharded_over_the_data_axis():
    mesh = sharding.data_mesh()
    local = {'image': np.arange(16 * 2, dtype=np.float32).reshape(16, 2), 'label': np.arange(16)}
    batch = sharding.global_batch(local, mesh)
    assert batch['image'].shape == (16, 2)
    assert len(batch['image'].addressable_shards) == 8
    assert batch['image'].addressable_shards[1].data.shape == (2, 2)
    np.testing.assert_array_equal(batch['label'], local['label'])
    assert sharding.local_batch_size(16, mesh) == 16


def test_an_eval_batch_below_or_off_the_device_count_is_rounded_up_and_logged_once(caplog):
    sharding.note_eval_batch_size.cache_clear()
    mesh = sharding.data_mesh()  # 8 simulated devices
    with caplog.at_level('INFO', logger='resnet_jax'):
        assert sharding.local_eval_batch_size(4, mesh) == 8
        assert sharding.local_eval_batch_size(4, mesh) == 8
        assert sharding.local_eval_batch_size(20, mesh) == 24
        assert sharding.local_eval_batch_size(16, mesh) == 16  # a multiple stays as it is
    assert [r.getMessage() for r in caplog.records] == [
        'eval_batch_size=4 is used as 8: the smallest multiple of the 8 devices at least as '
        'large (padded examples are masked out)',
        'eval_batch_size=20 is used as 24: the smallest multiple of the 8 devices at least as '
        'large (padded examples are masked out)',
    ]


def test_the_eval_batch_rule_on_slices_larger_than_the_batch():
    # The ImageNet configs' 512 on a v5e-256 stays; on 1,024 devices it becomes 1,024.
    assert sharding.eval_batch_size(512, 256) == 512
    assert sharding.eval_batch_size(512, 1024) == 1024
    assert sharding.eval_batch_size(1000, 64) == 1024
    assert sharding.eval_batch_size(1, 8, processes=2) == 8
    assert sharding.eval_batch_size(5, 3, processes=2) == 6  # a multiple of both
