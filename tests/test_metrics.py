"""Tests of resnet_jax.metrics: accuracies that cannot be fooled, and the metric log."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import metrics


@pytest.mark.parametrize('k', [1, 2, 5, 10])
def test_top_k_equals_sorting_when_logits_are_distinct(k):
    logits = jax.random.normal(jax.random.key(0), (64, 10))
    labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    _, top = jax.lax.top_k(logits, k)
    expected = np.any(np.asarray(top) == np.asarray(labels)[:, None], axis=-1)
    np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, k), expected)


class TheSameJittedOrNot(chex.TestCase):
    """Metrics and the in-memory draw run inside jitted steps and on the host alike."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_top_k_correct_and_the_loss(self):
        logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [jnp.nan, 1.0, 0.0]])
        labels = jnp.array([0, 1, 2])
        correct = self.variant(metrics.top_k_correct, static_argnums=2)(logits, labels, 1)
        np.testing.assert_array_equal(correct, [1.0, 0.0, 0.0])  # a tie and a NaN: wrong
        loss = self.variant(metrics.cross_entropy, static_argnums=2)(logits[:1], labels[:1], 0.1)
        np.testing.assert_allclose(loss, metrics.cross_entropy(logits[:1], labels[:1], 0.1))

    @chex.variants(with_jit=True, without_jit=True)
    def test_the_in_memory_draw_is_the_same_permutation(self):
        from resnet_jax import in_memory

        draw = self.variant(in_memory.in_memory_indices, static_argnums=(2, 3))
        key = jax.random.key(3)
        indices = [np.asarray(draw(key, jnp.int32(step), 20, 5)) for step in range(4)]
        assert sorted(np.concatenate(indices)) == list(range(20))  # one epoch, every example


def test_a_collapsed_model_scores_zero_not_one_hundred_percent():
    labels = jnp.arange(8) % 10
    all_equal = jnp.zeros((8, 10))
    np.testing.assert_array_equal(metrics.top_k_correct(all_equal, labels, 1), 0.0)
    np.testing.assert_array_equal(metrics.top_k_correct(all_equal, labels, 5), 0.0)
    nan = jnp.full((8, 10), jnp.nan)
    np.testing.assert_array_equal(metrics.top_k_correct(nan, labels, 1), 0.0)
    np.testing.assert_array_equal(metrics.top_k_correct(nan, labels, 5), 0.0)


def test_ties_and_non_finite_logits_count_against_the_label():
    labels = jnp.array([0, 0, 0, 0, 0, 0, 0])
    logits = jnp.array(
        [
            [2.0, 1.0, 1.0],  # clear winner
            [2.0, 2.0, 1.0],  # tied for first: not top-1, but top-2
            [1.0, 2.0, 2.0],  # third after a tie: neither
            [2.0, jnp.nan, 1.0],  # a NaN anywhere: the row is not a prediction
            [jnp.inf, 1.0, 1.0],  # an Inf at the label: an overflow, not a confident answer
            [jnp.inf, jnp.inf, 1.0],  # Infs tied
            [2.0, 1.0, -jnp.inf],  # an Inf elsewhere: the row is not a prediction either
        ]
    )
    np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, 1), [1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, 2), [1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, 3), [1, 1, 1, 0, 0, 0, 0])


# --- metrics.jsonl: one line per record, each step once ---------------------------------------


def _lines(path):
    return path.read_text().splitlines()


def test_a_resumed_writer_drops_what_came_after_its_checkpoint_and_a_cut_off_line(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    records = [{'step': s, 'train/loss': 1.0 / s} for s in range(1, 11)]
    path.write_text(''.join(json.dumps(r) + '\n' for r in records) + '{"step": 11, "train/lo')
    writer = metrics.MetricWriter(str(tmp_path), resume_step=6, enabled=True)
    assert [json.loads(line)['step'] for line in _lines(path)] == [1, 2, 3, 4, 5, 6]
    writer.write(7, {'train/loss': 0.5})
    writer.close()
    assert json.loads(_lines(path)[-1]) == {'step': 7, 'train/loss': 0.5}
    assert [r['step'] for r in metrics.read_metrics(str(path))] == list(range(1, 8))


def test_a_fresh_writer_keeps_a_whole_file_untouched(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    text = ''.join(json.dumps({'step': s, 'eval/top1_acc': 0.5}) + '\n' for s in (2, 4))
    path.write_text(text)
    writer = metrics.MetricWriter(str(tmp_path), resume_step=4, enabled=True)
    assert writer.recorded(4, 'eval/') == {'eval/top1_acc': 0.5}
    assert writer.recorded(4, 'test/') == {}
    writer.close()
    assert path.read_text() == text


def test_readers_skip_a_bad_line_and_name_it(tmp_path, caplog):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1, "train/loss": 2.0}\nnot json\n{"step": 2, "train/lo')
    assert metrics.read_metrics(str(path)) == [{'step': 1, 'train/loss': 2.0}]
    assert f'{path} line 2 is not a metrics record' in caplog.text
    assert f'{path} line 3 is not a metrics record' in caplog.text
    with pytest.raises(ValueError, match=r'cannot read .*missing\.jsonl'):
        metrics.read_metrics(str(tmp_path / 'missing.jsonl'))
