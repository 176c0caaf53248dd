"Generators and critics: shapes, ranges, the seed's DCGAN layout, init, config round trips through `torch.load(weights_only=True)`."
import io
import pytest, torch
from torch import nn
from medgan_fastai.models import *

def _roundtrip(model, build):
    "Save `config` + state dict as the exporter does, load with `weights_only=True`, rebuild"
    buf = io.BytesIO(); torch.save(dict(config=model.config, state_dict=model.state_dict()), buf); buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    m = build(saved['config']); m.load_state_dict(saved['state_dict'])
    return m.eval()

@pytest.mark.parametrize('size', [32, 64, 128])
def test_dcgan_shapes_dtypes_range(size):
    g,d = DCGANGenerator(size, z_dim=32, ngf=16), DCGANCritic(size, ndf=16)
    for z in (torch.randn(3, 32), torch.randn(3, 32, 1, 1)):
        x = g(z)
        assert x.shape == (3, 1, size, size) and x.dtype == torch.float32
        assert x.abs().max() <= 1
        y = d(x)
        assert y.shape == (3,) and y.dtype == torch.float32
    assert (g.size, g.z_dim, g.n_channels) == (size, 32, 1)

def test_dcgan_256_and_rgb():
    g = DCGANGenerator(256, z_dim=8, ngf=4, n_channels=3)
    assert g(torch.randn(1, 8)).shape == (1, 3, 256, 256)
    assert DCGANCritic(256, ndf=4, n_channels=3)(torch.randn(2, 3, 256, 256)).shape == (2,)

def test_dcgan_64_is_the_seed_architecture():
    "The seed's DCGAN at 64 px: ConvT 100->512 (4x4), 512->256->128->64, 64->1, tanh; critic 1->64->128->256->512->1"
    g = DCGANGenerator()
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding) for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert convs == [(100, 512, (4,4), (1,1), (0,0)), (512, 256, (4,4), (2,2), (1,1)), (256, 128, (4,4), (2,2), (1,1)),
                     (128, 64, (4,4), (2,2), (1,1)), (64, 1, (4,4), (2,2), (1,1))]
    assert isinstance(g.main[-1], nn.Tanh)
    d = DCGANCritic()
    convs = [(m.in_channels, m.out_channels, m.stride) for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(1, 64, (2,2)), (64, 128, (2,2)), (128, 256, (2,2)), (256, 512, (2,2)), (512, 1, (1,1))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3  # all but the first conv
    assert not isinstance(d.main[1], nn.BatchNorm2d)
    assert sum(p.numel() for p in g.parameters()) == 3_574_656  # the seed's generator at nz=100, ngf=64, nc=1

def test_dcgan_init_statistics():
    g = DCGANGenerator()
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = torch.cat([m.weight for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn.mean().item() - 1) < 0.01 and abs(bn.std().item() - 0.02) < 0.005

@pytest.mark.parametrize('kw', [dict(batch_norm=False), dict(spectral_norm=True)])
def test_dcgan_critic_without_batchnorm(kw):
    d = DCGANCritic(32, ndf=8, **kw)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    x = torch.randn(4, 1, 32, 32)
    # no BatchNorm: each sample's logit does not depend on the rest of the batch (what WGAN-GP needs)
    d.train(not kw.get("spectral_norm", False))  # spectral norm power-iterates in training: compare in eval
    torch.testing.assert_close(d(x)[:2], d(x[:2]))

def test_spectral_norm_bounds_the_layers():
    d = DCGANCritic(32, ndf=8, spectral_norm=True).train()
    for _ in range(20): d(torch.randn(2, 1, 32, 32))  # power iterations converge
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert all(hasattr(m, 'parametrizations') for m in convs)
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma < 1.1

@pytest.mark.parametrize('sn', [False, True])
def test_dcgan_rebuild_from_config(sn):
    g = DCGANGenerator(32, z_dim=16, ngf=8).eval()
    d = DCGANCritic(32, ndf=8, spectral_norm=sn).eval()
    z = torch.randn(5, 16)
    with torch.no_grad():
        g2, d2 = _roundtrip(g, build_generator), _roundtrip(d, build_critic)
        assert torch.equal(g2(z), g(z))
        x = g(z)
        assert torch.equal(d2(x), d(x))
    assert g2.config == g.config and d2.config == d.config

def test_build_errors():
    with pytest.raises(ModelConfigError, match="unknown generator arch 'vae'"): build_generator(dict(arch='vae'))
    with pytest.raises(ModelConfigError, match='does not fit DCGANGenerator'): build_generator(dict(arch='dcgan', ndf=3))
    with pytest.raises(ModelConfigError, match='power of two'): DCGANGenerator(48)
    with pytest.raises(ModelConfigError, match='power of two'): DCGANCritic(512)

# --- style-based models -------------------------------------------------------------------------------------------
from medgan_fastai.style import *

def _small_style(size, **kw): return StyleGenerator(size, z_dim=32, w_dim=32, channel_base=256, channel_max=32, **kw)

@pytest.mark.parametrize('size', [32, 64, 128])
@pytest.mark.parametrize('architecture', ['skip', 'residual'])
def test_style_shapes_dtypes_range(size, architecture):
    g = _small_style(size, architecture=architecture)
    d = StyleCritic(size, channel_base=256, channel_max=32)
    assert g.num_ws == 2 * (size.bit_length() - 1) - 2
    for z in (torch.randn(3, 32), torch.randn(3, 32, 1, 1)):
        x = g(z)
        assert x.shape == (3, 1, size, size) and x.dtype == torch.float32 and x.abs().max() <= 1
        y = d(x)
        assert y.shape == (3,) and y.dtype == torch.float32
    assert g.mapping(torch.randn(2, 32)).shape == (2, g.num_ws, 32)
    assert (g.size, g.z_dim, g.w_dim, g.n_channels) == (size, 32, 32, 1)

def test_style_defaults_and_rgb():
    g,d = StyleGenerator(), StyleCritic()
    assert g(torch.randn(2, 128)).shape == (2, 1, 64, 64) and d(torch.randn(2, 1, 64, 64)).shape == (2,)
    g3 = StyleGenerator(32, n_channels=3, channel_base=256, channel_max=32)
    assert g3(torch.randn(2, 128)).shape == (2, 3, 32, 32)
    assert StyleCritic(32, n_channels=3, channel_base=256, channel_max=32)(torch.randn(2, 3, 32, 32)).shape == (2,)
    with pytest.raises(ModelConfigError, match='architecture'): StyleGenerator(32, architecture='orig')

def _trained_w_avg(g, steps=5):
    "Move `w_avg` away from zero as training does"
    g.train()
    with torch.no_grad():
        for _ in range(steps): g(torch.randn(16, g.z_dim))
    return g.eval()

def test_w_avg_tracked_in_training_only():
    g = _small_style(32)
    assert torch.equal(g.mapping.w_avg, torch.zeros(32))
    with torch.no_grad(): g.eval()(torch.randn(4, 32))
    assert torch.equal(g.mapping.w_avg, torch.zeros(32))
    _trained_w_avg(g, steps=1)
    assert g.mapping.w_avg.abs().sum() > 0
    assert 'mapping.w_avg' in g.state_dict()

def test_truncation_psi_zero_is_the_average_image():
    g = _trained_w_avg(_small_style(32))
    for blk in g.synthesis.blocks:  # make the noise inputs matter
        for conv in (getattr(blk, 'conv0', None), blk.conv1):
            if conv is not None: conv.noise_strength.data.fill_(0.3)
    with torch.no_grad():
        a = g(torch.randn(4, 32), truncation_psi=0, noise_mode='const')
        b = g(torch.randn(4, 32) * 3, truncation_psi=0, noise_mode='const')
        w_avg_img = g.synthesis(g.mapping.w_avg.expand(1, g.num_ws, -1), noise_mode='const')
        torch.testing.assert_close(a, w_avg_img.expand_as(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert not torch.allclose(g(torch.randn(4, 32), noise_mode='const'), a, atol=1e-3)  # psi=1 varies

def test_truncation_psi_and_cutoff_in_w():
    g = _trained_w_avg(_small_style(32))
    z = torch.randn(3, 32)
    with torch.no_grad():
        ws, half = g.mapping(z), g.mapping(z, truncation_psi=0.5)
        torch.testing.assert_close(half, g.mapping.w_avg + 0.5 * (ws - g.mapping.w_avg))
        cut = g.mapping(z, truncation_psi=0, truncation_cutoff=3)
        torch.testing.assert_close(cut[:, :3], g.mapping.w_avg.expand(3, 3, -1))
        assert torch.equal(cut[:, 3:], ws[:, 3:])

def test_same_w_same_image_with_const_noise():
    g = _trained_w_avg(_small_style(64))
    for blk in g.synthesis.blocks:
        blk.conv1.noise_strength.data.fill_(0.5)
    ws = g.mapping(torch.randn(2, 32))
    with torch.no_grad():
        assert torch.equal(g.synthesis(ws, noise_mode='const'), g.synthesis(ws, noise_mode='const'))
        assert torch.equal(g.synthesis(ws, noise_mode='none'), g.synthesis(ws, noise_mode='none'))
        # random noise changes the details only: same w, different images
        assert not torch.equal(g.synthesis(ws, noise_mode='random'), g.synthesis(ws, noise_mode='random'))
    with pytest.raises(ValueError, match='noise_mode'): g.synthesis(ws, noise_mode='fixed')

def test_style_mixing_identical_seeds_equals_no_mixing():
    g = _trained_w_avg(_small_style(32))
    z = torch.randn(3, 32)
    with torch.no_grad():
        ref = g(z, noise_mode='const')
        for crossover in (0, 1, g.num_ws // 2, g.num_ws):
            assert torch.equal(g.style_mix(z, z.clone(), crossover, noise_mode='const'), ref)
        other = torch.randn(3, 32)
        mixed = g.style_mix(z, other, g.num_ws // 2, noise_mode='const')
        assert not torch.allclose(mixed, ref, atol=1e-4)
        assert torch.equal(g.style_mix(other, z, 0, noise_mode='const'), ref)  # crossover 0: all styles from z_fine

def test_style_mixing_regularisation_in_training():
    g = _trained_w_avg(_small_style(32))
    z = torch.randn(4, 32)
    with torch.no_grad():
        ref = g.eval()(z, noise_mode='const')
        g.train(); g.mixing_prob = 0.
        assert torch.equal(g(z, noise_mode='const'), ref)   # training mode without mixing: the same function
        g.mixing_prob = 1.
        assert not torch.allclose(g(z, noise_mode='const'), ref, atol=1e-4)  # mixed styles from a second z
        g.eval()
        assert torch.equal(g(z, noise_mode='const'), ref)   # never mixes in eval

def test_mapping_lr_multiplier():
    g = _small_style(32, mapping_lr_mul=0.01)
    w = g.mapping.net[0].weight
    assert 80 < w.std().item() < 120  # stored 1/lr_mul larger, scaled down at run time: updates 100x slower

def test_minibatch_std():
    mb = MinibatchStd(4)
    same = torch.randn(1, 8, 4, 4).expand(8, -1, -1, -1)
    assert mb(same).shape == (8, 9, 4, 4) and mb(same)[:, -1].abs().max() < 1e-3
    x = torch.randn(8, 8, 4, 4); x[1] = x[5]  # samples 1 and 5 share a group (groups are strided)
    y = mb(x)[:, -1, 0, 0]
    assert torch.equal(y[1], y[5]) and y.min() > 0.3
    assert mb(torch.randn(6, 8, 4, 4)).shape == (6, 9, 4, 4)  # 4 does not divide 6: groups of 3

def test_critic_double_backward_for_r1_and_generator_path_length():
    d = StyleCritic(32, channel_base=256, channel_max=32)
    x = torch.randn(4, 1, 32, 32, requires_grad=True)
    g_x, = torch.autograd.grad(d(x).sum(), x, create_graph=True)
    g_x.square().sum().backward()  # R1 penalty: gradient of a gradient
    assert all(p.grad is not None for n,p in d.named_parameters() if n.endswith("weight"))
    g = _small_style(32)
    ws = g.mapping(torch.randn(2, 32))
    img = g.synthesis(ws)
    g_w, = torch.autograd.grad((img * torch.randn_like(img)).sum(), ws, create_graph=True)
    g_w.square().sum().backward()  # path-length regularisation
    assert g.synthesis.blocks[-1].conv1.weight.grad is not None

@pytest.mark.parametrize('architecture', ['skip', 'residual'])
def test_style_rebuild_from_config(architecture):
    g = _trained_w_avg(_small_style(64, architecture=architecture))
    d = StyleCritic(64, channel_base=256, channel_max=32, mbstd_group=2).eval()
    g2, d2 = _roundtrip(g, build_generator), _roundtrip(d, build_critic)
    assert type(g2) is StyleGenerator and type(d2) is StyleCritic
    z = torch.randn(4, 32)
    with torch.no_grad():
        for kw in (dict(noise_mode='const'), dict(truncation_psi=0.7, noise_mode='const'), dict(truncation_psi=0, noise_mode='none')):
            assert torch.equal(g2(z, **kw), g(z, **kw))
        x = g(z, noise_mode='const')
        assert torch.equal(d2(x), d(x))
    assert g2.config == g.config and g2.config['arch'] == 'style'
    import json; assert json.loads(json.dumps(g.config)) == g.config
