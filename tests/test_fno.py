"""Facts about physnb.fno that a notebook cannot hold: multi-process DDP, checkpoint files, gradients of the fast path."""
import os
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from physnb.core import load_checkpoint, save_checkpoint
from physnb.fno import FNO, FNOConfig, SpectralConv2d, neuralop_n_modes, spectral_conv_reference

torch.set_num_threads(1)
CONFIG = dict(in_channels=3, width=8, modes=(4, 3), n_layers=2)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 1, 16, 16, generator=g)


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(FNO(FNOConfig(**CONFIG)))
        x, y = _batch()
        half = len(x) // world
        loss = (model(x[rank * half:(rank + 1) * half]) - y[rank * half:(rank + 1) * half]).pow(2).mean()
        loss.backward()
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        save_checkpoint(os.path.join(out_dir, f'rank{rank}.safetensors'), grads=grads)
    finally:
        dist.destroy_process_group()


def test_ddp_allreduces_the_real_spectral_gradients(tmp_path):
    "Two gloo processes: every gradient, the spectral weights included, is identical across ranks and equals the one-process gradient."
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    ranks = [load_checkpoint(tmp_path / f'rank{r}.safetensors')['grads'] for r in range(2)]
    torch.manual_seed(0)
    model = FNO(FNOConfig(**CONFIG))
    x, y = _batch()
    (model(x) - y).pow(2).mean().backward()        # mean over the whole batch = average of the two halves' means
    spectral = [n for n, _ in model.named_parameters() if n.startswith('spectral.') and n.endswith('weight')]
    assert spectral and all(not p.is_complex() for p in model.parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], atol=0, rtol=0)
        torch.testing.assert_close(ranks[0][name], p.grad, atol=1e-6, rtol=1e-5)


def test_checkpoint_round_trip_restores_the_same_operator(tmp_path):
    "save_checkpoint/load_checkpoint (safetensors + JSON config) rebuild a model with bit-identical outputs."
    torch.manual_seed(1)
    config = FNOConfig(**CONFIG, channel_mlp=True)
    model = FNO(config)
    save_checkpoint(tmp_path / 'fno.safetensors', model=model.state_dict(), config=asdict(config))
    ck = load_checkpoint(tmp_path / 'fno.safetensors')
    restored = FNO(FNOConfig(**ck['config']))
    restored.load_state_dict(ck['model'])
    assert restored.config == config
    x, _ = _batch()
    assert torch.equal(restored(x), model(x))


def test_fast_path_gradients_equal_the_reference_gradients():
    "Backward through the truncated DFT equals backward through rfft2/irfft2, for input, weights and bias (float64)."
    torch.manual_seed(2)
    conv = SpectralConv2d(3, 2, (5, 4)).double()
    x = torch.randn(2, 3, 20, 18, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 2, 20, 18, dtype=torch.float64)
    grads = []
    for f in (conv, lambda x: spectral_conv_reference(conv, x)):
        x.grad, conv.weight.grad, conv.bias.grad = None, None, None
        f(x).backward(g)
        grads.append([x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.oracle
def test_mode_convention_matches_neuraloperator():
    "Our modes=m and neuraloperator's n_modes=(2m, 2m-1) keep the same modes: copied weights give the same layer."
    neuralop = pytest.importorskip('neuralop')
    from neuralop.layers.spectral_convolution import SpectralConv
    torch.manual_seed(3)
    m, c = 4, 3
    theirs = SpectralConv(c, c, n_modes=neuralop_n_modes(m))
    ours = SpectralConv2d(c, c, m)
    w = theirs.weight.to_tensor() if hasattr(theirs.weight, 'to_tensor') else theirs.weight
    with torch.no_grad():
        ours.weight.copy_(torch.view_as_real(w.detach().roll(m, dims=2).permute(3, 2, 0, 1)).permute(0, 1, 2, 4, 3))
        ours.bias.copy_(theirs.bias.detach().flatten())
    x = torch.randn(2, c, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
