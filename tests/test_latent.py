"Latent-space tools: seeds, truncation, interpolation, style mixing, GANSpace directions, projection; none of them may change the model or the global RNG."
import random, subprocess, sys
import numpy as np, pytest, torch
import torch.nn.functional as F
from PIL import Image
from medgan_fastai.style import StyleGenerator
from medgan_fastai.models import DCGANGenerator, image_grid
from medgan_fastai.latent import *

SIZE = 32

@pytest.fixture(scope='module')
def G():
    "A small random style generator whose `w_avg` is the mean of its `w` (as after training)"
    torch.manual_seed(0)
    g = StyleGenerator(SIZE, z_dim=32, w_dim=32, channel_base=256, channel_max=32)
    g.mapping.w_avg.copy_(w_samples(g, 2000).mean(0))
    return g.eval()

@pytest.fixture(scope='module')
def D():
    torch.manual_seed(1)
    return DCGANGenerator(SIZE, z_dim=16, ngf=8).eval()

def close(a, b, eps=1e-5): return torch.allclose(a, b, atol=eps, rtol=0)

def test_seed_latents_are_fixed_per_seed(G):
    z = seed_latents(G, [5, 6, 5])
    assert z.shape == (3, G.z_dim) and z.dtype == torch.float32
    assert torch.equal(z[0], z[2]) and not torch.equal(z[0], z[1])
    assert torch.equal(seed_latents(G, 6)[0], z[1])  # independent of the other seeds in the list
    torch.randn(100)  # and of anything drawn before
    assert torch.equal(seed_latents(G, [5])[0], z[0])
    assert torch.equal(z[0], torch.randn(G.z_dim, generator=torch.Generator().manual_seed(5)))

def test_generate_shapes_dtype_range_device(G, D):
    for g in (G, D):
        x = generate(g, range(5), psi=0.7)
        assert x.shape == (5, 1, SIZE, SIZE) and x.dtype == torch.float32 and x.device.type == 'cpu'
        assert x.abs().max() <= 1
        assert close(generate(g, [3], psi=0.7), x[3:4])  # a seed's image does not depend on its neighbours
    assert torch.equal(generate(G, [1, 2]), generate(G, [1, 2]))  # fixed noise: reproducible

def test_psi_zero_is_the_average_image_for_any_seed(G):
    avg = synthesize(G, G.mapping.w_avg[None])
    x = generate(G, [0, 7, 123, 99999], psi=0)
    for i in range(4): assert close(x[i:i+1], avg)
    assert not close(generate(G, [0]), generate(G, [7]), 1e-2)  # while psi=1 differs per seed
    # with a cutoff only the first layers are truncated: the images differ again
    y = generate(G, [0, 7], psi=0, cutoff=2)
    assert not close(y[:1], y[1:], 1e-3)

def test_truncation_sweep_columns(G):
    psis = (0, 0.5, 1)
    grid = np.asarray(truncation_sweep(G, [1, 2], psis=psis, padding=0), dtype=np.int16)
    assert grid.shape == (2 * SIZE, 3 * SIZE)
    cell = lambda r, c: grid[r*SIZE:(r+1)*SIZE, c*SIZE:(c+1)*SIZE]
    assert np.abs(cell(0, 0) - cell(1, 0)).max() <= 1  # psi=0: the same average image in both rows
    assert np.abs(cell(0, 2) - cell(1, 2)).max() > 10
    for r, s in enumerate([1, 2]):
        ref = np.asarray(image_grid(generate(G, [s]), padding=0), dtype=np.int16)
        assert np.abs(cell(r, 2) - ref).max() <= 1  # psi=1: the seed's own image

def test_style_mix_identical_seeds_equals_no_mixing(G):
    ref = generate(G, [4])
    for k in (0, 1, G.num_ws // 2, G.num_ws):
        x = style_mix(G, 4, 4, crossover=k)
        assert x.shape == (1, 1, SIZE, SIZE) and close(x, ref)
    assert close(style_mix(G, 4, 8, crossover=0), generate(G, [8]))
    assert close(style_mix(G, 4, 8, crossover=G.num_ws), ref)
    assert not close(style_mix(G, 4, 8, crossover=G.num_ws // 2), ref, 1e-3)
    for k in (-1, G.num_ws + 1):
        with pytest.raises(ValueError, match='crossover'): style_mix(G, 4, 8, crossover=k)

def test_style_mix_grid_layout(G):
    "top row = column seeds, left column = row seeds, cell (i, j) = coarse from row i, fine from column j"
    rows, cols, k, pad = [1, 2], [3, 4, 5], 3, 2
    grid = np.asarray(style_mix_grid(G, rows, cols, crossover=k, padding=pad), dtype=np.int16)
    assert grid.shape == (pad + 3 * (SIZE + pad), pad + 4 * (SIZE + pad))
    def cell(r, c):
        y, x = pad + r * (SIZE + pad), pad + c * (SIZE + pad)
        return grid[y:y+SIZE, x:x+SIZE]
    pic = lambda t: np.asarray(image_grid(t, padding=0), dtype=np.int16)
    assert cell(0, 0).max() == 0  # the empty corner
    for j, s in enumerate(cols): assert np.abs(cell(0, j + 1) - pic(generate(G, [s]))).max() <= 1
    for i, s in enumerate(rows): assert np.abs(cell(i + 1, 0) - pic(generate(G, [s]))).max() <= 1
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            assert np.abs(cell(i + 1, j + 1) - pic(style_mix(G, r, c, crossover=k))).max() <= 1

def test_interpolation_endpoints_are_the_seeds_images(G, D):
    ends = generate(G, [1, 2], psi=0.7)
    for space in ('w', 'z'):
        x = interpolate(G, 1, 2, steps=5, space=space, psi=0.7)
        assert x.shape == (5, 1, SIZE, SIZE)
        assert close(x[[0, -1]], ends)
        assert not close(x[2:3], ends[:1], 1e-3) and not close(x[2:3], ends[1:], 1e-3)
    x = interpolate(D, 1, 2, steps=4, space='z')
    assert close(x[[0, -1]], generate(D, [1, 2]))
    with pytest.raises(TypeError, match='style-based'): interpolate(D, 1, 2)  # DCGAN has no w
    with pytest.raises(ValueError, match='space'): interpolate(G, 1, 2, space='x')
    strip = interpolation_strip(G, 1, 2, steps=4, padding=0)
    assert strip.size == (4 * SIZE, SIZE) and strip.mode == 'L'

def test_slerp_stays_on_the_sphere():
    a, b = torch.randn(16), torch.randn(16)
    b = b / b.norm() * a.norm()
    x = slerp(a, b, torch.linspace(0, 1, 7))
    assert torch.allclose(x.norm(dim=1), a.norm().expand(7), rtol=1e-5)
    assert torch.equal(x[0], a) and torch.equal(x[-1], b)  # exact end points
    assert torch.allclose(slerp(a, a, torch.tensor([0.3]))[0], a)  # parallel: no division by zero

def test_interpolation_gif(G, tmp_path):
    p = interpolation_gif(G, 1, 2, tmp_path/'walk.gif', steps=6, scale=2)
    im = Image.open(p)
    assert im.n_frames == 10 and im.size == (2 * SIZE, 2 * SIZE)  # 6 there, 4 back
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match='walk.gif'): interpolation_gif(G, 3, 4, p)
    assert p.read_bytes() == before
    interpolation_gif(G, 3, 4, p, steps=3, overwrite=True)
    assert Image.open(p).n_frames == 4

def test_directions_orthonormal_and_zero_move_is_identity(G):
    d = latent_directions(G, n=1000, k=6, seed=0)
    assert d.components.shape == (6, G.w_dim) and d.mean.shape == (G.w_dim,) and d.std.shape == (6,)
    assert torch.allclose(d.components @ d.components.T, torch.eye(6), atol=1e-5)
    assert (d.std[:-1] >= d.std[1:]).all() and (d.std > 0).all()
    evr = d.explained_variance_ratio
    assert (evr > 0).all() and evr.sum() <= 1 + 1e-6 and (evr[:-1] >= evr[1:]).all()
    # the components are the axes of the samples' variance: projecting fresh samples gives about those spreads
    proj = (w_samples(G, 1000, seed=1) - d.mean) @ d.components.T
    assert torch.allclose(proj.std(0), d.std, rtol=0.15)
    assert torch.equal(latent_directions(G, n=1000, k=6, seed=0).components, d.components)  # deterministic, signs included
    x = move(G, 5, d, 0, amounts=(0, 2, -2))
    assert x.shape == (3, 1, SIZE, SIZE)
    assert close(x[:1], generate(G, [5]))
    assert not close(x[1:2], x[:1], 1e-3) and not close(x[1:2], x[2:], 1e-3)
    assert close(move(G, 5, d, 0, amounts=2, layers=[]), x[:1])  # no layer moved: no change
    part = move(G, 5, d, 0, amounts=2, layers=range(0, 3))
    assert not close(part, x[:1], 1e-3) and not close(part, x[1:2], 1e-3)
    with pytest.raises(IndexError): move(G, 5, d, 6)
    with pytest.raises(ValueError, match='k must'): latent_directions(G, n=100, k=G.w_dim + 1)

def test_projection_recovers_a_generated_image(G):
    target = generate(G, [11])[0]  # (c, h, w)
    p = project(G, target, steps=100)
    assert p.w.shape == (1, G.num_ws, G.w_dim) and p.image.shape == (1, 1, SIZE, SIZE)
    assert len(p.history) == 100 and p.noise is None
    random_w = float(F.mse_loss(generate(G, [12]), target[None]))
    start = float(F.mse_loss(synthesize(G, G.mapping.w_avg[None]), target[None]))
    assert p.error < 0.5 * random_w, (p.error, random_w)
    assert p.error < 0.5 * start, (p.error, start)
    assert abs(p.error - float(F.mse_loss(p.image, target[None]))) < 1e-6
    assert close(synthesize(G, p.w), p.image)  # the returned w reproduces the returned image
    assert torch.equal(project(G, target, steps=20).w, project(G, target, steps=20).w)  # seeded: reproducible

def test_projection_options_leave_the_model_alone(G):
    target = generate(G, [13])
    state = {k: v.clone() for k, v in G.state_dict().items()}
    p = project(G, target, steps=40, optimize_noise=True, w_plus=True)
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in G.parameters())
    assert p.noise and all(k.endswith('noise_const') for k in p.noise)
    assert any(not torch.equal(v, state[k]) for k, v in p.noise.items())  # the noise maps were fitted
    assert not close(p.w[:, 0], p.w[:, -1], 1e-6)  # w+: one w per layer
    assert p.error < float(F.mse_loss(generate(G, [14]), target))

def test_projection_rejects_bad_targets(G):
    with pytest.raises(ValueError, match='shape'): project(G, torch.zeros(1, 64, 64), steps=1)
    with pytest.raises(ValueError, match=r'\[-1, 1\]'): project(G, torch.full((1, SIZE, SIZE), 255.), steps=1)
    assert project(G, torch.zeros(SIZE, SIZE), steps=2).image.shape == (1, 1, SIZE, SIZE)  # a bare (h, w) slice

def test_projection_schedule_and_noise_penalty():
    assert projection_lr(0) == 0 and projection_lr(0.5) == 1 and abs(projection_lr(1)) < 1e-12
    lrs = [projection_lr(i / 100) for i in range(101)]
    assert lrs[:6] == sorted(lrs[:6]) and lrs[75:] == sorted(lrs[75:], reverse=True)  # warm-up, then cosine decay
    g = torch.Generator().manual_seed(0)
    white = torch.randn(64, 64, generator=g)
    smooth = F.interpolate(torch.randn(1, 1, 8, 8, generator=g), size=64, mode='bilinear')[0, 0]
    assert noise_penalty([white]) < 1e-3 < noise_penalty([smooth / smooth.std()])

def test_style_only_tools_refuse_dcgan(D):
    for f in (lambda: style_mix(D, 1, 2, 1), lambda: style_mix_grid(D, [1], [2]), lambda: truncation_sweep(D, [1]),
              lambda: latent_directions(D), lambda: project(D, torch.zeros(1, SIZE, SIZE)), lambda: seed_ws(D, 1)):
        with pytest.raises(TypeError, match='style-based'): f()

def test_nothing_changes_the_global_rng_or_the_model(G, D, tmp_path):
    G.train()  # in training mode a careless call would update w_avg and mix styles
    try:
        state = {k: v.clone() for k, v in G.state_dict().items()}
        torch.manual_seed(123); np.random.seed(1); random.seed(2)
        t, n, r = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        d = latent_directions(G, n=300, k=3)
        calls = [lambda: seed_latents(G, [1]), lambda: generate(G, [1, 2], psi=0.5, noise_mode='random'),
                 lambda: generate(D, [1]), lambda: interpolate(G, 1, 2, 3), lambda: interpolate(G, 1, 2, 3, space='z'),
                 lambda: interpolate(D, 1, 2, 3, space='z'), lambda: interpolation_strip(G, 1, 2, 3),
                 lambda: interpolation_gif(G, 1, 2, tmp_path/'a.gif', steps=3), lambda: style_mix(G, 1, 2, 2),
                 lambda: style_mix_grid(G, [1], [2]), lambda: truncation_sweep(G, [1], psis=(0, 1)),
                 lambda: move(G, 1, d, 0, (0, 1)), lambda: project(G, generate(G, [3]), steps=3, optimize_noise=True)]
        for c in calls: c()
        assert torch.equal(torch.random.get_rng_state(), t)
        assert (np.random.get_state()[1] == n).all() and random.getstate() == r
        assert G.training and all(m.training for m in G.modules())
        assert all(torch.equal(v, G.state_dict()[k]) for k, v in state.items())  # w_avg and noise maps included
        assert not D.training and all(not m.training for m in D.modules())
    finally: G.eval()

@pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU')
def test_on_the_gpu_seeds_give_the_same_images(G):
    g = StyleGenerator(SIZE, z_dim=32, w_dim=32, channel_base=256, channel_max=32)
    g.load_state_dict(G.state_dict())
    g = g.cuda().eval()
    assert seed_latents(g, [7]).device.type == 'cuda'
    assert torch.equal(seed_latents(g, [7]).cpu(), seed_latents(G, [7]))
    state = torch.cuda.get_rng_state()
    x = generate(g, [1, 2], psi=0.7, noise_mode='random')
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert x.device.type == 'cpu' and x.shape == (2, 1, SIZE, SIZE)
    assert torch.allclose(generate(g, [1, 2]), generate(G, [1, 2]), atol=1e-3)
    assert torch.allclose(interpolate(g, 1, 2, 3)[[0, -1]], generate(G, [1, 2]), atol=1e-3)
    p = project(g, generate(G, [11]), steps=50)
    assert p.image.device.type == 'cpu' and p.error < float(F.mse_loss(generate(G, [12]), generate(G, [11])))

def test_latent_does_not_import_the_training_stack():
    "Loading and exploring a generator must not pay for, or depend on, fastai's Learner and our training callbacks"
    code = ("import sys, medgan_fastai.latent; "
            "print([m for m in ('fastai.learner', 'medgan_fastai.learner', 'medgan_fastai.callbacks') if m in sys.modules])")
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip() == '[]'
