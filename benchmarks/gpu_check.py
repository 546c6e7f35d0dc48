"""The GPU check: what a short rented GPU slot must tell us, in one process, in about 5 minutes.

    python3 benchmarks/gpu_check.py                           # on the GPU; results in $OUT
    SMALL=1 OUT=/tmp/check python3 benchmarks/gpu_check.py    # the same phases, tiny, on a CPU

SMALL=1 runs the same code at ResNet-18, batch 8, 64x64, 3 timed steps and 16 JPEGs (about
1-1.5 min on the 2-core development CPU; BENCHMARKS.md has the measured time).

Runs from the checkout alone (it puts its checkout first on sys.path: no install, no network)
with jax, flax, optax, numpy, opencv and, for the last phase, torch and torchvision; never
Grain, tensorflow-datasets, TensorFlow, ml-collections, tensorboardX or gcsfs (checked at the
end, from sys.modules: a run that loaded one fails). Phases, in the order of what they decide:

1. host: JPEG decode + Inception crop (the trainer's `inception_crop_flip`, crop-aware decode)
   images/s on one core and on all cores (threads): how many host cores a GPU needs. The JPEGs
   are ImageNet-sized (benchmarks/photos.py), made in memory from scikit-image's photographs,
   or from synthetic scenes where scikit-image is missing (the record says which).
2. step: our ResNet-50 train step (bf16, batch 256, 224x224, uint8 in) against the plain-Flax
   peer (benchmarks/flax_reference.py), timed in turns: compile seconds, p50 step, images/s,
   MFU by XLA's cost analysis and by the model's FLOPs (`count_flops` x 2 x 3 for forward and
   backward) against the device's dense bf16 peak (`PEAK_BF16`; null where unknown, as on a
   CPU) and against a bf16 matrix product measured here; XLA's memory analysis of the step.
3. loop: that compiled step fed by real host decoding (threads, as phase 1) through
   `resnet_jax.prefetch` (2 batches ahead), against batches already on the device: the stall
   fraction (the share of wall time the loop waited for a batch with the device idle).
4. torch: torchvision's ResNet-50 eager, bf16 autocast, channels_last, same batch; skipped with
   the reason recorded where torch, torchvision or CUDA is missing (SMALL=1 runs it on the CPU,
   so the code is exercised here).

A phase that fails is recorded with its error and the next one runs (phase 3 builds the step
itself if phase 2 failed before it had); the exit status is then 1 (2: bad flags). At full size
where JAX sees no GPU it stops at once (exit 1, the environment recorded): a broken CUDA
install costs seconds of the slot, not all of it.

Results: $OUT (or --out) gets two files, gpu_check.json (rewritten after every phase, and
marked 'running' when one starts, so a killed run still reports what it measured) and
gpu_check.txt (the lines printed); the JSON is written through a third, hidden temporary file.
No persistent compilation cache is used (one process compiles each program once: the cache
is switched off, whatever JAX_COMPILATION_CACHE_DIR says), no traces, nothing else.

Estimate on one H200, full size (nothing of it measured yet on a GPU; reasoning from the
figures in BENCHMARKS.md): start-up (python3, jax, CUDA) 15-20 s; phase 1, 256 JPEGs made
(3-6 s) and 768 decodes timed, 10-15 s; phase 2, two ResNet-50 step compiles with
cuDNN autotuning (30-60 s each) plus two init compiles (5-10 s each), the FLOP count (a few s),
3 + 30 steps of each model in turns (about 80 ms each: 5 s) and the matrix product (2 s),
80-150 s; phase 3 reuses the compiled step: 2 x 33 steps, the host-fed ones at the threads'
decode rate (about 256 images per step at 1,500-3,000 images/s), 15-25 s; phase 4, torch
import and CUDA context (10 s), cuDNN benchmark warm-up (5-10 s), 30 steps (3 s), 20-30 s.
In all 2.5-4 min, at most about 5 with the compiles at their slow end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's resnet_jax, whatever is installed
# Torch runs in this process after JAX: JAX must not take 75% of the GPU up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
# No persistent compilation cache: nothing compiles twice here, and it must not write to $OUT.
os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)

import cv2  # noqa: E402
import flax_reference  # noqa: E402  (benchmarks/, beside this file)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import photos  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import resnet_jax as rj  # noqa: E402
from resnet_jax import augment, datasets, decode, optim, prefetch, sharding, steps  # noqa: E402
from resnet_jax.train_state import create_train_state  # noqa: E402

with contextlib.suppress(AttributeError):  # an option a later jax may drop; the env is cleared
    jax.config.update('jax_enable_compilation_cache', False)
PHASES = ('host', 'step', 'loop', 'torch')
NOT_ALLOWED = (
    'grain',
    'tensorflow_datasets',
    'tensorflow',
    'ml_collections',
    'tensorboardX',
    'gcsfs',
    'array_record',
)
# Dense bf16 peak FLOP/s by JAX's device_kind. NVIDIA's H100 and H200 datasheets give 1,979
# TFLOPS for bf16 Tensor Cores "with sparsity" (SXM parts); dense is half. A matrix product of
# 8192^3 bf16 on random data ran at 769-798 TFLOP/s on this workplace's H200s (the device
# tool's KINDS.md): phase 2 measures its own.
PEAK_BF16 = {'NVIDIA H200': 989.5e12, 'NVIDIA H100 80GB HBM3': 989.5e12}
MEAN = np.asarray(datasets.IMAGENET_MEAN, np.float32)
STD = np.asarray(datasets.IMAGENET_STD, np.float32)
CLASSES = 1000
OUT_JSON, OUT_TEXT = 'gpu_check.json', 'gpu_check.txt'


@dataclasses.dataclass(frozen=True)
class Settings:
    out: str
    small: bool
    model: str
    phases: tuple[str, ...]
    fail: str
    batch_size: int
    image_size: int
    steps: int
    warmup: int
    jpegs: int
    threads: int
    matmul: int


# --- The record -------------------------------------------------------------------------------


class Report:
    """The JSON record and the text log under `out`, both rewritten as the check goes."""

    def __init__(self, out: str, environment: dict):
        self.out = out
        self.start = time.perf_counter()
        self.record: dict = {'environment': environment, 'phases': {}}
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, OUT_TEXT), 'w'):
            pass

    def log(self, line: str) -> None:
        print(line, flush=True)
        with open(os.path.join(self.out, OUT_TEXT), 'a') as f:
            f.write(line + '\n')

    def save(self) -> None:
        self.record['elapsed_s'] = round(time.perf_counter() - self.start, 2)
        self.record['summary'] = summarize(self.record['phases'])
        temporary = os.path.join(self.out, f'.{OUT_JSON}.tmp')
        with open(temporary, 'w') as f:
            json.dump(self.record, f, indent=1, default=_plain)
        os.replace(temporary, os.path.join(self.out, OUT_JSON))


def _plain(value):
    """numpy scalars as Python numbers, for json."""
    return value.item() if hasattr(value, 'item') else str(value)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {f'p{q}_ms': float(np.percentile(ms, q)) for q in (10, 50, 90)}


def summarize(phases: dict) -> dict:
    """The figures that decide, from whatever phases have finished."""
    out = {}
    host = phases.get('host', {})
    step = phases.get('step', {}).get('runs', {})
    ours = step.get('ours', {})
    if 'images_per_cpu_s' in host:
        out['host_images_per_s_per_core'] = host['images_per_cpu_s']
    if 'images_per_s' in ours:
        out['ours_images_per_s'] = ours['images_per_s']
        out['ours_mfu_model'] = ours.get('mfu_model')
        out['ours_mfu_xla'] = ours.get('mfu_xla')
        if 'host_images_per_s_per_core' in out:
            out['host_cores_to_feed_ours'] = (
                ours['images_per_s'] / out['host_images_per_s_per_core']
            )
        out['ours_fraction_of_matmul'] = ours.get('fraction_of_matmul')
    if 'images_per_s' in step.get('flax', {}):
        out['flax_step_over_ours'] = step['flax']['p50_ms'] / ours['p50_ms']
    loop = phases.get('loop', {})
    if 'stall_fraction' in loop:
        out['loop_stall_fraction'] = loop['stall_fraction']
    torch_run = phases.get('torch', {})
    if 'p50_ms' in torch_run and 'p50_ms' in ours:
        out['torch_step_over_ours'] = torch_run['p50_ms'] / ours['p50_ms']
    return out


def environment(cfg: Settings) -> dict:
    device = jax.devices()[0]
    return {
        'settings': dataclasses.asdict(cfg),
        'device_kind': device.device_kind,
        'platform': device.platform,
        'device_count': jax.device_count(),
        'host': f'{platform.machine()}, {os.cpu_count()} CPU cores',
        'python': platform.python_version(),
        'versions': {name: _version(name) for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy')}
        | {'opencv': cv2.__version__},
        'resnet_jax': os.path.dirname(rj.__file__),
        'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
        'nvidia_smi': nvidia_smi(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> str | None:
    """The card's name, driver, clocks and power as found (None without nvidia-smi)."""
    if shutil.which('nvidia-smi') is None:
        return None
    query = 'name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu'
    try:
        done = subprocess.run(
            ['nvidia-smi', f'--query-gpu={query}', '--format=csv'],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f'nvidia-smi failed: {e}'
    return (done.stdout or done.stderr).strip()


def not_allowed_loaded(modules=None) -> list[str]:
    """The packages of NOT_ALLOWED that were imported (top-level names in sys.modules)."""
    loaded = {name.split('.')[0] for name in (sys.modules if modules is None else modules)}
    return sorted(loaded & set(NOT_ALLOWED))


# --- Phase 1: host decoding -------------------------------------------------------------------


class Shared:
    """What later phases reuse: the JPEGs and our compiled step, made once, by whoever needs
    them first."""

    def __init__(self, cfg: Settings):
        self.cfg = cfg
        self._jpegs = None
        self._ours = None

    def jpegs(self) -> tuple[list[bytes], dict]:
        if self._jpegs is None:
            start = time.perf_counter()
            scenes, source = photos.photographs_or_synthetic()
            made = list(photos.jpegs(self.cfg.jpegs, sources=scenes))
            about = {
                'source': source,
                'count': len(made),
                'mean_bytes': float(np.mean([len(d) for d, _ in made])),
                'mean_pixels': float(np.mean([p for _, p in made])),
                'made_s': time.perf_counter() - start,
            }
            self._jpegs = ([d for d, _ in made], about)
        return self._jpegs

    def ours(self) -> Ours:
        if self._ours is None:
            self._ours = build_ours(self.cfg)
        return self._ours


CROP = augment.parse_chain('inception_crop_flip')


def decode_crop(data: bytes, index: int, crop: int) -> np.ndarray:
    """One image as the trainer's host pipeline makes it: crop-aware decode + Inception crop +
    flip, uint8 HWC; the generator is the example's own."""
    image = decode.EncodedImage(data, where=f'JPEG {index}')
    rng = np.random.default_rng([0, index])
    return augment.apply_host(CROP, image, rng, augment.Context(crop_size=crop))


def decode_rate(jpegs: list[bytes], images: int, threads: int, crop: int) -> dict:
    """images/s and images per CPU-second of decode_crop over `images` images."""
    work = [(jpegs[i % len(jpegs)], i) for i in range(images)]
    wall, cpu = time.perf_counter(), time.process_time()
    if threads == 1:
        for data, i in work:
            decode_crop(data, i, crop)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda w: decode_crop(w[0], w[1], crop), work))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        'threads': threads,
        'images': images,
        'images_per_s': images / wall,
        'images_per_cpu_s': images / cpu if cpu > 0 else None,
        'cores_busy': cpu / wall,
    }


def phase_host(cfg: Settings, shared: Shared, rec: dict, log) -> None:
    jpegs, about = shared.jpegs()
    rec['jpegs'] = about
    log(
        f'{about["count"]} JPEGs from {about["source"]}: {about["mean_bytes"] / 1e3:.0f} KB, '
        f'{about["mean_pixels"] / 1e3:.0f} K pixels on average, made in {about["made_s"]:.1f} s'
    )
    decode_crop(jpegs[0], 0, cfg.image_size)  # warm-up: OpenCV's first call
    one = decode_rate(jpegs, len(jpegs), 1, cfg.image_size)
    many = decode_rate(jpegs, 2 * len(jpegs), cfg.threads, cfg.image_size)
    rec.update(one_thread=one, all_threads=many)
    rec['images_per_cpu_s'] = one['images_per_cpu_s'] or one['images_per_s']
    for r in (one, many):
        log(
            f'decode + Inception crop to {cfg.image_size}, threads: {r["threads"]}: '
            f'{r["images_per_s"]:,.0f} images/s, {r["cores_busy"]:.2f} cores busy'
        )


# --- Phase 2: our step against the plain-Flax peer --------------------------------------------


@dataclasses.dataclass
class Ours:
    """Our compiled train step on one device, with its state (donated: replaced each call)."""

    model: rj.ResNet
    compiled: object
    state: object
    batch: dict
    to_device: object
    compile_s: float
    init_s: float

    def run(self, batch: dict | None = None):
        self.state, metrics = self.compiled(self.state, self.batch if batch is None else batch)
        return metrics['loss']


def random_batch(cfg: Settings, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    size = (cfg.batch_size, cfg.image_size, cfg.image_size, 3)
    return {
        'image': rng.integers(0, 256, size, np.uint8),
        'label': rng.integers(0, CLASSES, cfg.batch_size).astype(np.int32),
    }


def build_ours(cfg: Settings) -> Ours:
    """The trainer's step (uint8 in, normalised inside, explicit shardings, state donated)."""
    model = rj.create_model(
        cfg.model, num_classes=CLASSES, shortcut='B', stride_on='3x3', dtype='bfloat16'
    )
    shape = (cfg.image_size, cfg.image_size, 3)
    mesh = sharding.data_mesh(jax.devices()[:1])
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    tx, schedule = optim.create_optimizer(
        optim.OptimizerConfig(), params, total_steps=10_000, steps_per_epoch=100
    )
    init = lambda: create_train_state(model, tx, 0, shape)
    shardings = sharding.state_shardings(jax.eval_shape(init), mesh)
    start = time.perf_counter()
    state = jax.block_until_ready(jax.jit(init, out_shardings=shardings)())
    init_s = time.perf_counter() - start
    to_device = lambda b: sharding.global_batch(b, mesh)
    batch = to_device(random_batch(cfg, 0))
    normalize = lambda images: augment.normalize(images, MEAN, STD)
    step = jax.jit(
        steps.make_train_step(model, tx, schedule, normalize=normalize),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    return Ours(model, compiled, state, batch, to_device, compile_s, init_s)


def build_flax(cfg: Settings):
    """The plain-Flax peer's step (float32 images ready on the device), initialised under jit
    at batch 1 (the parameters do not depend on the batch); (run, compile_s, init_s)."""
    model = flax_reference.create(cfg.model, CLASSES, jnp.bfloat16)
    shape = (cfg.image_size, cfg.image_size, 3)
    start = time.perf_counter()
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *shape)), train=False))
    variables = jax.block_until_ready(init(jax.random.key(0)))
    init_s = time.perf_counter() - start
    tx = optax.sgd(0.1, momentum=0.9)
    params, batch_stats = variables['params'], variables['batch_stats']
    opt_state = tx.init(params)
    host = random_batch(cfg, 1)
    images = jnp.asarray(augment.normalize(host['image'], MEAN, STD))
    labels = jnp.asarray(host['label'])
    step = jax.jit(flax_reference.make_train_step(model, tx), donate_argnums=(0, 1, 2))
    start = time.perf_counter()
    compiled = step.lower(params, batch_stats, opt_state, images, labels).compile()
    compile_s = time.perf_counter() - start
    holder = [params, batch_stats, opt_state]

    def run():
        *holder[:], (loss, _) = compiled(*holder, images, labels)
        return loss

    return run, compile_s, init_s


def in_turns(runs: dict, steps_: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each step of each run, the runs timed in turn, step by step (so machine
    drift falls on all alike), after `warmup` untimed steps each."""
    for run in runs.values():
        for _ in range(warmup):
            jax.block_until_ready(run())
    times = {name: [] for name in runs}
    for _ in range(steps_):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return times


def step_figures(seconds: list[float], batch_size: int, flops: dict, peak: float | None) -> dict:
    """p10/p50/p90, images/s and, per FLOP count, TFLOP/s and MFU (null without a peak)."""
    out = percentiles(seconds)
    p50 = out['p50_ms'] / 1e3
    out['images_per_s'] = batch_size / p50
    for name, count in flops.items():
        out[f'tflops_{name}'] = count / p50 / 1e12
        out[f'mfu_{name}'] = count / p50 / peak if peak else None
    return out


def matmul_ceiling(n: int, repeats: int = 10) -> float:
    """TFLOP/s of an n x n x n bf16 matrix product on random data (median of `repeats`)."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    product = jax.jit(jnp.matmul)
    jax.block_until_ready(product(a, b))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a, b))
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(seconds)) / 1e12


def xla_flops(compiled) -> float | None:
    """FLOPs of one call by XLA's cost analysis; None where the backend gives none."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost['flops']) if isinstance(cost, dict) and 'flops' in cost else None


def phase_step(cfg: Settings, shared: Shared, rec: dict, log) -> None:
    ours = shared.ours()
    memory = ours.compiled.memory_analysis()
    rec['memory_bytes'] = {
        name: int(getattr(memory, f'{name}_size_in_bytes'))
        for name in ('temp', 'argument', 'output')
        if memory is not None and hasattr(memory, f'{name}_size_in_bytes')
    }
    shape = (cfg.image_size, cfg.image_size, 3)
    model_flops = 2 * 3 * rj.count_flops(ours.model, shape) * cfg.batch_size
    rec['flops_per_step'] = {'xla': xla_flops(ours.compiled), 'model': model_flops}
    if rec['flops_per_step']['xla'] is None:
        del rec['flops_per_step']['xla']
    kind = jax.devices()[0].device_kind
    peak = PEAK_BF16.get(kind)
    rec['peak_bf16_tflops'] = peak and peak / 1e12
    flax_run, flax_compile_s, flax_init_s = build_flax(cfg)
    runs = {'ours': ours.run, 'flax': flax_run}
    times = in_turns(runs, cfg.steps, cfg.warmup)
    compile_s = {'ours': ours.compile_s, 'flax': flax_compile_s}
    init_s = {'ours': ours.init_s, 'flax': flax_init_s}
    rec['runs'] = {}
    for name in runs:
        flops = rec['flops_per_step'] if name == 'ours' else {'model': model_flops}
        figures = step_figures(times[name], cfg.batch_size, flops, peak)
        rec['runs'][name] = {'compile_s': compile_s[name], 'init_s': init_s[name], **figures}
        mfu = ', '.join(f'{count} {100 * figures[f"mfu_{count}"]:.1f}%' for count in flops if peak)
        log(
            f'{name:5s} compile {compile_s[name]:6.1f} s, p50 step {figures["p50_ms"]:8.1f} ms, '
            f'{figures["images_per_s"]:8.1f} images/s, MFU by FLOPs of '
            + (mfu or f'-: no peak known for {kind!r}')
        )
    ceiling = matmul_ceiling(cfg.matmul)
    rec['matmul'] = {'n': cfg.matmul, 'tflops': ceiling}
    ours_tflops = rec['runs']['ours']['tflops_model']
    rec['runs']['ours']['fraction_of_matmul'] = ours_tflops / ceiling
    log(
        f'bf16 matmul {cfg.matmul}^3: {ceiling:.2f} TFLOP/s; ours {ours_tflops:.3f} TFLOP/s '
        f'(model FLOPs) = {100 * ours_tflops / ceiling:.1f}% of it'
    )


# --- Phase 3: the loop fed by host decoding ---------------------------------------------------


class HostBatches:
    """Endless uint8 batches decoded and cropped from `jpegs` by the threads of `pool`.

    An iterator, not a generator: the prefetcher's `close()` closes it while its thread may be
    inside `next()`, which a generator refuses (ValueError: generator already executing).
    """

    def __init__(self, jpegs: list[bytes], cfg: Settings, pool):
        self.jpegs, self.cfg, self.pool = jpegs, cfg, pool
        self.rng = np.random.default_rng(2)
        self.first = 0

    def __iter__(self) -> HostBatches:
        return self

    def __next__(self) -> dict:
        size, crop, jpegs = self.cfg.batch_size, self.cfg.image_size, self.jpegs
        work = lambda i: decode_crop(jpegs[i % len(jpegs)], i, crop)
        images = np.stack(list(self.pool.map(work, range(self.first, self.first + size))))
        self.first += size
        return {'image': images, 'label': self.rng.integers(0, CLASSES, size).astype(np.int32)}


def timed_loop(ours: Ours, batches, steps_: int, warmup: int) -> dict:
    """The trainer's loop shape: next batch, step, wait for the step (so time in next() is time
    the device had nothing to do); images/s, step percentiles, stall fraction."""
    for _ in range(warmup):
        jax.block_until_ready(ours.run(next(batches)))
    waited, seconds = 0.0, []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps_):
        start = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - start
        jax.block_until_ready(ours.run(batch))
        seconds.append(time.perf_counter() - start)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    batch_size = ours.batch['label'].shape[0]
    return {
        'images_per_s': steps_ * batch_size / wall,
        'stall_fraction': waited / wall,
        'cores_busy': cpu / wall,
        **percentiles(seconds),
    }


def phase_loop(cfg: Settings, shared: Shared, rec: dict, log) -> None:
    jpegs, _ = shared.jpegs()
    ours = shared.ours()
    on_device = [ours.to_device(random_batch(cfg, seed)) for seed in (3, 4)]
    cycle = (on_device[i % 2] for i in range(2**62))
    rec['on_device'] = timed_loop(ours, cycle, cfg.steps, cfg.warmup)
    with concurrent.futures.ThreadPoolExecutor(cfg.threads) as pool:
        fed = prefetch.prefetch_to_device(HostBatches(jpegs, cfg, pool), ours.to_device, 2)
        try:
            rec['host_fed'] = timed_loop(ours, fed, cfg.steps, cfg.warmup)
        finally:
            fed.close()
    rec.update(threads=cfg.threads, prefetch_batches=2)
    rec['stall_fraction'] = rec['host_fed']['stall_fraction']
    rec['fed_over_on_device'] = rec['host_fed']['images_per_s'] / rec['on_device']['images_per_s']
    for name in ('on_device', 'host_fed'):
        r = rec[name]
        log(
            f'loop, {name:9s}: {r["images_per_s"]:8.1f} images/s, p50 step {r["p50_ms"]:.1f} ms, '
            f'stall {100 * r["stall_fraction"]:.1f}%, {r["cores_busy"]:.2f} cores busy'
        )


# --- Phase 4: torchvision ---------------------------------------------------------------------


def phase_torch(cfg: Settings, shared: Shared, rec: dict, log) -> None:
    del shared
    try:
        import torch
        import torchvision
    except ImportError as e:
        rec.update(status='skipped', reason=f'torch or torchvision missing: {e}')
        return log(f'torch: skipped ({rec["reason"]})')
    rec['versions'] = {'torch': torch.__version__, 'torchvision': torchvision.__version__}
    if not torch.cuda.is_available() and not cfg.small:
        rec.update(status='skipped', reason='torch sees no CUDA device')
        return log(f'torch: skipped ({rec["reason"]})')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.backends.cudnn.benchmark = True
    model = getattr(torchvision.models, cfg.model)(num_classes=CLASSES)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    size = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    images = torch.randn(size, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (cfg.batch_size,), device=device)

    def run():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        if device == 'cuda':
            torch.cuda.synchronize()
        return loss.detach()

    start = time.perf_counter()
    run()  # cuDNN's benchmark picks its kernels here
    rec['first_step_s'] = time.perf_counter() - start
    times = in_turns({'torch': run}, cfg.steps, cfg.warmup)['torch']
    rec.update(device=device, **percentiles(times))
    rec['images_per_s'] = cfg.batch_size / (rec['p50_ms'] / 1e3)
    log(
        f'torch (eager, bf16 autocast, channels_last, {device}): first step '
        f'{rec["first_step_s"]:.1f} s, p50 step {rec["p50_ms"]:.1f} ms, '
        f'{rec["images_per_s"]:.1f} images/s'
    )


PHASE_FUNCTIONS = {'host': phase_host, 'step': phase_step, 'loop': phase_loop, 'torch': phase_torch}


# --- Running it -------------------------------------------------------------------------------


def run_phase(name: str, cfg: Settings, shared: Shared, report: Report) -> bool:
    """Runs one phase into its record; False where it failed (recorded, not raised)."""
    rec = report.record['phases'].setdefault(name, {})
    rec['status'] = 'running'
    report.save()
    report.log(f'== {name}')
    start = time.perf_counter()
    try:
        if cfg.fail == name:
            raise RuntimeError(f'--fail={name}: failing on purpose (a test of the failure path)')
        PHASE_FUNCTIONS[name](cfg, shared, rec, report.log)
        if rec['status'] == 'running':
            rec['status'] = 'ok'
    except Exception as e:
        rec.update(status='failed', error=f'{type(e).__name__}: {e}')
        rec['traceback'] = traceback.format_exc()[-3000:]
        report.log(f'{name}: FAILED: {rec["error"]}')
    rec['seconds'] = time.perf_counter() - start
    report.save()
    return rec['status'] != 'failed'


def check(cfg: Settings) -> int:
    """All asked phases, then the import check; the exit status."""
    env = environment(cfg)
    report = Report(cfg.out, env)
    report.log(
        f'{env["device_count"]} x {env["device_kind"]} ({env["platform"]}), {env["host"]}, '
        f'jax {env["versions"]["jax"]}; results in {cfg.out}'
    )
    if env['platform'] == 'cpu' and not cfg.small:
        report.record['error'] = 'JAX sees no GPU: the full size would take hours on a CPU'
        report.save()
        report.log(f'FAILED: {report.record["error"]} (SMALL=1 runs it tiny)')
        return 1
    shared = Shared(cfg)
    ok = [run_phase(name, cfg, shared, report) for name in cfg.phases]
    loaded = not_allowed_loaded()
    report.record['not_allowed_loaded'] = loaded
    if loaded:
        report.log(f'FAILED: imported what the GPU image lacks: {", ".join(loaded)}')
    report.save()
    failed = [name for name, good in zip(cfg.phases, ok, strict=True) if not good]
    summary = report.record['summary']
    report.log('summary: ' + json.dumps(summary, default=_plain))
    report.log(
        f'done in {report.record["elapsed_s"]:.0f} s; '
        + (f'failed: {", ".join(failed)}' if failed else 'no phase failed')
    )
    return 1 if failed or loaded else 0


def parse(argv: list[str] | None = None) -> Settings:
    small = os.environ.get('SMALL', '') not in ('', '0')
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=os.environ.get('OUT'), help='default: $OUT')
    parser.add_argument('--phases', default=','.join(PHASES), help='comma-separated, in order')
    parser.add_argument('--fail', default='', help='make this phase fail (tests the failure path)')
    parser.add_argument(
        '--model', default='resnet18' if small else 'resnet50', choices=('resnet50', 'resnet18')
    )
    parser.add_argument('--batch_size', type=int, default=8 if small else 256)
    parser.add_argument('--image_size', type=int, default=64 if small else 224)
    parser.add_argument('--steps', type=int, default=3 if small else 30, help='timed steps')
    parser.add_argument('--warmup', type=int, default=1 if small else 3)
    parser.add_argument('--jpegs', type=int, default=16 if small else 256)
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--matmul', type=int, default=256 if small else 8192, help='its side')
    args = parser.parse_args(argv)
    if not args.out:
        parser.error('no output folder: set OUT or pass --out=DIR')
    phases = tuple(p for p in args.phases.split(',') if p)
    if not phases:
        parser.error(f'--phases={args.phases!r}: expected at least one of {", ".join(PHASES)}')
    for name in (*phases, *([args.fail] if args.fail else [])):
        if name not in PHASES:
            parser.error(f'unknown phase {name!r}; expected names from {", ".join(PHASES)}')
    for name, least in (('batch_size', 1), ('image_size', 32), ('steps', 1), ('warmup', 1),
                        ('jpegs', 1), ('threads', 1), ('matmul', 16)):  # fmt: skip
        if getattr(args, name) < least:
            parser.error(f'--{name}={getattr(args, name)}: expected at least {least}')
    return Settings(**{**vars(args), 'small': small, 'phases': phases})


if __name__ == '__main__':
    sys.exit(check(parse()))
