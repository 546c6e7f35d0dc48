"""What every command shares: absl flags, logging, and one `error:` line for every mistake.

`train.py` and every `python -m resnet_jax COMMAND` start through `run(main)`:

* Flags are absl flags. `--config=FILE[:ARG]` is an ml_collections config file whose fields are
  set with `--config.x=y` (config_flags: the value is parsed as the field's type, unknown keys
  are refused). A command that reads a workdir runs without `--config` on the config the run
  recorded there (`run_config`), the same `--config.x=y` overrides applied to it.
* A mistake (a bad flag, config value, path, dataset, checkpoint, a full disk) prints one line,
  `error: ...`, to stderr and exits 1 (2 for a malformed command line). With `--verbose` (or
  `RESNET_JAX_DEBUG=1`) the traceback follows it.
* SIGINT (Ctrl-C), SIGTERM and SIGHUP stop every command within seconds with one line and exit
  130, 143 or 129 (resnet_jax.signals); the trainer saves instead once its loop runs.
* Logging: INFO for resnet_jax, WARNING for the libraries underneath (JAX, Orbax, Grain, absl).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from resnet_jax import signals

FLAGS = flags.FLAGS
DEBUG_ENV = 'RESNET_JAX_DEBUG'
USAGE_ERROR = 2
MAX_MESSAGE = 1500  # characters; an Orbax or TensorStore message can run to pages

flags.DEFINE_boolean('verbose', False, f'Print tracebacks with errors (or set {DEBUG_ENV}=1).')

logger = logging.getLogger('resnet_jax')


class UserError(Exception):
    """A mistake in what the user asked for, not a bug: printed as one line, exit code 1."""


# What a user's mistake raises. Anything else is a bug and says so.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    FloatingPointError,
    OSError,
    RuntimeError,
    SyntaxError,
    KeyboardInterrupt,
)


def verbose() -> bool:
    return os.environ.get(DEBUG_ENV, '') not in ('', '0') or (FLAGS.is_parsed() and FLAGS.verbose)


def one_line(error: BaseException) -> str:
    """The error's message on one line: whitespace collapsed, config_flags' traceback dropped."""
    if isinstance(error, KeyboardInterrupt) and not isinstance(error, signals.Interrupted):
        return 'interrupted (Ctrl-C)'
    message = str(error)
    # config_flags re-raises a config file's errors with the whole traceback in the message.
    if 'Error whilst parsing config file:' in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1].strip()
        message = re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)
    if isinstance(error, SyntaxError) and error.filename:
        message = f'{error.filename}, line {error.lineno}: {error.msg}'
    elif isinstance(error, OSError) and error.filename and error.strerror:
        message = f'{error.filename}: {error.strerror}'
    message = re.sub(r'\s+', ' ', message).strip()
    if not message:
        message = type(error).__name__
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + ' ...'
    if not isinstance(error, EXPECTED_ERRORS):
        message = (
            f'internal error ({type(error).__name__}: {message}); rerun with --verbose for the '
            'traceback, and please report it'
        )
    return message


def exit_code_of(error: BaseException) -> int:
    """1 for a mistake; for a stop signal the shell's code (128 + its number; Ctrl-C: 130),
    also where one ended a wait on a store (`signals.Interrupted` and errors that carry an
    `exit_code`)."""
    code = getattr(error, 'exit_code', None)
    if isinstance(code, int) and code > 0:
        return code
    return 128 + signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1


def fail(error: BaseException, exit_code: int = 1) -> None:
    """Prints `error: ...` (and the traceback if verbose) and exits with `exit_code`."""
    if verbose():
        traceback.print_exception(error)
    print(f'error: {one_line(error)}', file=sys.stderr, flush=True)
    if getattr(error, 'hard_exit', False):
        # A storage call is still hung in a thread that cannot be cancelled (TensorStore,
        # gcsfs): an orderly exit would wait for it, without end.
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)


def _parse_flags(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    try:
        argv = _split_recorded_overrides(argv)
        for arg in argv[1:]:
            if re.match(r'^--?config=', arg):
                check_config_file(arg.split('=', 1)[1].split(':', 1)[0])
        return FLAGS(argv)
    except (KeyError, AttributeError) as e:  # config_flags: an override of no field
        fail(UserError(_unknown_config_key(argv, e)), USAGE_ERROR)
    except flags.Error as e:
        fail(UserError(str(e)), USAGE_ERROR)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        fail(e, USAGE_ERROR)
    raise AssertionError('unreachable: fail() exits')


def _unknown_config_key(argv: Sequence[str], error: BaseException) -> str:
    """Which `--config.a.b=v` names no field, and the field it most likely meant.

    config_flags' own message is a KeyError's repr wrapped in another's (quotes escaped
    twice, a newline inside): the config is loaded again and each override's path walked.
    """
    from resnet_jax import config as config_lib

    config_arg = next((a.split('=', 1)[1] for a in argv if re.match(r'^--?config=', a)), None)
    try:
        config = FLAGS['config'].parser.parse(config_arg)
    except Exception as e:  # the KeyError came from the config file itself, not an override
        return f'config {config_arg}: {type(e).__name__}: {" ".join(str(e).split())}'
    for arg in argv[1:]:
        match = re.match(r'^--?config\.([^=]+)', arg)
        problem = match and config_lib.unknown_key(config, match.group(1))
        if problem:
            return f'unknown config key in {arg}: {problem}'
    return f'unknown config key: {" ".join(str(error).split())}'


def check_config_file(path: str) -> None:
    """Raises UserError unless `path` is a Python file that defines get_config."""
    import ast

    if not os.path.isfile(path):
        raise UserError(f'config file {path!r} does not exist; expected e.g. configs/cifar10.py')
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source, path)  # a SyntaxError names the file and line
    if not any(isinstance(n, ast.FunctionDef) and n.name == 'get_config' for n in tree.body):
        raise UserError(f'config file {path!r} defines no get_config(arg) function')


class _QuietLibraries(logging.Filter):
    """Unless verbose: the libraries' warnings without their tracebacks, and none of the error
    reports of Orbax's saving threads or their asyncio tasks (each such failure reaches the
    trainer, which says it once, with what to do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose() or record.name.startswith('resnet_jax'):
            return True
        if record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname:
            return False
        if record.name == 'asyncio':  # "Task exception was never retrieved": the same failure
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _is_closed_loop_noise(value: BaseException | None) -> bool:
    # When an Orbax save fails, TensorStore's callback threads report an 'Event loop is closed'
    # for every write still queued (as "unraisable" exceptions, or through sys.excepthook):
    # hundreds of tracebacks around one error that the trainer reports itself.
    return isinstance(value, RuntimeError) and 'Event loop is closed' in str(value)


def _excepthook(kind, value, tb) -> None:
    if verbose() or not _is_closed_loop_noise(value):
        sys.__excepthook__(kind, value, tb)


def _unraisablehook(unraisable) -> None:
    if verbose() or not _is_closed_loop_noise(unraisable.exc_value):
        sys.__unraisablehook__(unraisable)


def configure_logging() -> None:
    """INFO for this package, WARNING for the libraries below it, one format for both."""
    logging.basicConfig(  # force: replaces the handler absl installed
        level=logging.WARNING, format='%(asctime)s %(levelname)s %(message)s', force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    logging.getLogger('absl').setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    sys.excepthook = _excepthook
    sys.unraisablehook = _unraisablehook


def run(
    main: Callable[[list[str]], Any],
    argv: Sequence[str] | None = None,
    *,
    positional: bool = False,
) -> None:
    """Parses flags and runs `main(argv)`; every error ends as one `error:` line.

    Args:
      positional: whether `main` takes arguments after the flags (e.g. image paths).
    """

    def guarded(args: list[str]) -> Any:
        if len(args) > 1 and not positional:
            fail(UserError(f'unexpected arguments {args[1:]}; expected only --flags'), USAGE_ERROR)
        configure_logging()
        signals.install()  # explicitly: a background start inherits SIGINT ignored
        try:
            return main(args)
        except SystemExit:
            raise
        except BaseException as e:
            fail(e, exit_code_of(e))

    app.run(guarded, argv=list(sys.argv if argv is None else argv), flags_parser=_parse_flags)


# --- Configs ---------------------------------------------------------------------------------

# `--config.x=y` given without `--config`: set on the workdir's recorded config (`run_config`).
_RECORDED_OVERRIDES: dict[str, str] = {}


def _split_recorded_overrides(argv: list[str]) -> list[str]:
    """`argv` without the `--config.x=y` overrides of a command that was given no `--config`
    (they are kept for `run_config`); `argv` itself otherwise."""
    if 'config' not in FLAGS or any(re.match(r'^--?config(=|$)', a) for a in argv[1:]):
        return argv
    overrides = [a for a in argv[1:] if re.match(r'^--?config\.', a)]
    for arg in overrides:
        key, sep, value = arg.lstrip('-')[len('config.') :].partition('=')
        if not sep:
            raise UserError(f'{arg}: expected --config.FIELD=VALUE')
        _RECORDED_OVERRIDES[key] = value
    return [a for a in argv if a not in overrides]


def run_config(config: Any, workdir: str) -> Any:
    """The config a command that reads a workdir runs with: `--config` where given, else the one
    the run recorded (`resnet_jax.workdir.read_config`) with the `--config.x=y` overrides.

    Raises:
      ValueError: the workdir records no readable config, or an override names no field.
    """
    if config is not None:
        return config
    from resnet_jax import config as config_lib
    from resnet_jax import workdir as workdir_lib

    recorded = workdir_lib.read_config(workdir)
    config_lib.apply_overrides(recorded, _RECORDED_OVERRIDES)
    recorded.lock()
    return recorded
