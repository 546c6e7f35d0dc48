"""Device prefetch (resnet_jax.prefetch): the same batches in the same order, errors where the
step would have met them, a clean stop, and a config value checked."""

import re
import threading
import time

import jax
import numpy as np
import pytest

from resnet_jax import config as config_lib
from resnet_jax import prefetch, sharding


def _host_batches(n):
    for i in range(n):
        yield {'image': np.full((8, 2, 2, 3), i, np.float32), 'label': np.full((8,), i, np.int32)}


def _to_device(local):
    return sharding.global_batch(local, sharding.data_mesh())


@pytest.mark.parametrize('size', [0, 1, 3])
def test_the_same_batches_arrive_in_order_on_the_devices(size):
    got = list(prefetch.prefetch_to_device(_host_batches(6), _to_device, size))
    assert [int(b['label'][0]) for b in got] == list(range(6))
    for i, batch in enumerate(got):
        assert isinstance(batch['image'], jax.Array)
        assert batch['image'].sharding == sharding.batch_sharding(sharding.data_mesh())
        np.testing.assert_array_equal(batch['image'], np.full((8, 2, 2, 3), i))


def test_it_stays_ahead_by_its_size_and_no_more():
    taken = []

    def counted():
        for batch in _host_batches(100):
            taken.append(batch)
            yield batch

    batches = prefetch.prefetch_to_device(counted(), lambda b: b, 2)
    next(batches)
    time.sleep(0.3)
    # One consumed, two queued, one in the thread's hand waiting for room.
    assert len(taken) == 4
    batches.close()


def test_an_input_error_is_raised_by_next_where_the_step_meets_it():
    def failing():
        yield from _host_batches(2)
        raise ValueError("image '/photos/cat/1.jpg' is not a readable image")

    batches = prefetch.prefetch_to_device(failing(), lambda b: b, 2)
    assert [int(b['label'][0]) for b in (next(batches), next(batches))] == [0, 1]
    with pytest.raises(ValueError, match=re.escape("image '/photos/cat/1.jpg'")):
        next(batches)


def test_close_stops_the_thread_and_closes_the_host_iterator():
    closed = threading.Event()

    class Endless:
        def __iter__(self):
            return self

        def __next__(self):
            return {'label': np.zeros(8)}

        def close(self):
            closed.set()

    before = threading.active_count()
    batches = prefetch.prefetch_to_device(Endless(), lambda b: b, 2)
    next(batches)
    batches.close()
    assert closed.is_set()
    assert threading.active_count() == before
    batches.close()  # twice is harmless


def test_a_negative_prefetch_is_one_clear_error():
    config = config_lib.base_config()
    config.prefetch_batches = -1
    with pytest.raises(
        ValueError, match=r'invalid config: prefetch_batches=-1; expected a non-negative int'
    ):
        config_lib.validate(config, device_count=1, process_count=1)


def test_closing_while_a_generator_is_inside_next_waits_for_it_then_closes_it():
    """A host iterator that is a generator cannot be closed from another thread while it runs
    (ValueError: generator already executing): close waits for it instead of failing."""
    import threading

    from resnet_jax import prefetch

    inside = threading.Event()
    closed = []

    def slow_batches():
        try:
            while True:
                inside.set()
                time.sleep(0.3)
                yield {'x': np.zeros(2)}
        finally:
            closed.append(True)

    prefetcher = prefetch.DevicePrefetcher(slow_batches(), lambda b: b, size=1)
    inside.wait(5)
    prefetcher.close(timeout=5)
    assert closed == [True]
