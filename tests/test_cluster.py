"""How processes find each other, for each kind of cluster (resnet_jax.cluster.decide), and
which devices each process takes (resnet_jax.accelerators).

Each test gives the environment a real cluster gives its processes and checks the decision;
JAX's own detection runs unmodified. A Cloud TPU VM is found from its metadata server, so that
test serves the metadata of worker 1 of a 4-host pod from 127.0.0.1. The real start of several
processes: two train.py processes given only torchrun's variables form one run (below), and
tests/test_reliability.py runs scripts/launch_local.py.
"""

import http.server
import os
import pathlib
import socket
import subprocess
import sys
import threading
from typing import ClassVar

import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from resnet_jax import accelerators, cluster
from resnet_jax.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

# Variables any launcher may have left in this test's own environment.
_CLUSTER_VARIABLES = [
    'SLURM_JOB_ID',
    'SLURM_STEP_NODELIST',
    'SLURM_NTASKS',
    'SLURM_STEP_NUM_TASKS',
    'SLURM_STEP_NUM_NODES',
    'SLURM_STEP_TASKS_PER_NODE',
    'SLURM_TASKS_PER_NODE',
    'SLURM_NTASKS_PER_NODE',
    'SLURM_NNODES',
    'SLURM_NODEID',
    'SLURM_PROCID',
    'SLURM_LOCALID',
    'SLURM_GPUS_ON_NODE',
    'SLURM_GPUS_PER_NODE',
    'CUDA_VISIBLE_DEVICES',
    'OMPI_MCA_orte_hnp_uri',
    'OMPI_COMM_WORLD_SIZE',
    'OMPI_COMM_WORLD_LOCAL_SIZE',
    'OMPI_COMM_WORLD_LOCAL_RANK',
    'PMI_SIZE',
    'WORLD_SIZE',
    'RANK',
    'LOCAL_RANK',
    'LOCAL_WORLD_SIZE',
    'MASTER_ADDR',
    'MASTER_PORT',
    'TORCHELASTIC_RUN_ID',
    'JAX_COORDINATOR_ADDRESS',
    'JAX_COORDINATOR_PORT',
    'JAX_NUM_PROCESSES',
    'JAX_PROCESS_ID',
    'JAX_LOCAL_DEVICE_IDS',
    'JOB_COMPLETION_INDEX',
    'TPU_WORKER_HOSTNAMES',
    'TPU_PROCESS_ADDRESSES',
    'TPU_WORKER_ID',
    'TPU_SKIP_MDS_QUERY',
    'KUBERNETES_SERVICE_HOST',
    'MEGASCALE_NUM_SLICES',
    'GCE_METADATA_IP',
]
EIGHT_GPUS = '0,1,2,3,4,5,6,7'


@pytest.fixture
def environment(monkeypatch):
    """A clean environment to fill in, on a machine that is not a TPU VM unless a test says."""
    for name in _CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_a_plain_machine_runs_one_process(environment):
    assert cluster.decide() == cluster.Startup('one process', 1, None)


def test_flags_win_over_the_environment(environment):
    environment(SLURM_NTASKS='8')
    startup = cluster.decide(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1)
    assert startup == cluster.Startup(
        'flags',
        2,
        {
            'coordinator_address': '10.0.0.1:1234',
            'num_processes': 2,
            'process_id': 1,
            'local_device_ids': [],
        },
    )


@pytest.mark.parametrize(
    'flags, message',
    [
        ({'num_processes': 2}, '--coordinator_address, --process_id not given'),
        (
            {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 2},
            '--process_id=2; expected 0 <= process_id < --num_processes=2',
        ),
        (
            {'coordinator_address': 'h:1', 'num_processes': 0, 'process_id': 0},
            '--num_processes=0; expected a count >= 1',
        ),
    ],
)
def test_incomplete_or_impossible_flags_are_refused(environment, flags, message):
    with pytest.raises(ValueError, match=message):
        cluster.decide(**flags)


def _expected():
    """The accelerators this process should see, by the environment a test set (less the
    JAX_PLATFORMS=cpu of tests/conftest.py, which leaves GPUs out on purpose)."""
    env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
    assert accelerators.expected_devices({**env, 'JAX_PLATFORMS': 'cpu'}) is None
    return accelerators.expected_devices(env)


def _slurm(environment, tasks, rank, nodes=2, **more):
    """What srun gives a task of `tasks` on `nodes` nodes of 8 GPUs (--gpus-per-node=8)."""
    per_node = tasks // nodes
    environment(
        SLURM_JOB_ID='4242',
        SLURM_STEP_NODELIST=f'gpu[001-{nodes:03d}]',
        SLURM_NTASKS=str(tasks),
        SLURM_STEP_NUM_TASKS=str(tasks),
        SLURM_STEP_NUM_NODES=str(nodes),
        SLURM_STEP_TASKS_PER_NODE=f'{per_node}(x{nodes})',
        SLURM_NODEID=str(rank // per_node),
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank % per_node),
        SLURM_GPUS_ON_NODE='8',
        CUDA_VISIBLE_DEVICES=EIGHT_GPUS,
        **more,
    )


def test_slurm_one_task_per_gpu_gives_each_task_its_own_gpu(environment):
    _slurm(environment, tasks=16, rank=9)
    assert cluster.decide() == cluster.Startup('SlurmCluster', 16, {'local_device_ids': [1]})
    expected = _expected()
    assert (expected.platform, expected.count) == ('gpu', 1)


def test_slurm_one_task_per_node_takes_all_the_nodes_gpus(environment):
    """JAX's own detection would give each of the 4 processes the GPU of SLURM_LOCALID=0: 4
    nodes x 8 GPUs training on 4 devices."""
    _slurm(environment, tasks=4, nodes=4, rank=2)
    startup = cluster.decide()
    assert startup == cluster.Startup('SlurmCluster', 4, {'local_device_ids': []})
    # What jax.distributed.initialize makes of it: [] (all devices) stays, None became [0].
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    assert detect(None, None, None, [], None, None)[1:] == (4, 2, [])
    assert detect(None, None, None, None, None, None)[1:] == (4, 2, [0])
    expected = _expected()
    assert (expected.platform, expected.count) == ('gpu', 8)


def test_srun_with_the_three_flags_also_takes_all_the_nodes_gpus(environment):
    _slurm(environment, tasks=4, nodes=4, rank=2)
    startup = cluster.decide(coordinator_address='gpu001:1234', num_processes=4, process_id=2)
    assert startup.initialize['local_device_ids'] == []


def test_a_task_srun_bound_to_its_own_gpu_takes_it(environment):
    """srun --gpus-per-task=1: each task sees one GPU, as device 0, whatever its local rank."""
    _slurm(environment, tasks=16, rank=9)
    environment(CUDA_VISIBLE_DEVICES='1')
    assert cluster.decide().initialize == {'local_device_ids': []}
    assert _expected().count == 1


def test_tasks_that_cannot_share_a_nodes_gpus_evenly_are_refused(environment):
    _slurm(environment, tasks=6, nodes=2, rank=4)
    with pytest.raises(ValueError, match=r'^3 processes on this node cannot share its 8 GPUs'):
        cluster.decide()


def test_a_one_task_slurm_job_is_one_process(environment):
    _slurm(environment, tasks=1, nodes=1, rank=0)
    assert cluster.decide() == cluster.Startup('one process', 1, None)


def test_open_mpi_is_detected(environment):
    environment(
        OMPI_MCA_orte_hnp_uri='1531576320.0;tcp://10.96.0.1:34911',
        OMPI_COMM_WORLD_SIZE='4',
        OMPI_COMM_WORLD_RANK='2',
        OMPI_COMM_WORLD_LOCAL_RANK='0',
        OMPI_COMM_WORLD_LOCAL_SIZE='1',
    )
    assert cluster.decide() == cluster.Startup('OmpiCluster', 4, {'local_device_ids': []})


def test_a_gke_tpu_pod_is_detected_from_its_worker_list(environment, monkeypatch):
    monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
    environment(
        TPU_WORKER_HOSTNAMES='w-0.svc,w-1.svc,w-2.svc,w-3.svc',
        TPU_WORKER_ID='3',
        TPU_SKIP_MDS_QUERY='true',  # GKE's TPU pods: read the variables, not the metadata
        MEGASCALE_NUM_SLICES='1',
    )
    assert cluster.decide() == cluster.Startup('GkeTpuCluster', 4, {})


class _MetadataServer(http.server.BaseHTTPRequestHandler):
    """The GCE metadata server of worker 1 of a v4-32 slice (4 hosts)."""

    attributes: ClassVar[dict[str, str]] = {
        'agent-worker-number': '1',
        'worker-network-endpoints': 'w0:0:10.0.0.2,w1:1:10.0.0.3,w2:2:10.0.0.4,w3:3:10.0.0.5',
        'tpu-env': "ACCELERATOR_TYPE: 'v4-32'\nWORKER_ID: '1'\n",
    }

    def do_GET(self):
        key = self.path.rsplit('/', 1)[-1]
        if self.headers.get('Metadata-Flavor') != 'Google' or key not in self.attributes:
            self.send_error(404)
            return
        body = self.attributes[key].encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        del args


@pytest.fixture
def metadata_server():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _MetadataServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'127.0.0.1:{server.server_port}'
    server.shutdown()
    server.server_close()


def test_a_cloud_tpu_vm_pod_is_found_from_its_metadata_with_no_variable_set(
    environment, monkeypatch, metadata_server
):
    """The case that used to fall through: nothing in the environment, only the metadata."""
    monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
    environment(GCE_METADATA_IP=metadata_server)
    assert cluster.decide() == cluster.Startup('GceTpuCluster', 4, {})


def test_a_single_host_tpu_vm_is_one_process(environment, monkeypatch, metadata_server):
    monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
    monkeypatch.setitem(_MetadataServer.attributes, 'agent-worker-number', '0')
    monkeypatch.setitem(_MetadataServer.attributes, 'worker-network-endpoints', 'w0:0:10.0.0.2')
    environment(GCE_METADATA_IP=metadata_server)
    assert cluster.decide() == cluster.Startup('one process', 1, None)


@pytest.mark.parametrize(
    'variables, said',
    [
        ({'SLURM_NTASKS': '4'}, 'SLURM_NTASKS=4 says 4 processes'),
        ({'OMPI_COMM_WORLD_SIZE': '2'}, 'OMPI_COMM_WORLD_SIZE=2 says 2 processes'),
        ({'TPU_WORKER_HOSTNAMES': 'a,b'}, 'TPU_WORKER_HOSTNAMES lists 2 hosts says 2'),
    ],
)
def test_several_processes_without_a_cluster_jax_detects_are_refused(environment, variables, said):
    """Several processes without a client would each train alone and ignore preemption."""
    environment(**variables)
    with pytest.raises(ValueError, match=said + r'.*pass --coordinator_address'):
        cluster.decide()


def test_start_does_nothing_for_one_process(environment):
    cluster.start(cluster.Startup('one process', 1, None), initialization_timeout=1)


def _torchrun(environment, rank, per_node=8, nodes=2, **more):
    """What torchrun --nnodes=2 --nproc_per_node=8 gives each of its processes."""
    environment(
        MASTER_ADDR='10.0.0.1',
        MASTER_PORT='29500',
        WORLD_SIZE=str(per_node * nodes),
        RANK=str(rank),
        LOCAL_RANK=str(rank % per_node),
        LOCAL_WORLD_SIZE=str(per_node),
        CUDA_VISIBLE_DEVICES=EIGHT_GPUS,
        **more,
    )


def test_torchrun_variables_start_the_run_one_gpu_per_process(environment):
    _torchrun(environment, rank=11)
    assert cluster.decide() == cluster.Startup(
        'torchrun variables',
        16,
        {
            'coordinator_address': '10.0.0.1:29500',
            'num_processes': 16,
            'process_id': 11,
            'local_device_ids': [3],
        },
    )


def test_torchrun_one_process_per_node_takes_all_its_gpus(environment):
    _torchrun(environment, rank=1, per_node=1)
    assert cluster.decide().initialize['local_device_ids'] == []
    assert _expected().count == 8


def test_under_torchruns_own_agent_the_coordinator_takes_the_next_port(environment):
    """torchrun's agent listens on MASTER_PORT itself; JAX_COORDINATOR_PORT chooses another."""
    _torchrun(environment, rank=0, TORCHELASTIC_RUN_ID='none')
    assert cluster.decide().initialize['coordinator_address'] == '10.0.0.1:29501'
    environment(JAX_COORDINATOR_PORT='8476')
    assert cluster.decide().initialize['coordinator_address'] == '10.0.0.1:8476'


def test_jax_variables_start_the_run_and_come_before_torchruns_and_slurms(environment):
    _slurm(environment, tasks=4, nodes=4, rank=2)
    _torchrun(environment, rank=5)
    environment(JAX_COORDINATOR_ADDRESS='10.0.0.9:8476', JAX_NUM_PROCESSES='4', JAX_PROCESS_ID='2')
    assert cluster.decide() == cluster.Startup(
        'JAX_* variables',
        4,
        {
            'coordinator_address': '10.0.0.9:8476',
            'num_processes': 4,
            'process_id': 2,
            'local_device_ids': [5],  # torchrun's LOCAL_RANK on this node, still
        },
    )


def test_a_gke_gpu_jobset_starts_from_its_index_without_the_kubernetes_package(environment):
    """A JobSet of one Job of 4 pods (parallelism = completions = 4), 8 GPUs each: Kubernetes
    sets JOB_COMPLETION_INDEX and the hostname, the pod template the two JAX_* variables."""
    environment(
        KUBERNETES_SERVICE_HOST='10.96.0.1',
        HOSTNAME='resnet-workers-0-2',
        JOB_COMPLETION_INDEX='2',
        JAX_COORDINATOR_ADDRESS='resnet-workers-0-0.resnet:8476',
        JAX_NUM_PROCESSES='4',
    )
    assert cluster.decide() == cluster.Startup(
        'JAX_* variables and JOB_COMPLETION_INDEX',
        4,
        {
            'coordinator_address': 'resnet-workers-0-0.resnet:8476',
            'num_processes': 4,
            'process_id': 2,
            'local_device_ids': [],
        },
    )


def test_a_gke_jobset_pod_that_says_nothing_more_is_refused(environment):
    """Without the kubernetes package JAX's detection finds nothing: each pod would train
    alone and flap on the workdir's lock."""
    environment(KUBERNETES_SERVICE_HOST='10.96.0.1', JOB_COMPLETION_INDEX='2')
    refused = pytest.raises(ValueError, match=r'^JOB_COMPLETION_INDEX=2: a pod of a Kubernetes')
    with pytest.warns(UserWarning, match='kubernetes'), refused:  # JAX's warning, its detection
        cluster.decide()


@pytest.mark.parametrize(
    'variables, message',
    [
        ({'JAX_NUM_PROCESSES': '4'}, 'JAX_COORDINATOR_ADDRESS, JOB_COMPLETION_INDEX not set'),
        ({'JAX_PROCESS_ID': '1'}, 'JAX_NUM_PROCESSES not set'),
        ({'JAX_NUM_PROCESSES': 'four'}, "JAX_NUM_PROCESSES='four'; expected an integer >= 1"),
        ({'WORLD_SIZE': '2', 'RANK': '1'}, 'MASTER_ADDR, MASTER_PORT not set'),
    ],
)
def test_incomplete_launcher_variables_are_refused(environment, variables, message):
    environment(**variables)
    with pytest.raises(ValueError, match=f'^{message}'):
        cluster.decide()


@pytest.mark.parametrize(
    'variables, message',
    [
        ({'WORLD_SIZE': '4'}, '--num_processes=2 but WORLD_SIZE=4'),
        ({'JAX_PROCESS_ID': '0'}, '--process_id=1 but JAX_PROCESS_ID=0'),
        ({'JAX_COORDINATOR_ADDRESS': 'h:2'}, '--coordinator_address=h:1 but JAX_COORD'),
    ],
)
def test_flags_and_launcher_variables_that_disagree_are_refused(environment, variables, message):
    environment(**variables)
    with pytest.raises(ValueError, match=f"^{message}.*expected the flags and the launcher's"):
        cluster.decide(coordinator_address='h:1', num_processes=2, process_id=1)


def test_flags_and_launcher_variables_that_agree_start(environment):
    environment(WORLD_SIZE='2', RANK='1', JAX_COORDINATOR_ADDRESS='h:1')
    startup = cluster.decide(coordinator_address='h:1', num_processes=2, process_id=1)
    assert (startup.how, startup.processes) == ('flags', 2)


def test_a_process_that_sees_fewer_gpus_than_its_node_gave_it_stops_with_one_line(environment):
    """The SLURM one-task-per-node job as JAX alone would have started it: one GPU of 8."""
    _slurm(environment, tasks=4, nodes=4, rank=2)
    expected = _expected()
    line = accelerators.device_problem(expected, 'gpu', 1, {}, '580.65.06')
    assert line == (
        'this process should see 8 GPUs (CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7, one process on '
        'this node) but JAX sees 1: expected the processes per node and the GPUs per process to '
        'agree with what the launcher gave (docs/scaling.md, "Which devices each process takes")'
    )
    assert accelerators.device_problem(expected, 'gpu', 8, {}, '580.65.06') is None


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_processes_given_only_torchruns_variables_train_as_one_run(tmp_path, cifar10_data_dir):
    """No flags: MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK alone reach
    jax.distributed.initialize. Two processes training alone would each take the workdir's
    lock in turn and one would be refused; both exit 0, one writer logs every step of the
    global batch, and process 1 says it started as one of 2."""
    workdir = tmp_path / 'run'
    port = _free_port()
    argv = [
        sys.executable,
        'train.py',
        '--config=configs/smoke.py',
        f'--workdir={workdir}',
        f'--config.dataset.data_dir={cifar10_data_dir}',
        '--config.total_steps=2',
        '--config.log_every_steps=1',
        '--config.eval_every_steps=2',
        '--config.checkpoint_every_steps=2',
    ]
    # Two CPU devices each and gloo collectives, as scripts/launch_local.py sets up.
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARIABLES}
    env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='2', PYTHONUNBUFFERED='1')
    env.update(JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', XLA_FLAGS='')
    procs = []
    for rank in range(2):
        extra = {'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'WORLD_SIZE': '2'}
        procs.append(
            subprocess.Popen(
                argv,
                cwd=REPO,
                env={**env, **extra, 'RANK': str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=360)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    assert 'starting 2 processes (torchrun variables' in outputs[1]
    records = read_metrics(str(workdir / 'metrics.jsonl'))
    assert [r['step'] for r in records if 'train/loss' in r] == [1, 2]
    evals = [r for r in records if 'eval/num_examples' in r]
    assert [r['eval/num_examples'] for r in evals] == [72]  # each example once, of 2 processes
