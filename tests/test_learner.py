"Training through fastai: the frozen net stays put, a short real run writes its pictures and files, export/load."
import numpy as np, pandas as pd, pytest, torch
from medgan_fastai.data import gan_dls
from medgan_fastai.learner import *
from medgan_fastai.callbacks import *
from medgan_fastai.persist import *
from medgan_fastai.models import sample_images

@pytest.fixture(scope='module')
def mr32(mr_dir, tmp_path_factory):
    return gan_dls(mr_dir, size=32, bs=32, cache_dir=tmp_path_factory.mktemp('cache'), progress=False, verbose=False)

def _params(m): return [p.detach().clone() for p in m.parameters()]
def _same(a, m): return all(torch.equal(x, p) for x, p in zip(a, m.parameters()))

@pytest.mark.parametrize('arch', ['dcgan', 'style'])
def test_frozen_net_is_bitwise_unchanged(mr32, arch):
    learn = gan_learner(mr32, arch=arch, seed=1)
    learn.create_opt(); learn.model.train(); learn.training = True
    noise, real = (t.as_subclass(torch.Tensor) for t in mr32.one_batch())
    learn.xb, learn.yb = (noise,), (real,)
    # a first full pair gives both Adam optimisers momentum, the situation where fastai's stock learner drifts
    learn._do_one_batch()
    g0, c0 = _params(learn.model.generator), _params(learn.model.critic)
    fake = learn._critic_step(noise, real, make_graph=True)
    assert _same(g0, learn.model.generator) and not _same(c0, learn.model.critic)
    c1 = _params(learn.model.critic)
    learn._generator_step(noise, real, fake)
    assert _same(c1, learn.model.critic) and not _same(g0, learn.model.generator)

def test_n_crit_counts_across_epochs(mr32):
    learn = gan_learner(mr32, arch='dcgan', loss='wgan-gp', seed=0)   # n_crit=5; this data has 3 batches an epoch
    assert learn.n_crit == 5
    learn.fit(4)
    st = learn.gan_state
    assert st.crit_steps == 4 * len(mr32.train) and st.gen_steps == st.crit_steps // 5 >= 2

def test_two_epoch_run_writes_everything(mr32, tmp_path):
    learn = gan_learner(mr32, arch='dcgan', seed=0, ema=True, path=tmp_path,
                        cbs=[SampleGrid(n=16, nrow=4), LossChart(), GANCheckpoint()])
    learn.fit(2)
    assert (tmp_path/'samples'/'epoch_001.png').exists() and (tmp_path/'samples'/'epoch_002.png').exists()
    assert (tmp_path/'samples'/'progress.gif').exists() and (tmp_path/'loss.png').stat().st_size > 5000
    df = pd.read_csv(tmp_path/'loss.csv')
    assert len(df) == 2 * len(mr32.train) and np.isfinite(df[['crit_loss', 'gen_loss']].values).all()
    ck = latest_checkpoint(tmp_path)
    assert ck.name == 'epoch_002.pth'
    out = export_generator(learn, tmp_path/'generator.pth')
    g = load_generator(out, device='cpu')
    z = torch.randn(4, g.z_dim, generator=torch.Generator().manual_seed(3))
    ref = sample_images(learn.gan_state.ema, z)
    assert torch.equal(sample_images(g, z), ref)
    assert torch.equal(sample_images(load_generator(ck, device='cpu'), z), ref)

def test_bad_checkpoints_give_clear_errors(tmp_path, mr32):
    learn = gan_learner(mr32, arch='dcgan', seed=0)
    trunc = tmp_path/'trunc.pth'
    save_checkpoint(learn, tmp_path/'good.pth', 1)
    trunc.write_bytes((tmp_path/'good.pth').read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='trunc.pth: not a loadable'): load_checkpoint(learn, trunc)
    # a pickle that would run code when unpickled is refused by weights_only loading
    import pickle, os
    class Evil:
        def __reduce__(self): return (os.system, ('touch ' + str(tmp_path/'pwned'),))
    evil = tmp_path/'evil.pth'
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match='evil.pth'): load_checkpoint(learn, evil)
    assert not (tmp_path/'pwned').exists()
    foreign = tmp_path/'foreign.pth'
    torch.save({'state_dict': {}}, foreign)
    with pytest.raises(CheckpointError, match='not a medgan_fastai checkpoint'): load_checkpoint(learn, foreign)
    with pytest.raises(CheckpointError, match='not a medgan_fastai model file'): load_generator(foreign)
    other = gan_learner(mr32, arch='style', seed=0)
    with pytest.raises(CheckpointError, match='does not fit this model'): load_checkpoint(other, tmp_path/'good.pth')

def test_style_gan_with_ada_short_run(mr32, tmp_path):
    "[style]: a short CPU run of the style GAN with ADA on real MR at 32 px"
    learn = gan_learner(mr32, arch='style', augment='ada', ada_target=0.2, ada_kimg=1., seed=0, path=tmp_path,
                        g_kwargs=dict(channel_base=256, channel_max=64), c_kwargs=dict(channel_base=256, channel_max=64),
                        cbs=[LossChart()])
    learn.fit(4)
    df = pd.read_csv(tmp_path/'loss.csv')
    assert np.isfinite(df[['crit_loss', 'gen_loss']].values).all()
    assert 'aug_p' in df and df.aug_p.max() > 0 and df.aug_p.nunique() > 1        # p moved and was recorded
    assert learn.model.critic.augment.p == df.aug_p.iloc[-1]
    ema, g = learn.gan_state.ema, learn.model.generator
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), g.parameters()))

def test_resume_mid_ada_interval_is_exact(mr32, tmp_path):
    "4 batches an epoch, an ADA interval of 3: the checkpoint falls inside an interval and must carry its counts"
    from medgan_fastai.augment import ADACallback
    def make(path):
        learn = gan_learner(mr32, arch='dcgan', seed=0, path=path, cbs=[GANCheckpoint()])
        ada = next(c for c in learn.cbs if isinstance(c, ADACallback))
        ada.interval, ada.target, ada.kimg_to_full = 3, -1., 0.5  # p rises by ~0.2 at every adjustment
        return learn, ada
    a, ada_a = make(tmp_path/'a')
    a.fit(3)
    b, ada_b = make(tmp_path/'b')
    assert load_checkpoint(b, tmp_path/'a'/'checkpoints'/'epoch_002.pth') == 2
    b.fit(3, start_epoch=2)
    assert len(ada_a.history) == 3 * len(mr32.train) // 3 and ada_a.augment.p > 0.5
    assert ada_b.history == ada_a.history and ada_b.augment.p == ada_a.augment.p
    for m in ('generator', 'critic'):
        assert all(torch.equal(x, y) for x, y in zip(getattr(a.model, m).parameters(), getattr(b.model, m).parameters())), m

def test_the_learner_is_a_fastai_learner_with_its_api(tmp_path, mr32):
    "Not a GANLearner whose inherited constructors (`wgan`, `from_learners`) would fail: a Learner whose own API works"
    from fastai.learner import Learner
    from fastai.vision.gan import GANLearner
    learn = gan_learner(mr32, arch='dcgan', seed=0, path=tmp_path, g_kwargs=dict(ngf=8), c_kwargs=dict(ndf=8))
    assert isinstance(learn, Learner) and not isinstance(learn, GANLearner)
    assert not hasattr(MedGANLearner, 'wgan') and not hasattr(MedGANLearner, 'from_learners')
    assert learn.gan_trainer is learn.gan_state          # what fastai's GAN callbacks read
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    learn.save('weights')                                # fastai's save/load of model and optimiser
    other = gan_learner(mr32, arch='dcgan', seed=1, path=tmp_path, g_kwargs=dict(ngf=8), c_kwargs=dict(ndf=8))
    other.load('weights')
    for a, b in zip(learn.model.parameters(), other.model.parameters()): assert torch.equal(a, b)

def test_fp16_loss_scales_are_restored_on_resume(tmp_path, mr32):
    "GANMixedPrecision saved each net's loss scale but never restored it: a resumed fp16 run restarted at 65536"
    kw = dict(arch='dcgan', seed=0, path=tmp_path, g_kwargs=dict(ngf=8), c_kwargs=dict(ndf=8))
    learn = gan_learner(mr32, cbs=[GANMixedPrecision('fp16', device_type='cpu')], **kw)
    mp = learn.gan_mixed_precision
    mp.before_fit()
    for k,v in (('critic', 123.), ('generator', 456.)):  # as if training had backed the scales off from 65536
        mp.scalers[k].scale(torch.ones(()))
        mp.scalers[k].update(new_scale=v)
    save_checkpoint(learn, tmp_path/'epoch_001.pth', 1)
    again = gan_learner(mr32, cbs=[GANMixedPrecision('fp16', device_type='cpu')], **kw)
    load_checkpoint(again, tmp_path/'epoch_001.pth')
    mp2 = again.gan_mixed_precision
    mp2.before_fit()
    assert mp2.scalers['critic'].get_scale() == 123. and mp2.scalers['generator'].get_scale() == 456.

def test_paced_tasks_skip_epochs_keep_the_first_and_last_and_leave_training_alone(mr32, tmp_path):
    "With a tiny `overhead` share, grids, diversity and checkpoints run after a fit's first and last epochs only, "
    "also when a budget ends the fit; the weights are bitwise those of a run that did every task after every epoch"
    from medgan_fastai.diversity import SampleDiversity
    def run(path, overhead, epochs, budget=None):
        cbs = [SampleGrid(n=16, nrow=4, gif=None, overhead=overhead), SampleDiversity(n=8, overhead=overhead),
               GANCheckpoint(keep=20, overhead=overhead)] + ([TrainingBudget(kimg=budget)] if budget else [])
        learn = gan_learner(mr32, arch='dcgan', seed=0, ema=True, path=path, cbs=cbs)
        with learn.no_logging(), learn.no_bar(): learn.fit(epochs)
        names = lambda d: sorted(p.stem for p in (path/d).glob('epoch_*'))
        return learn, names('samples'), names('checkpoints'), [h['epoch'] for h in cbs[1].history]
    paced, grids, cks, measured = run(tmp_path/'paced', 1e-4, 6)     # a grid (>= 5 ms) then waits >= 50 s of training
    assert grids == cks == ['epoch_001', 'epoch_006'] and measured == [1, 6]
    every, grids, cks, measured = run(tmp_path/'every', None, 6)
    assert len(grids) == len(cks) == len(measured) == 6
    for a, b in ((paced.model.generator, every.model.generator), (paced.gan_state.ema, every.gan_state.ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    n = len(mr32.train) * mr32.train.bs                                # images an epoch
    _, grids, cks, measured = run(tmp_path/'budget', 1e-4, 10, budget=4 * n / 1000)
    assert grids == cks == ['epoch_001', 'epoch_004'] and measured == [1, 4]  # the budget's last epoch is never skipped
