"""What the launchers in the repository give the trainer: the GKE JobSet manifest
(deploy/gke_jobset_gpu.yaml, parsed) and the SLURM batch script (scripts/slurm_train.sbatch,
run by bash with stand-ins for srun and scontrol). Neither GKE nor SLURM runs here: these check
the files, not the clusters (docs/scaling.md says what is untested)."""

import os
import pathlib
import re

import pytest
import yaml

from resnet_jax import cluster

REPO = pathlib.Path(__file__).resolve().parents[1]
MANIFEST = REPO / 'deploy' / 'gke_jobset_gpu.yaml'
SBATCH = REPO / 'scripts' / 'slurm_train.sbatch'
SAVE_SECONDS = 120  # at least this long between SIGTERM and SIGKILL for the save


def _manifest():
    jobset = yaml.safe_load(MANIFEST.read_text())
    (workers,) = jobset['spec']['replicatedJobs']
    return jobset, workers, workers['template']['spec']


def _expanded(command, env):
    """The command as Kubernetes runs it: $(VAR) replaced from the container's env."""
    return [re.sub(r'\$\((\w+)\)', lambda m: env[m.group(1)], arg) for arg in command]


def _flags(argv):
    return dict(arg[2:].split('=', 1) for arg in argv if arg.startswith('--') and '=' in arg)


def test_the_gke_jobset_starts_one_process_per_pod_with_the_coordinator_on_pod_0():
    jobset, workers, job = _manifest()
    assert (jobset['apiVersion'], jobset['kind']) == ('jobset.x-k8s.io/v1alpha2', 'JobSet')
    network = jobset['spec']['network']
    assert network['enableDNSHostnames'] is True  # JobSet's headless service
    assert workers['replicas'] == 1
    processes = job['parallelism']
    assert job['completions'] == processes and job['completionMode'] == 'Indexed'
    pod = job['template']['spec']
    assert pod['restartPolicy'] == 'Never'
    assert pod['terminationGracePeriodSeconds'] >= SAVE_SECONDS
    (trainer,) = pod['containers']
    command = trainer['command']
    assert isinstance(command, list) and command[:2] == ['python', 'train.py']  # exec form
    env = {e['name']: e for e in trainer['env']}
    index = env['JOB_COMPLETION_INDEX']['valueFrom']['fieldRef']['fieldPath']
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    coordinator = env['JAX_COORDINATOR_ADDRESS']['value']
    name, port = coordinator.rsplit(':', 1)
    pod_0 = f'{jobset["metadata"]["name"]}-{workers["name"]}-0-0.{network["subdomain"]}'
    assert name == pod_0 and int(port) in [p['containerPort'] for p in trainer['ports']]
    assert int(env['JAX_NUM_PROCESSES']['value']) == processes
    assert int(trainer['resources']['limits']['nvidia.com/gpu']) >= 1
    for i in range(processes):
        pod_env = {'JOB_COMPLETION_INDEX': str(i)}
        pod_env.update({k: e['value'] for k, e in env.items() if 'value' in e})
        flags = _flags(_expanded(command, pod_env))
        assert flags['workdir'].startswith('gs://')  # one place every pod sees
        assert flags['config'].endswith(',gpu')  # a pod that JAX starts on its CPU stops
        startup = cluster.decide(env=pod_env)  # what train.py decides in pod i
        assert startup.processes == processes
        assert startup.initialize == {
            'coordinator_address': coordinator,
            'num_processes': processes,
            'process_id': i,
            'local_device_ids': [],  # one process per node: all its GPUs
        }


def test_the_gke_jobset_gives_each_pod_the_data_and_shared_memory():
    _, _, job = _manifest()
    pod = job['template']['spec']
    volumes = {v['name']: v for v in pod['volumes']}
    (trainer,) = pod['containers']
    mounts = {m['mountPath']: m['name'] for m in trainer['volumeMounts']}
    data_dir = _flags(trainer['command'])['config.dataset.data_dir']
    assert mounts['/data'] == 'data' and data_dir.startswith('/data/')
    assert volumes[mounts['/dev/shm']]['emptyDir']['medium'] == 'Memory'
    (copy,) = pod['initContainers']
    assert copy['command'][-1].rstrip('/') == data_dir
    assert {m['mountPath'] for m in copy['volumeMounts']} == {'/data'}


@pytest.fixture
def fake_slurm(tmp_path, run_process):
    """A PATH whose srun records its arguments and exits with $FAKE_SRUN_STATUS, and whose
    scontrol records its own; run(status) -> (result, srun argv, scontrol argv)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in ('srun', 'scontrol'):
        script = bin_dir / tool
        script.write_text(
            f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/{tool}.args"\n'
            + ('exit "$FAKE_SRUN_STATUS"\n' if tool == 'srun' else '')
        )
        script.chmod(0o755)

    def run(status, *args):
        env = {
            'PATH': f'{bin_dir}:{os.environ["PATH"]}',
            'SLURM_JOB_ID': '4242',
            'FAKE_SRUN_STATUS': str(status),
        }
        result = run_process(['bash', str(SBATCH), *args], env=env, executable=None, timeout=60)
        read = lambda tool: (
            (tmp_path / f'{tool}.args').read_text().split('\n')[:-1]
            if (tmp_path / f'{tool}.args').exists()
            else None
        )
        srun, scontrol = read('srun'), read('scontrol')
        for tool in ('srun', 'scontrol'):
            (tmp_path / f'{tool}.args').unlink(missing_ok=True)
        return result, srun, scontrol

    return run


def test_the_slurm_script_requeues_a_preempted_job_and_only_that(fake_slurm):
    preempted = int(re.search(r'^PREEMPTED=(\d+)', SBATCH.read_text(), re.M).group(1))
    result, srun, scontrol = fake_slurm(preempted, '--config.total_steps=10')
    assert result.returncode == 0, result.stderr
    assert scontrol == ['requeue', '4242']
    assert srun[srun.index('train.py') - 1].endswith('python')
    assert f'--preempted_exit_code={preempted}' in srun
    assert '--kill-on-bad-exit=0' in srun
    assert srun[-1] == '--config.total_steps=10'  # the script's arguments go to train.py
    # Finished (0) or failed (1): no requeue, and the status stays the trainer's.
    for status in (0, 1):
        result, srun, scontrol = fake_slurm(status)
        assert (result.returncode, scontrol) == (status, None), result.stderr
        assert srun is not None


def test_the_slurm_script_asks_for_the_signal_and_a_requeueable_job():
    directives = re.findall(r'^#SBATCH (\S+)', SBATCH.read_text(), re.M)
    assert '--requeue' in directives
    (signal,) = [d for d in directives if d.startswith('--signal=')]
    assert re.fullmatch(r'--signal=TERM@(\d+)', signal)
    assert int(signal.split('@')[1]) >= SAVE_SECONDS
