"""Options and valid values: how a network's options are declared, each on the `ResNet` field
it sets (`option`, with the check `create_model` runs, what a valid value is, and one line for
the docs' table: the experiment config's `model` section and docs/models.md's option table are
made from them); and the predicates every validator of a value shares (models, optim, config,
weights), written once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Option:
    """What `create_model` accepts for a field, and how the experiment config shows it.

    Attributes:
      check: True for a valid value.
      expected: what a valid value is, for the error message.
      doc: one line for the docs' option table.
      in_config: the config has a `model.<name>` field for it (dtype lives at the top level,
        input_channels follows the dataset).
      preset_default: the config's '' stands for the preset's own value (shortcut, stem).
    """

    check: Callable[[Any], bool]
    expected: str
    doc: str
    in_config: bool = True
    preset_default: bool = False


def option(default: Any, check: Callable[[Any], bool], expected: str, doc: str, **kw: Any):
    """A `ResNet` field that is an option of `create_model`."""
    return dataclasses.field(
        default=default, metadata={'option': Option(check, expected, doc, **kw)}
    )


def flag(doc: str) -> Any:
    """A bool option, off unless asked for."""
    return option(False, is_bool, 'a bool', doc)


def one_of(default: Any, values: Any, what: str, doc: str, **kw: Any) -> Any:
    """An option whose value is one of `values` (a registry, read when checked)."""
    return option(default, lambda v: v in values, what, doc, **kw)


def require(ok: bool, message: str, *, prefix: str = '') -> None:
    """Raises ValueError(prefix + message) unless `ok`."""
    if not ok:
        raise ValueError(prefix + message)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """A number that is not NaN or Inf.

    NaN fails every comparison, so `x > 0` refuses it, but Inf passes `x > 0` and `x >= 0`:
    an infinite learning rate or weight decay validates and then gives NaN at the first step.
    """
    return is_number(v) and math.isfinite(v)


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_float_dtype(v: Any) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(v), jnp.floating)
    except TypeError:
        return False


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)
