"""The forward/backward demo that `make train` runs, on real CIFAR-10 images."""

import pytest

import demo_step  # scripts/, on pytest's pythonpath


@pytest.mark.slow
def test_demo_trains_on_real_images(cifar10_data_dir, capsys):
    flags = ['--num_images', '16', '--batch_size', '8', '--steps', '3']
    demo_step.main(['--data_dir', str(cifar10_data_dir), *flags])
    out = capsys.readouterr().out
    assert 'resnet20: 269,722 parameters, 16 real CIFAR-10 images' in out
    assert 'step    3  loss' in out
    assert 'eval mode: accuracy' in out


def test_demo_images_are_real_cifar10(cifar10_data_dir):
    images, labels = demo_step.load_images(str(cifar10_data_dir), 'test', 64, seed=0)
    assert images.shape == (64, 32, 32, 3) and images.dtype == 'uint8'
    assert set(labels) <= set(range(10)) and len(set(labels)) > 3
    assert 20 < images.mean() < 235  # decoded pixels, not zeros


def test_demo_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"dataset 'cifar10_jpeg' not found in data_dir"):
        demo_step.main(['--data_dir', str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        demo_step.main(['--data_dir', str(tmp_path), '--batch_size', '0'])
    assert exit_info.value.code == 2
    assert '--batch_size must be a positive int, got 0' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        demo_step.main(['--data_dir', str(tmp_path), '--model', 'resnet50'])
    assert exit_info.value.code == 2
