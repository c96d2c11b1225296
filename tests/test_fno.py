"""Facts about physnb.models.fno that a notebook cannot hold: multi-process DDP, checkpoint files, gradients of the fast path, error messages."""
import os
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from physnb.core import load_checkpoint, save_checkpoint
from physnb.models.fno import FNO, FNOConfig, SpectralConv2d, neuralop_n_modes, spectral_conv_reference

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


@pytest.mark.parametrize('fields, message', [
    (dict(lifting_ratio=-1), 'lifting_ratio=-1 is not allowed: use a finite number >= 0 (0 = one linear map)'),
    (dict(projection_ratio=-0.5), 'projection_ratio=-0.5 is not allowed: use a finite number >= 0'),
    (dict(channel_mlp_expansion=-2.0), 'channel_mlp_expansion=-2.0 is not allowed: use a finite number >= 0'),
    (dict(lifting_ratio=float('nan')), 'lifting_ratio=nan is not allowed'),
    (dict(projection_ratio=float('inf')), 'projection_ratio=inf is not allowed'),
    (dict(lifting_ratio='2'), "lifting_ratio='2' is not allowed"),
    (dict(width=8, lifting_ratio=0.01), 'gives round(0.01*width) = 0 hidden channels at width=8: use 0 for one linear map'),
    (dict(width=1, channel_mlp=True), 'channel_mlp_expansion=0.5 gives round(0.5*width) = 0 hidden channels at width=1'),
    (dict(modes=2.5), 'modes=2.5 is not allowed: use an int m >= 1 or a pair of ints (mx, my), each >= 1'),
    (dict(modes=(4, 2.5)), 'modes=(4, 2.5) is not allowed'),
    (dict(modes=(4, 4, 4)), 'modes=(4, 4, 4) is not allowed'),
    (dict(modes=0), 'modes=0 is not allowed'),
    (dict(modes='12'), "modes='12' is not allowed"),
    (dict(width=0), 'width=0 is not allowed: use an int >= 1'),
    (dict(width=32.0), 'width=32.0 is not allowed: use an int >= 1'),
    (dict(n_layers=0), 'n_layers=0 is not allowed: use an int >= 1'),
    (dict(in_channels=0), 'in_channels=0 is not allowed: use an int >= 1'),
    (dict(out_channels=-1), 'out_channels=-1 is not allowed: use an int >= 1'),
    (dict(activation='swish'), "activation='swish' is not one of 'gelu', 'relu', 'silu', 'tanh'"),
    (dict(activation=None), "activation=None is not one of 'gelu'"),
    (dict(channel_mlp='yes'), "channel_mlp='yes' must be True or False"),
])
def test_config_errors_say_what_is_allowed(fields, message):
    with pytest.raises(ValueError) as err:
        FNOConfig(**fields)
    assert message in str(err.value)


@pytest.mark.parametrize('x, error, message', [
    (torch.randn(2, 5, 16, 16), ValueError, 'x has shape (2, 5, 16, 16); the model takes (B, in_channels=3, H, W)'),
    (torch.randn(3, 16, 16), ValueError, 'x has shape (3, 16, 16); the model takes (B, in_channels=3, H, W)'),
    (torch.randn(1, 2, 3, 16, 16), ValueError, 'the model takes (B, in_channels=3, H, W)'),
    (torch.randn(2, 3, 16, 16, dtype=torch.float64), TypeError,
     'x is torch.float64 but the model\'s parameters are torch.float32: convert the input with x.to(torch.float32) '
     'or the model with model.to(torch.float64)'),
    (torch.ones(2, 3, 16, 16, dtype=torch.int64), TypeError, 'x is torch.int64'),
    (torch.randn(2, 3, 6, 16), ValueError, 'modes=(4, 3) do not fit a 6x16 grid: need 2*mx <= 6 and my <= 9, i.e. a grid of at least 8x4'),
    (torch.randn(2, 3, 16, 3), ValueError, 'modes=(4, 3) do not fit a 16x3 grid'),
])
def test_forward_errors_say_what_is_allowed(x, error, message):
    model = FNO(FNOConfig(**CONFIG))
    with pytest.raises(error) as err:
        model(x)
    assert message in str(err.value)


def test_valid_inputs_still_pass():
    "The checks accept what the model handles: float64 models, bf16 inputs under autocast, list modes (JSON), numpy ints."
    np = pytest.importorskip('numpy')
    model = FNO(FNOConfig(**CONFIG)).double()
    assert model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64
    model.float()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)).shape == (2, 1, 16, 16)
    assert FNOConfig(modes=[4, 3]).modes == (4, 3)
    assert FNOConfig(width=1).width == 1                               # unused channel_mlp_expansion is not checked
    assert FNOConfig(width=np.int64(8), modes=np.int64(4)).modes == (4, 4)
    assert model(torch.randn(1, 3, 8, 4)).shape == (1, 1, 8, 4)      # the smallest grid modes=(4, 3) fit
    with pytest.raises(TypeError, match='must be an FNOConfig'):
        FNO(dict(CONFIG))
