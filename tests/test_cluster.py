"""How processes find each other, for each kind of cluster (resnet_jax.cluster.decide).

Each test gives the environment a real cluster gives its processes and checks the decision;
JAX's own detection runs unmodified. A Cloud TPU VM is found from its metadata server, so that
test serves the metadata of worker 1 of a 4-host pod from 127.0.0.1. The real start of several
processes is covered by tests/test_reliability.py through scripts/launch_local.py.
"""

import http.server
import threading
from typing import ClassVar

import pytest
from jax._src.clusters import cloud_tpu_cluster

from resnet_jax import cluster

# Variables any launcher may have left in this test's own environment.
_CLUSTER_VARIABLES = [
    'SLURM_JOB_ID',
    'SLURM_STEP_NODELIST',
    'SLURM_NTASKS',
    'SLURM_STEP_NUM_TASKS',
    'SLURM_PROCID',
    'SLURM_LOCALID',
    'OMPI_MCA_orte_hnp_uri',
    'OMPI_COMM_WORLD_SIZE',
    'PMI_SIZE',
    'WORLD_SIZE',
    'TPU_WORKER_HOSTNAMES',
    'TPU_PROCESS_ADDRESSES',
    'TPU_WORKER_ID',
    'TPU_SKIP_MDS_QUERY',
    'KUBERNETES_SERVICE_HOST',
    'MEGASCALE_NUM_SLICES',
    'GCE_METADATA_IP',
]


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
        {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1},
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


def _slurm(environment, tasks, rank):
    environment(
        SLURM_JOB_ID='4242',
        SLURM_STEP_NODELIST='gpu[001-002]',
        SLURM_NTASKS=str(tasks),
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank % 8),
    )


def test_slurm_with_several_tasks_starts_jax_with_its_own_detection(environment):
    _slurm(environment, tasks=16, rank=9)
    assert cluster.decide() == cluster.Startup('SlurmCluster', 16, {})


def test_a_one_task_slurm_job_is_one_process(environment):
    _slurm(environment, tasks=1, rank=0)
    assert cluster.decide() == cluster.Startup('one process', 1, None)


def test_open_mpi_is_detected(environment):
    environment(
        OMPI_MCA_orte_hnp_uri='1531576320.0;tcp://10.96.0.1:34911',
        OMPI_COMM_WORLD_SIZE='4',
        OMPI_COMM_WORLD_RANK='2',
        OMPI_COMM_WORLD_LOCAL_RANK='0',
    )
    assert cluster.decide() == cluster.Startup('OmpiCluster', 4, {})


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
