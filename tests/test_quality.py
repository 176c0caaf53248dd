"[quality]: training length in kimg and minutes (with resume), sample-diversity watch, auto-configuration from the data."
import json, os, subprocess, sys, time
from pathlib import Path
import pandas as pd, pytest, torch
from torch import nn
from fastai.callback.core import Callback
from medgan_fastai.run import Recipe, train_run, auto_config
from medgan_fastai.data import gan_dls
from medgan_fastai.learner import gan_learner
from medgan_fastai.callbacks import LossChart, TrainingBudget, GANCheckpoint, load_checkpoint
from medgan_fastai.diversity import SampleDiversity, pair_ssim, diversity_pairs, real_slices_by_class
from medgan_fastai.persist import load_generator, checkpoint_files, read_checkpoint
from medgan_fastai.models import sample_images

MEDGAN = str(Path(sys.executable).parent/'medgan')
TINY = dict(size=32, bs=16, seed=3, samples=16, z_dim=16)

@pytest.fixture(scope='module', autouse=True)
def cache_env(tmp_path_factory):
    old = os.environ.get('MEDGAN_CACHE')
    os.environ['MEDGAN_CACHE'] = str(tmp_path_factory.mktemp('cache'))
    yield {**os.environ, 'PYTHONUNBUFFERED': '1'}
    if old is None: os.environ.pop('MEDGAN_CACHE', None)
    else: os.environ['MEDGAN_CACHE'] = old

def _n_img(run): return read_checkpoint(checkpoint_files(run)[-1])['learner']['n_img']

def test_kimg_stops_at_the_images_asked_and_resume_keeps_counting(mr_dir, tmp_path):
    "134 MR slices at bs 16: 8 batches (128 images) an epoch; 0.1 kimg ends inside the first epoch, 0.3 inside the third"
    run = tmp_path/'run'
    learn = train_run(mr_dir, out=run, recipe=TINY, kimg=0.1)
    st = learn.gan_state
    assert 100 <= st.n_img < 100 + 16 and st.n_img == 16 * st.crit_steps            # stopped on the batch that reached it
    assert [p.name for p in checkpoint_files(run)] == ['epoch_000_interrupted.pth'] and _n_img(run) == st.n_img
    assert load_generator(run/'generator.pth') is not None
    df = pd.read_csv(run/'loss.csv')
    assert df.kimg.iloc[-1] == pytest.approx(st.n_img / 1000) and df.kimg.is_monotonic_increasing
    # stopped inside its first epoch, before any epoch's measurement: measured at the end, and the unformed samples said
    assert df.collapse_warning.iloc[-1] == 1 and df.pair_ssim.iloc[-1] > df.real_pair_ssim.iloc[-1] + 0.05
    assert [l.split(' while')[0] for l in (run/'warnings.txt').read_text().splitlines()] == [f'training ended at epoch 1 ({st.kimg:.2f} kimg)']
    first = st.n_img
    learn = train_run(out=run, resume=True, kimg=0.3)                               # a resume may extend the length
    assert 300 <= learn.gan_state.n_img < 300 + 16
    assert json.loads((run/'config.json').read_text())['kimg'] == 0.3
    tr = json.loads((run/'training.json').read_text())
    assert tr['kimg'] == pytest.approx(learn.gan_state.n_img / 1000) and tr['epochs'] == 1       # stopped inside epoch 2
    df = pd.read_csv(run/'loss.csv')
    assert df.kimg.is_monotonic_increasing and df.kimg.iloc[-1] * 1000 == learn.gan_state.n_img
    assert df.kimg.iloc[0] * 1000 == first + 16 and df.epoch.iloc[0] == 1              # the repeated epoch counts on from its images
    learn = train_run(out=run, resume=True)                                          # nothing left: says so, trains nothing
    assert learn.gan_state.n_img == _n_img(run) < 316
    lines = (run/'warnings.txt').read_text().splitlines()                           # one end-of-fit warning for each fit that trained
    assert len(lines) == 2 and lines[1].startswith('training ended at epoch 2 (0.30 kimg)')

def test_minutes_ends_with_a_loadable_generator_and_checkpoint_then_resumes(mr_dir, tmp_path, capsys):
    run = tmp_path/'run'
    learn = train_run(mr_dir/'HFS', out=run, recipe=TINY, minutes=0.15, epochs=1)   # epochs is replaced by the budget
    out = capsys.readouterr().out
    assert '0.15 minutes reached' in out and learn.gan_state.n_img >= 16
    g = load_generator(run/'generator.pth', device='cpu')
    assert g(torch.randn(2, g.z_dim)).shape == (2, 1, 32, 32)
    ck = checkpoint_files(run)[-1]
    assert read_checkpoint(ck)['learner']['n_img'] == learn.gan_state.n_img          # the checkpoint has every image shown
    before = learn.gan_state.n_img
    learn = train_run(out=run, resume=True, minutes=0.15)
    assert learn.gan_state.n_img > before and 'resuming' in capsys.readouterr().out
    assert json.loads((run/'training.json').read_text())['kimg'] == pytest.approx(learn.gan_state.n_img / 1000)

class _TimeRunsOutBetweenEpochs(Callback):
    "Waits after the second epoch until the budget's minutes are spent, so that the budget ends `fit` before the third begins"
    order = 99
    def after_epoch(self):
        if self.epoch != 1: return
        budget = next(cb for cb in self.learn.cbs if isinstance(cb, TrainingBudget))
        time.sleep(max(0., budget.t0 + budget.minutes * 60 + 0.2 - time.monotonic()))

def test_minutes_running_out_between_epochs_keeps_the_epoch_a_paced_checkpoint_skipped(mr_dir, tmp_path):
    "The checkpoints skip the second epoch (a tiny `overhead`); the budget, spent before the third, saves it"
    run = tmp_path/'run'
    learn = train_run(mr_dir/'HFS', out=run, recipe={**TINY, 'overhead': 1e-6}, minutes=0.2, cbs=[_TimeRunsOutBetweenEpochs()])
    budget = next(cb for cb in learn.cbs if isinstance(cb, TrainingBudget))
    assert budget.stopped_at == 'start' and learn.epoch == 2
    assert [p.name for p in checkpoint_files(run)] == ['epoch_001.pth', 'epoch_002.pth']
    assert _n_img(run) == learn.gan_state.n_img and json.loads((run/'training.json').read_text())['epochs'] == 2

def test_pair_ssim_on_real_slices_and_a_collapsed_batch(mr_dir):
    dls = gan_dls(mr_dir, size=32, bs=16, progress=False, verbose=False)
    real = real_slices_by_class(dls, n=32, seed=0)[0]
    pairs = diversity_pairs(32, 256, 0)
    r = pair_ssim(real, pairs)
    assert 0.1 < r < 0.6                                       # one head's slices: alike, but far from identical
    assert pair_ssim(real[:1].repeat(32, 1, 1, 1), pairs) == pytest.approx(1., abs=1e-4)
    assert real_slices_by_class(dls, n=32, seed=0)[0].equal(real)   # a fixed choice: the same on every call

class _OneImage(nn.Module):
    "A generator that ignores its noise: the end point of mode collapse"
    def __init__(self, z_dim=16, size=32):
        super().__init__()
        self.z_dim, self.n_classes, self.img = z_dim, 0, nn.Parameter(torch.zeros(1, 1, size, size))
        self.lin = nn.Linear(z_dim, 1)  # a parameter that sees z, with no effect on the image
    def forward(self, z, labels=None): return torch.tanh(self.img).expand(len(z), -1, -1, -1) + 0 * self.lin(z.flatten(1))[:, :, None, None]

def test_collapse_is_warned_on_console_in_the_run_folder_and_in_the_csv(mr_dir, tmp_path, capsys):
    dls = gan_dls(mr_dir/'HFS', size=32, bs=16, z_dim=16, progress=False, verbose=False)
    learn = gan_learner(dls, generator=_OneImage(), seed=0, ema=False, path=tmp_path,
                        cbs=[SampleDiversity(n=16, patience=2, warmup_kimg=0), LossChart()])
    learn.fit(3)
    assert 'warning: epoch 2: samples are more alike than the real slices' in capsys.readouterr().out
    lines = (tmp_path/'warnings.txt').read_text().splitlines()
    assert len(lines) == 1 and 'collapsing' in lines[0]                             # once per episode, not every epoch
    df = pd.read_csv(tmp_path/'loss.csv')
    d = df.dropna(subset=['pair_ssim'])
    assert len(d) == 3 and (d.pair_ssim > 0.99).all() and (d.real_pair_ssim < 0.6).all()
    assert d.collapse_warning.tolist() == [0, 1, 0]

SMALL_CRITIC = dict(c_kwargs=dict(ndf=8))  # the critic only has to run: the generators below ignore what it says

def _warnings(out:str)->list: return [l for l in out.splitlines() if l.startswith('warning:')]

def test_margin_rule_waits_for_the_warmup_and_the_end_of_fit_says_it_once(mr_dir, tmp_path, capsys):
    "64 images, far inside the 5-kimg warm-up and the 1-kimg gross minimum: only the end-of-fit rule speaks, once"
    dls = gan_dls(mr_dir/'HFS', size=32, bs=16, z_dim=16, progress=False, verbose=False)
    cb = SampleDiversity(n=16, patience=1)
    learn = gan_learner(dls, generator=_OneImage(), seed=0, ema=False, path=tmp_path, cbs=[cb, LossChart()], **SMALL_CRITIC)
    learn.fit(2)
    cb.after_fit()                                                                   # a second end of the same fit says nothing more
    w = _warnings(capsys.readouterr().out)
    assert len(w) == 1 and w[0].startswith('warning: training ended at epoch 2 (0.06 kimg) while samples were still more alike')
    lines = (tmp_path/'warnings.txt').read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith('training ended at epoch 2')
    assert [h['collapse_warning'] for h in cb.history] == [0, 0]                      # no epoch rule fired
    assert pd.read_csv(tmp_path/'loss.csv').dropna(subset=['pair_ssim']).collapse_warning.tolist() == [0, 1]

def test_gross_collapse_is_warned_inside_the_warmup(mr_dir, tmp_path, capsys):
    "A generator that ignores its noise, 134 slices at bs 16 (128 images an epoch): warned at epoch 8, the first past 1 kimg"
    dls = gan_dls(mr_dir, size=32, bs=16, z_dim=16, progress=False, verbose=False)
    learn = gan_learner(dls, generator=_OneImage(), seed=0, ema=False, path=tmp_path, cbs=[SampleDiversity(n=16), LossChart()],
                        **SMALL_CRITIC)
    learn.fit(9)                                                                     # 1.15 kimg: a fifth of the warm-up
    w = _warnings(capsys.readouterr().out)
    assert len(w) == 1 and w[0].startswith('warning: epoch 8 (1.02 kimg): samples are nearly identical') and 'collapsing' in w[0]
    lines = (tmp_path/'warnings.txt').read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith('epoch 8 (1.02 kimg)')             # and no end-of-fit warning after it
    d = pd.read_csv(tmp_path/'loss.csv').dropna(subset=['pair_ssim'])
    assert d.collapse_warning.tolist() == [0] * 7 + [1, 0]

def test_an_unformed_dcgan_is_not_taken_for_a_gross_collapse(mr_dir, tmp_path, capsys):
    "A healthy DCGAN starts with samples as alike as a collapsed one, but grows more varied: no epoch rule fires in its first kimg"
    dls = gan_dls(mr_dir, size=32, bs=16, z_dim=16, progress=False, verbose=False)
    cb = SampleDiversity(n=16)
    learn = gan_learner(dls, arch='dcgan', seed=0, path=tmp_path, cbs=[cb], g_kwargs=dict(ngf=16), c_kwargs=dict(ndf=16))
    learn.fit(9)
    ssim = [h['pair_ssim'] for h in cb.history]
    assert ssim[0] > 0.95 and ssim[0] - cb.real[0] > 0.6                              # at its start it looks collapsed ...
    assert min(ssim[-3:]) < 0.9 and ssim[-1] < ssim[0] - 0.2                          # ... and it grows more varied
    assert [h['collapse_warning'] for h in cb.history] == [0] * 9
    w = _warnings(capsys.readouterr().out)
    assert len(w) == 1 and w[0].startswith('warning: training ended at epoch 9') and 'unformed or collapsing' in w[0]

def test_resume_keeps_the_collapse_watch_state(mr_dir, tmp_path):
    "Stopped after epoch 7 and resumed, the gross rule still fires at epoch 8: its window of measurements came back from the checkpoint"
    dls = gan_dls(mr_dir, size=32, bs=16, z_dim=16, progress=False, verbose=False)
    def learner(path):
        cb = SampleDiversity(n=16)
        return gan_learner(dls, generator=_OneImage(), seed=0, ema=False, path=path, cbs=[cb, GANCheckpoint(keep=1)], **SMALL_CRITIC), cb
    learn, first = learner(tmp_path)
    learn.fit(7)
    assert [h['collapse_warning'] for h in first.history] == [0] * 7
    learn, cb = learner(tmp_path)
    assert load_checkpoint(learn, tmp_path/'checkpoints'/'epoch_007.pth') == 7
    assert (cb.real, cb.streak, cb.warned, cb.n_img) == (first.real, 0, False, 7 * 128)
    assert cb.recent == first.recent and len(cb.recent) == 3 and cb.history == first.history
    learn.fit(8, start_epoch=7)
    assert [h['collapse_warning'] for h in cb.history] == [0] * 7 + [1] and cb.warned
    lines = (tmp_path/'warnings.txt').read_text().splitlines()
    assert lines[0].startswith('training ended at epoch 7') and lines[1].startswith('epoch 8 (1.02 kimg): samples are nearly identical')
    state = read_checkpoint(tmp_path/'checkpoints'/'epoch_008.pth')['callbacks']['sample_diversity']
    assert state['warned'] and state['n_img'] == 8 * 128 and len(state['recent']) == 3

def test_conditional_diversity_is_per_class(mr_dir, tmp_path):
    dls = gan_dls(mr_dir, size=32, bs=16, z_dim=16, label='folder', progress=False, verbose=False)
    cb = SampleDiversity(n=8, warmup_kimg=0)
    learn = gan_learner(dls, seed=0, path=tmp_path, cbs=[cb])
    learn.fit(1)
    per = learn.gan_state.diversity['per_class']
    assert sorted(per) == [0, 1, 2, 3] and all(0 < r < 1 for _, r in per.values())   # HFS/HFP/HFDL/HFDR

@pytest.mark.parametrize('arch', ['dcgan', 'style'])
def test_diversity_watch_leaves_training_bit_identical(mr_dir, tmp_path, arch):
    dls = gan_dls(mr_dir/'HFS', size=32, bs=16, progress=False, verbose=False)
    small = dict(channel_base=256, channel_max=64) if arch == 'style' else None
    def run(cbs):
        learn = gan_learner(dls, arch=arch, seed=0, g_kwargs=small, c_kwargs=small, cbs=cbs, path=tmp_path)
        learn.fit(2)
        return learn
    plain, watched = run([]), run([SampleDiversity(n=8)])
    assert watched.gan_state.diversity['epoch'] == 2
    for a, b in [(plain.model.generator, watched.model.generator), (plain.model.critic, watched.model.critic),
                 (plain.gan_state.ema, watched.gan_state.ema)]:
        ta, tb = (dict(list(m.named_parameters()) + list(m.named_buffers())) for m in (a, b))
        assert list(ta) == list(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)

def test_auto_config_follows_size_data_and_flags():
    r, why = auto_config(Recipe(arch='style', size=128).resolved(), n_slices=2900, device='cpu')
    assert r.bs == 32 and r.r1_gamma == pytest.approx(0.0002 * 128**2 / 32) and r.ema_kimg == 10. and r.width == 128
    assert set(why) == {'bs', 'width', 'r1_gamma', 'ema_kimg', 'ada_target', 'ada_kimg'}
    r, _ = auto_config(Recipe(arch='style', size=256).resolved(), n_slices=2900, device='cpu')
    assert r.bs == 16                                                              # NVlabs: 4096 // 256
    r, _ = auto_config(Recipe(arch='style', size=64).resolved(), n_slices=35, device='cpu')
    assert r.bs == 8 and r.r1_gamma == pytest.approx(0.0002 * 64**2 / 8)
    r, why = auto_config(Recipe(arch='style', bs=64, width=64, r1_gamma=5., ema_kimg=1., ada_target=.5, ada_kimg=3.).resolved(), 35, 'cpu')
    assert (r.bs, r.width, r.r1_gamma, r.ema_kimg, r.ada_target, r.ada_kimg) == (64, 64, 5., 1., .5, 3.) and why == {}
    assert auto_config(Recipe().resolved(), 134, 'cpu')[0].r1_gamma == 0.                   # DCGAN: spectral norm instead

def test_medgan_train_prints_and_records_its_choices(mr_dir, tmp_path, cache_env):
    out = tmp_path/'run'
    r = subprocess.run([MEDGAN, 'train', str(mr_dir/'HFS'), '--out', str(out), '--size', '32', '--arch', 'style',
                        '--width', '32', '--kimg', '0.05', '--samples', '16'], env=cache_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'chosen from the data' in r.stdout and '--bs 8:' in r.stdout and '--r1-gamma 0.0256:' in r.stdout
    chosen = [l.split()[0] for l in r.stdout.splitlines() if l.startswith('  --')]
    assert '--bs' in chosen and '--width' not in chosen                                # given, not chosen
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['bs'], cfg['width'], cfg['r1_gamma'], cfg['ema_kimg'], cfg['kimg']) == (8, 32, 0.0256, 2.5, 0.05)
    g = load_generator(out/'generator.pth')
    assert g.config['channel_max'] == 32                                            # the flag reached the nets
    assert 'bs' in json.loads((out/'training.json').read_text())['chosen_from_data']
    h = subprocess.run([MEDGAN, 'train', '--help'], env=cache_env, capture_output=True, text=True, timeout=120).stdout
    assert '--kimg' in h and '--minutes' in h and '--width' in h and '--ema-kimg' in h

def test_mode_seeking_keeps_a_conditional_dcgan_from_ignoring_its_noise(mr_dir):
    "The default conditional DCGAN on the MR's four head positions: without the mode-seeking term each class's samples are "
    "near-identical after 1 kimg (0.82-0.88 pair SSIM against 0.30-0.42 real); with it (the default) they vary as real slices do"
    dls = gan_dls(mr_dir, size=32, bs=32, label='folder', progress=False, verbose=False)
    real = {k: pair_ssim(v, diversity_pairs(16, 120, 0)) for k, v in real_slices_by_class(dls, 16, 0).items()}
    z = torch.randn(16, 100, generator=torch.Generator().manual_seed(1))
    def per_class(mode_seeking):
        learn = gan_learner(dls, seed=0, mode_seeking=mode_seeking, cbs=[TrainingBudget(kimg=1)])
        with learn.no_logging(), learn.no_bar(): learn.fit(100)
        assert learn.mode_seeking == (0.5 if mode_seeking is None else mode_seeking)
        G = learn.model.generator
        return {k: pair_ssim(sample_images(G, z, labels=torch.full((16,), k)), diversity_pairs(16, 120, 0)) for k in real}
    off, default = per_class(0.), per_class(None)
    assert all(off[k] > real[k] + 0.3 for k in real), (off, real)
    assert all(default[k] < real[k] + 0.05 for k in real), (default, real)
