"Differentiable augmentations, `DiffAugment`, `AugmentedCritic` and the ADA callback in real fastai training loops."
import io
import numpy as np, pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.vision.gan import GANModule
from medgan_fastai.augment import *
from types import SimpleNamespace
from medgan_fastai.models import DCGANCritic, DCGANGenerator
from medgan_fastai.style import StyleCritic

OPS = [translation, cutout, brightness, contrast, saturation]

def _images(bs=8, c=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(bs, c, size, size, generator=g) * 2 - 1

@pytest.mark.parametrize('op', OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize('size', [32, 64, 128])
def test_ops_keep_shape_and_dtype(op, size):
    for c in (1, 3):
        x = _images(4, c, size)
        y = op(x)
        assert y.shape == x.shape and y.dtype == x.dtype

@pytest.mark.parametrize('op', OPS, ids=lambda f: f.__name__)
def test_gradients_flow_through_each_op(op):
    x = _images(6, 3 if op is saturation else 1).requires_grad_()
    w = torch.randn_like(x)
    (op(x, 1.) * w).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    if op is not brightness: assert not torch.equal(x.grad, w)  # the gradient went through the op, not around it
    else: assert torch.equal(x.grad, w)  # an offset has derivative 1

@pytest.mark.parametrize('op', OPS, ids=lambda f: f.__name__)
def test_p0_is_the_identity(op):
    x = _images(8, 3)
    assert torch.equal(op(x, 0.), x)
    aug = DiffAugment('translation,cutout,color', p=0.).train()
    assert torch.equal(aug(x), x) and torch.equal(aug(x, force=True), x)

@pytest.mark.parametrize('op', [translation, cutout, brightness, contrast], ids=lambda f: f.__name__)
def test_each_sample_is_augmented_with_probability_p(op):
    torch.manual_seed(0)
    x = _images(2000, 1, 8)
    changed = (op(x, 0.3) != x).flatten(1).any(1).float().mean().item()
    # an applied translation can draw a zero shift (1/17 per axis at 8 px), so it changes a bit fewer samples
    assert 0.25 < changed < 0.35

def test_saturation_is_grayscale_aware():
    x = _images(4, 1)
    assert saturation(x) is x
    rgb = _images(4, 3)
    assert not torch.equal(saturation(rgb), rgb)
    torch.testing.assert_close(saturation(rgb).mean(1), rgb.mean(1))  # keeps the gray value of each pixel

def test_brightness_and_contrast_ranges():
    torch.manual_seed(0)
    x = _images(500, 1, 8)
    shift = (brightness(x) - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6)  # one offset per image
    assert shift.min() >= -0.5 and shift.max() < 0.5 and shift[:, 0].std() > 0.25
    y = contrast(x)
    torch.testing.assert_close(y.mean([1, 2, 3]), x.mean([1, 2, 3]))
    factor = (y - y.mean([1, 2, 3], keepdim=True)).std([1, 2, 3]) / (x - x.mean([1, 2, 3], keepdim=True)).std([1, 2, 3])
    assert factor.min() >= 0.5 - 1e-4 and factor.max() < 1.5 + 1e-4

def test_translation_moves_content_and_fills_the_border():
    torch.manual_seed(0)
    x = torch.full((64, 1, 32, 32), 0.5); x[:, :, 16, 16] = 1.
    y = translation(x, 1., ratio=0.125, fill=-1.)
    for img in y[:, 0]:
        pos = (img == 1.).nonzero()
        assert len(pos) == 1  # the marked pixel moved, not smeared
        dy, dx = (pos[0] - 16).tolist()
        assert abs(dy) <= 4 and abs(dx) <= 4
        assert (img == -1.).all(0).sum() == abs(dx) and (img == -1.).all(1).sum() == abs(dy)  # black bands, as wide as the shift
        assert ((img == -1.) | (img == 0.5) | (img == 1.)).all()
    assert len({tuple((img == 1.).nonzero()[0].tolist()) for img in y[:, 0]}) > 20  # shifts differ per sample

def test_cutout_hole():
    torch.manual_seed(0)
    x = torch.full((64, 1, 32, 32), 0.5)
    y = cutout(x, 1., ratio=0.5, fill=0.)
    holes = (y == 0.).flatten(1).sum(1)
    assert holes.max() == 16 * 16 and holes.min() > 0  # a 16x16 square, clipped where it sticks out
    assert ((y == 0.) | (y == 0.5)).all()

def test_diffaugment_module():
    aug = DiffAugment('translation, cutout,color', p=1.)
    assert aug.policy == 'translation,cutout,color' and [f.__name__ for f in aug.ops] == \
        ['translation', 'cutout', 'brightness', 'saturation', 'contrast']
    x = _images(4)
    assert not torch.equal(aug.train()(x), x)
    assert torch.equal(aug.eval()(x), x) and not torch.equal(aug(x, force=True), x)
    with pytest.raises(ValueError, match='unknown augmentation rotate'): DiffAugment('rotate')
    # p goes with the state dict (a plain float, loadable with weights_only=True)
    aug.p = 0.37
    buf = io.BytesIO(); torch.save(aug.state_dict(), buf); buf.seek(0)
    aug2 = DiffAugment(p=0.); aug2.load_state_dict(torch.load(buf, weights_only=True))
    assert aug2.p == pytest.approx(0.37)

def test_augmented_critic_sees_augmented_reals_and_fakes_and_passes_gradients():
    torch.manual_seed(0)
    critic = StyleCritic(32, channel_base=256, channel_max=32)
    ac = AugmentedCritic(critic, DiffAugment('cutout', p=1.))
    assert ac.critic is critic and ac.config == critic.config and ac.config['arch'] == 'style'
    x = _images(4)
    assert not torch.equal(ac(x), critic(x))                # augmented while training
    ac.eval(); assert torch.equal(ac(x), critic(x)); ac.train()
    g = DCGANGenerator(32, z_dim=8, ngf=8)
    F.softplus(-ac(g(torch.randn(4, 8)))).mean().backward()  # the generator learns through the augmentation
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())

# --- ADA in real fastai training loops ----------------------------------------------------------------------------

class StoreRealLogits(Callback):
    "The learner's side of the contract: after each critic update, the detached logits on the reals"
    def after_loss(self): self.learn.gan_state.real_logits = self.learn.pred.detach()

def _critic_learner(reals, critic, ada, lr=0., p=0.5, extra_cbs=()):
    "A fastai `Learner` whose every batch is a critic update on reals (a `GANModule` in critic mode)"
    model = GANModule(DCGANGenerator(critic.size, z_dim=8, ngf=8), AugmentedCritic(critic, DiffAugment(p=p)))
    items = [(r, torch.tensor(1.)) for r in reals]
    dls = DataLoaders(DataLoader(items, bs=16, drop_last=True), DataLoader(items[:16], bs=16))
    learn = Learner(dls, model, loss_func=lambda logits, y: F.softplus(-logits).mean(), lr=lr,
                    cbs=[StoreRealLogits(), ada, *extra_cbs])
    # the two fields of the shared GAN state (`callbacks.GANState`) that ADA uses; without a critic-step count ADA
    # records fastai's `train_iter`
    learn.gan_state = SimpleNamespace(real_logits=None, aug_p=None)
    return learn

def _fit(learn, n=1):
    with learn.no_logging(), learn.no_bar(): learn.fit(n)

def _biased_critic(bias):
    d = DCGANCritic(32, ndf=8, batch_norm=False)
    nn.init.constant_(d.main[-1].bias, bias)  # logits on every image take the sign of `bias`
    return d

@pytest.mark.parametrize('bias,expected', [(100., [0.6, 0.7, 0.8, 0.9]), (-100., [0.4, 0.3, 0.2, 0.1])])
def test_ada_moves_p_at_the_set_speed(bias, expected):
    reals = list(_images(128))
    ada = ADACallback(target=0.6, interval=2, kimg_to_full=0.32)  # 2 updates x 16 reals = 32 images: steps of 0.1
    learn = _critic_learner(reals, _biased_critic(bias), ada)
    _fit(learn)
    np.testing.assert_allclose([h[1] for h in ada.history], expected, atol=1e-6)
    assert [h[2] for h in ada.history] == [1. if bias > 0 else -1.] * 4
    assert [h[0] for h in ada.history] == [2, 4, 6, 8]           # the iterations of the adjustments
    assert learn.gan_state.aug_p == learn.model.critic.augment.p == pytest.approx(expected[-1])

def test_ada_clips_to_0_and_p_max():
    reals = list(_images(128))
    up = ADACallback(interval=1, kimg_to_full=0.016, p_max=0.8)
    _fit(_critic_learner(reals, _biased_critic(100.), up, p=0.))
    assert max(h[1] for h in up.history) == pytest.approx(0.8) and up.history[-1][1] == pytest.approx(0.8)
    down = ADACallback(interval=1, kimg_to_full=0.016)
    _fit(_critic_learner(reals, _biased_critic(-100.), down, p=0.5))
    assert down.history[-1][1] == 0.

def test_ada_counts_only_batches_with_a_critic_update():
    class GeneratorEveryOtherBatch(Callback):
        "Batches with an odd iteration have no critic update: the learner sets `real_logits` to None"
        order = 1
        def after_loss(self):
            if self.training and self.learn.iter % 2: self.learn.gan_state.real_logits = None
    reals = list(_images(128))
    ada = ADACallback(interval=2, kimg_to_full=0.32)
    learn = _critic_learner(reals, _biased_critic(100.), ada, extra_cbs=[GeneratorEveryOtherBatch()])
    _fit(learn)
    assert len(ada.history) == 2 and [h[0] for h in ada.history] == [3, 7]  # 4 critic updates of 8 batches

def test_ada_on_real_mr_slices_raises_p_as_the_critic_learns_the_reals(mr_dir):
    "A critic trained to call real MR slices real becomes sure of them (r_t -> 1): ADA raises p"
    from medgan_fastai.dicom import dicom_slice
    files = sorted((mr_dir/'HFS').glob('*.dcm'))[:32]
    reals = [torch.tensor(dicom_slice(f, size=32))[None] * 2 - 1 for f in files]
    torch.manual_seed(0)
    ada = ADACallback(interval=2, kimg_to_full=1)
    learn = _critic_learner(reals, DCGANCritic(32, ndf=8, batch_norm=False), ada, lr=1e-3, p=0.)
    _fit(learn, 4)
    ps = [h[1] for h in ada.history]
    assert len(ps) == 4 and ps[-1] > 0 and ada.history[-1][2] > 0.6
    assert learn.gan_state.aug_p == ps[-1]

def test_ada_needs_an_augmented_critic():
    reals = list(_images(32))
    items = [(r, torch.tensor(1.)) for r in reals]
    dls = DataLoaders(DataLoader(items, bs=16), DataLoader(items, bs=16))
    model = GANModule(DCGANGenerator(32, z_dim=8, ngf=8), DCGANCritic(32, ndf=8))
    learn = Learner(dls, model, loss_func=lambda logits, y: F.softplus(-logits).mean(), cbs=[ADACallback()])
    with pytest.raises(AttributeError, match='AugmentedCritic'): _fit(learn)
