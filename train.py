"""Train a ResNet: flags -> resnet_jax.trainer.train_and_evaluate.

    python train.py --config=configs/cifar10.py:resnet20 --workdir=DIR [--config.x=y ...]
    python train.py --workdir=DIR [--config.x=y ...]    # resume with the run's recorded config

Multi-process: on a Cloud TPU VM pod, GKE TPU pods, SLURM or Open MPI pass nothing (JAX
detects the cluster); under torchrun, or with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set (a GKE GPU JobSet), nothing either; elsewhere --coordinator_address=HOST:PORT
--num_processes=N --process_id=I on every process (resnet_jax.cluster decides, in that order of
precedence: flags, JAX_*, torchrun's, JAX's detection; docs/scaling.md).
Bad input exits non-zero with one `error:` line (`--verbose` adds the traceback) and leaves the
workdir untouched. SIGTERM, SIGHUP or Ctrl-C saves the current step, prints `preempted: saved
step N` and exits 0 (or --preempted_exit_code, for a batch script that requeues on it); rerun to
resume (before the first step there is nothing to save: one line, exit 128 + the signal).
A workdir whose checkpoints were all found damaged is not started over without --start_over.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from resnet_jax import paths
from resnet_jax.commands import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config',
    None,
    "Experiment config file[:arg]; default: the workdir's recorded one.",
    lock_config=True,
)
flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go; reruns resume from it.')
flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process).')
flags.DEFINE_boolean(
    'start_over',
    False,
    'Train from step 0 in a workdir whose checkpoints were all set aside as damaged (its '
    'earlier records are moved to WORKDIR/previous/).',
)
flags.DEFINE_integer(
    'preempted_exit_code',
    0,
    'Exit status after a preemption saved its step (0 as a finished run; e.g. 75 for a batch '
    'script to requeue on: scripts/slurm_train.sbatch). 3-125: 1 and 2 are errors, 126 and up '
    "the shell's.",
)
flags.register_validator(
    'preempted_exit_code',
    lambda code: code == 0 or 3 <= code <= 125,
    message="expected 0 or 3..125 (1 and 2 are errors, 126 and up the shell's)",
)
flags.mark_flags_as_required(['workdir'])


def main(argv):
    del argv
    import jax

    from resnet_jax import cluster

    # Before joining a cluster: '--workdir=' (an unset variable in a script) would train into
    # the current directory, and '--workdir=" "' into a folder named ' '.
    paths.check_path_text(FLAGS.workdir, '--workdir')
    config = cli.run_config(FLAGS.config, FLAGS.workdir)
    startup = cluster.decide(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    cluster.start(
        startup,
        initialization_timeout=config.distributed.initialization_timeout_seconds,
        heartbeat_timeout_seconds=config.distributed.heartbeat_timeout_seconds,
    )
    from resnet_jax import trainer

    try:
        result = trainer.train_and_evaluate(config, FLAGS.workdir, start_over=FLAGS.start_over)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # A collective failed: a peer process is gone. Waiting for it at shutdown would only
        # end in JAX's heartbeat-timeout abort, so say what happened and leave now.
        reason = str(e).splitlines()[0][:300]
        print(
            f'error: process {jax.process_index()} of {jax.process_count()}: a collective with '
            f'the other processes failed ({reason}); a peer has most likely died, see its log. '
            'Checkpoints already written are intact; rerun all processes to resume.',
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
    if 'preempted_at_step' in result:
        print(f'preempted: saved step {int(result["preempted_at_step"])}; rerun to resume')
        sys.stdout.flush()
        sys.exit(FLAGS.preempted_exit_code)


if __name__ == '__main__':
    cli.run(main)
