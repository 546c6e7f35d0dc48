"""resnet_jax.actions on their own, with stand-ins for the run: what they say. (The actions at
work in real runs are tested in tests/test_reliability.py and tests/test_trainer.py.)"""

import types

import pytest

from resnet_jax import actions


def _context(latest_step):
    manager = types.SimpleNamespace(latest_step=lambda: latest_step, should_save=lambda s: False)
    config = types.SimpleNamespace(log_every_steps=1, nonfinite='stop', max_skipped_steps=0)
    return actions.Context(config, 'w', 'w/checkpoints', manager, None, None, {}, None)


@pytest.mark.parametrize(
    'latest, says',
    [
        (None, 'There is no checkpoint yet in w/checkpoints.'),  # once "the last ... is step None"
        (3, 'The last checkpoint is step 3 in w/checkpoints.'),
    ],
)
def test_a_non_finite_step_names_the_last_checkpoint_or_that_there_is_none(latest, says):
    loop = actions.Loop(state=None, step=2, total_steps=10, pending=[], unchecked=[(2, True)])
    with pytest.raises(FloatingPointError, match='not finite at step 2') as error:
        actions.NonFiniteCheck()(_context(latest), loop)
    assert says in str(error.value)
    assert 'None' not in str(error.value)
