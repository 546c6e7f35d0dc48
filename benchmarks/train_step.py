"""Train-step throughput: our jitted step beside a plain-Flax peer and PyTorch, same device.

    python benchmarks/train_step.py --model=resnet20 --batch_size=32 --image_size=32 \
        --dtype=float32 --steps=20 [--devices=1] [--peers=flax,torch]

"ours" is the trainer's own step (`resnet_jax.steps.make_train_step`, jitted with the
trainer's shardings and donation) on synthetic data resident on the device: uint8 images, as
the trainer's batches, normalised inside the step (the peers get float32 images ready). Peers
run the same network (same blocks and shortcut projections, stride on the 3x3 for
bottlenecks) at the same batch: "flax" is benchmarks/flax_reference.py (the flax imagenet
example, reduced); "torch" is torchvision's model (a CIFAR ResNet written here for resnet20),
channels_last, with bf16 autocast and a `torch.compile` column on GPU. Prints compile
seconds, median step time, images/s (per device), XLA's FLOP/s and, where the peak is known,
the fraction of peak; ratios ours/peer; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import flax_reference
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import resnet_jax as rj
from resnet_jax import augment, datasets, optim, sharding, steps
from resnet_jax.train_state import create_train_state

IMAGENET_MEAN = np.asarray(datasets.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.asarray(datasets.IMAGENET_STD, np.float32)
# Dense bf16 peak FLOP/s by device kind (a multiply-add is 2 FLOPs).
PEAK_FLOPS = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H200': 989e12}


def _interleaved_step_times(runs: dict, steps: int) -> dict[str, float]:
    """Median seconds per step of each run, timing them in turn, step by step.

    Round-robin timing exposes every implementation to the same machine state (other load,
    clock changes), which matters on a small shared CPU where back-to-back runs drift by 20%.
    """
    for run in runs.values():  # warm-up: one untimed step each
        jax.block_until_ready(run())
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_ours(args, devices) -> dict:
    model = rj.create_model(
        args.model,
        num_classes=args.num_classes,
        shortcut='B',
        stride_on='3x3',
        dtype=args.dtype,
        scan_blocks=args.scan_blocks,
    )
    shape = (args.image_size, args.image_size, 3)
    mesh = sharding.data_mesh(devices)
    params = jax.eval_shape(lambda: rj.init_variables(model, jax.random.key(0), shape))['params']
    tx, schedule = optim.create_optimizer(
        optim.OptimizerConfig(), params, total_steps=1000, steps_per_epoch=100
    )
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, 0, shape))
    shardings = sharding.state_shardings(abstract, mesh)
    state = jax.jit(lambda: create_train_state(model, tx, 0, shape), out_shardings=shardings)()
    batch_sharding = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            'image': rng.integers(0, 256, (args.batch_size, *shape), np.uint8),
            'label': rng.integers(0, args.num_classes, args.batch_size).astype(np.int32),
        },
        batch_sharding,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    normalize = lambda images: augment.normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    step = jax.jit(
        steps.make_train_step(model, tx, schedule, normalize=normalize),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {'state': state}

    def run():
        holder['state'], metrics = compiled(holder['state'], batch)
        return metrics['loss']

    return {'compile_s': compile_s, 'flops': cost['flops']}, run


def bench_flax(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    model = flax_reference.create(args.model, args.num_classes, dtype)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    tx = optax.sgd(0.1, momentum=0.9)
    params, batch_stats = variables['params'], variables['batch_stats']
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, args.num_classes, args.batch_size), jnp.int32)
    step = jax.jit(flax_reference.make_train_step(model, tx), donate_argnums=(0, 1, 2))
    start = time.perf_counter()
    compiled = step.lower(params, batch_stats, opt_state, images, labels).compile()
    compile_s = time.perf_counter() - start
    holder = [params, batch_stats, opt_state]

    def run():
        *holder[:], loss = compiled(*holder, images, labels)
        return loss

    return {'compile_s': compile_s}, run


def _torch_model(name: str, num_classes: int):
    import torch
    import torchvision
    from torch import nn

    if name != 'resnet20':
        return getattr(torchvision.models, name)(num_classes=num_classes)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:  # option B, as ours and the Flax peer here
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, width, stride if i == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def bench_torch(args, compiled: bool = False) -> dict:
    import torch

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = _torch_model(args.model, args.num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.to(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    autocast = args.dtype == 'bfloat16'
    forward = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    def run():
        loss = step()
        if device == 'cuda':
            torch.cuda.synchronize()
        return loss.detach()

    start = time.perf_counter()
    run()  # the first call compiles (torch.compile) and warms up the allocator
    return {'compile_s': time.perf_counter() - start}, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet20', choices=['resnet20', 'resnet18', 'resnet50'])
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--image_size', type=int, default=32)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--devices', type=int, default=1)
    parser.add_argument('--num_classes', type=int, default=10)
    parser.add_argument('--scan_blocks', action='store_true')
    parser.add_argument('--peers', default='flax,torch', help='comma-separated: flax, torch')
    args = parser.parse_args()
    if args.devices > jax.device_count():
        parser.error(f'--devices {args.devices} exceeds the {jax.device_count()} devices here')
    if args.batch_size % args.devices:
        parser.error(f'--batch_size {args.batch_size} is not divisible by --devices {args.devices}')
    devices = jax.devices()[: args.devices]
    kind = devices[0].device_kind
    results = {
        'model': args.model,
        'batch_size': args.batch_size,
        'image_size': args.image_size,
        'dtype': args.dtype,
        'devices': args.devices,
        'device_kind': kind,
        'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
    }
    benches = {'ours': bench_ours(args, devices)}
    peers = [p for p in args.peers.split(',') if p]
    if 'flax' in peers:
        benches['flax'] = bench_flax(args)
    if 'torch' in peers:
        benches['torch'] = bench_torch(args)
        if devices[0].platform == 'gpu':
            benches['torch_compile'] = bench_torch(args, compiled=True)
    runs = {name: info for name, (info, _) in benches.items()}
    step_s = _interleaved_step_times({name: run for name, (_, run) in benches.items()}, args.steps)
    for name, seconds in step_s.items():
        runs[name]['step_s'] = seconds
    ours = runs['ours']
    flops_per_s = ours['flops'] / ours['step_s']
    peak = PEAK_FLOPS.get(kind)
    for name, run in runs.items():
        run['images_per_s'] = args.batch_size / run['step_s']
        run['images_per_s_per_device'] = run['images_per_s'] / (
            args.devices if name == 'ours' else 1
        )
        # > 1: ours is faster (the peer's step takes that many times as long).
        ratio = '' if name == 'ours' else f'  ours/{name} {run["step_s"] / ours["step_s"]:.2f}x'
        print(
            f'{name:14s} compile {run["compile_s"]:7.1f} s  step {1e3 * run["step_s"]:8.1f} ms  '
            f'{run["images_per_s"]:9.1f} images/s{ratio}'
        )
    results['ours_tflops_per_s'] = flops_per_s / 1e12
    results['ours_fraction_of_peak'] = flops_per_s / peak if peak else None
    where = f', {100 * flops_per_s / peak:.1f}% of peak' if peak else ', peak unknown here'
    print(f'ours: {flops_per_s / 1e12:.3f} TFLOP/s (XLA cost analysis){where}')
    results['runs'] = runs
    results['ratios'] = {
        f'ours/{n}': r['step_s'] / ours['step_s'] for n, r in runs.items() if n != 'ours'
    }
    print(json.dumps(results))


if __name__ == '__main__':
    main()
