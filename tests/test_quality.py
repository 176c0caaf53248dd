"[quality]: training length in kimg and minutes (with resume), sample-diversity watch, auto-configuration from the data."
import json, os, subprocess, sys
from pathlib import Path
import pandas as pd, pytest, torch
from torch import nn
from medgan_fastai.run import Recipe, train_run, auto_config
from medgan_fastai.data import gan_dls
from medgan_fastai.learner import gan_learner
from medgan_fastai.callbacks import SampleDiversity, LossChart, TrainingBudget, pair_ssim, diversity_pairs, real_slices_by_class
from medgan_fastai.persist import load_generator, checkpoint_files, read_checkpoint

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

def test_no_warning_during_warmup(mr_dir, tmp_path, capsys):
    dls = gan_dls(mr_dir/'HFS', size=32, bs=16, z_dim=16, progress=False, verbose=False)
    learn = gan_learner(dls, generator=_OneImage(), seed=0, ema=False, path=tmp_path, cbs=[SampleDiversity(n=16, patience=1)])
    learn.fit(2)
    assert 'warning' not in capsys.readouterr().out and not (tmp_path/'warnings.txt').exists()

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
