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
