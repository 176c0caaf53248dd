"[scale]: class-conditional training, big caches, multi-process data-parallel training, mixed precision"
import json, os, subprocess, sys, warnings, zlib
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from medgan_fastai.slices import prepare, SliceCache, blank_mask, file_crc32
from medgan_fastai.data import gan_dls, _split_idxs
from medgan_fastai.models import DCGANGenerator, DCGANCritic
from medgan_fastai.style import StyleGenerator, StyleCritic
from medgan_fastai.learner import gan_learner, export_generator, GANMixedPrecision, resolve_precision
from medgan_fastai.persist import load_generator
from medgan_fastai.callbacks import SampleGrid
from medgan_fastai.latent import generate, class_view, label_index
from medgan_fastai.app import GeneratorApp, build_app
from medgan_fastai.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_DCGAN = dict(g_kwargs=dict(ngf=8), c_kwargs=dict(ndf=8))
TINY_STYLE = dict(g_kwargs=dict(channel_base=64, channel_max=16, w_dim=16, n_mapping=2), c_kwargs=dict(channel_base=64, channel_max=16))

@pytest.fixture(scope='module')
def mr_dls(mr_dir, tmp_path_factory):
    "The 140 real MR slices at 32 px, labelled by their folder: 4 head positions"
    return gan_dls(mr_dir, size=32, bs=16, z_dim=16, label='folder', cache_dir=tmp_path_factory.mktemp('cache'), progress=False, verbose=False)

@pytest.fixture(scope='module')
def cond_run(mr_dls, tmp_path_factory):
    "A short conditional DCGAN run on the real MR slices, exported"
    path = tmp_path_factory.mktemp('run')
    learn = gan_learner(mr_dls, arch='dcgan', seed=0, path=path, cbs=[SampleGrid(nrow=5, gif=None)], **TINY_DCGAN)
    learn.fit(1)
    export_generator(learn, path/'generator.pth')
    return learn, path

# --- conditional training ---------------------------------------------------------------------------------------

def test_labels_from_folders(mr_dls):
    assert list(mr_dls.vocab) == ['HFDL', 'HFDR', 'HFP', 'HFS']
    noise,real,label = mr_dls.one_batch()
    assert real.shape == (16, 1, 32, 32) and label.shape == (16,) and int(label.max()) < 4
    # every label is the folder of its file
    items = mr_dls.items.set_index(mr_dls.items.index)
    assert (items.label == [Path(f).parent.name for f in items.file]).all()

def test_conditional_run_builds_conditional_nets(cond_run):
    learn,path = cond_run
    G,C = learn.model.generator,learn.model.critic
    C = getattr(C, 'critic', C)  # behind the augmentation when there is one
    assert G.n_classes == 4 and C.n_classes == 4 and G.config['n_classes'] == 4 and G.vocab == ['HFDL', 'HFDR', 'HFP', 'HFS']
    assert np.isfinite(learn.recorder.values[-1]).all()
    # one row per class of 5 fixed-noise images: 4 x 5 tiles of 32 px with 2 px padding
    grid = Image.open(path/'samples'/'epoch_001.png')
    assert grid.size == (5 * 34 + 2, 4 * 34 + 2)

def test_generate_by_label(cond_run):
    _,path = cond_run
    g = load_generator(path/'generator.pth', device='cpu')
    assert g.n_classes == 4 and g.vocab == ['HFDL', 'HFDR', 'HFP', 'HFS']
    hfp = generate(g, [0, 1, 2], labels='HFP')
    assert hfp.shape == (3, 1, 32, 32)
    assert torch.allclose(generate(g, [0, 1, 2], labels=2), hfp)
    assert (generate(g, [0, 1, 2], labels='HFS') - hfp).abs().max() > 1e-4  # same seeds, another class
    with pytest.raises(ValueError, match='HFDL, HFDR, HFP, HFS'): generate(g, [0], labels='lateral')
    with pytest.raises(ValueError, match='needs labels'): generate(g, [0])

def test_cli_generate_label(cond_run, tmp_path, capsys):
    _,path = cond_run
    main(['generate', str(path), '-n', '3', '--out', str(tmp_path/'a'), '--label', 'HFP'])
    assert sorted(p.name for p in (tmp_path/'a').glob('*.png')) == [f'seed_00000{i}_HFP.png' for i in range(3)]
    assert (tmp_path/'a'/'audit.json').exists()  # the privacy filter's record beside the images
    main(['generate', str(path), '-n', '4', '--out', str(tmp_path/'b')])  # no label: every class in turn
    assert sorted(p.name for p in (tmp_path/'b').glob('*.png')) == ['seed_000000_HFDL.png', 'seed_000001_HFDR.png',
                                                                'seed_000002_HFP.png', 'seed_000003_HFS.png']
    with pytest.raises(SystemExit, match='unknown label'): main(['generate', str(path), '--out', str(tmp_path/'c'), '--label', 'XX'])

def test_app_by_label(cond_run):
    _,path = cond_run
    app = GeneratorApp(path/'generator.pth', device='cpu')
    assert app.classes == ['HFDL', 'HFDR', 'HFP', 'HFS'] and 'conditional: 4 classes' in app.describe()
    a,b = np.asarray(app.image(3, label='HFP')),np.asarray(app.image(3, label='HFS'))
    assert a.shape == (32, 32) and (a != b).any()
    assert np.array_equal(np.asarray(app.image(3, label='HFP')), a)
    png,dcm = app.export(3, label='HFP')
    # labels came from folder names, not from a mapping the user wrote: files carry the class index, never the name
    assert Path(png).name == 'medgan_seed3_class2.png' and 'HFP' not in Path(dcm).name
    with pytest.raises(ValueError, match='unknown label'): app.image(3, label='XX')
    demo = build_app(app)
    dd = [c for c in demo.blocks.values() if getattr(c, 'elem_id', None) == 'label'][0]
    assert dd.visible and [ch[0] for ch in dd.choices] == app.classes
    # an unconditional model: the selector is hidden and labels are refused
    plain = GeneratorApp(DCGANGenerator(32, z_dim=16, ngf=8))
    dd = [c for c in build_app(plain).blocks.values() if getattr(c, 'elem_id', None) == 'label'][0]
    assert not dd.visible
    with pytest.raises(ValueError, match='unconditional'): plain.image(0, label='HFP')

def test_conditional_style_with_ada(mr_dls):
    learn = gan_learner(mr_dls, arch='style', seed=0, augment='ada', r1_every=2, pl_weight=2., **TINY_STYLE)
    assert learn.model.generator.mapping.n_classes == 4 and learn.model.critic.critic.n_classes == 4
    learn.fit(1)
    assert np.isfinite(learn.recorder.values[-1]).all()
    g = learn.gan_state.ema
    assert generate(g, [0, 1], labels='HFDL').shape == (2, 1, 32, 32)
    assert class_view(g, 'HFS').mapping(torch.randn(2, 16)).shape == (2, g.num_ws, 16)

def test_labels_contract():
    z = torch.randn(2, 16)
    with pytest.raises(ValueError, match='unconditional'): DCGANGenerator(32, z_dim=16, ngf=8)(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='conditional'): StyleGenerator(32, z_dim=16, w_dim=16, channel_base=64, channel_max=16, n_classes=2)(z)
    with pytest.raises(ValueError, match='conditional'): StyleCritic(32, channel_base=64, channel_max=16, n_classes=2)(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match='0..1'): DCGANCritic(32, ndf=8, n_classes=2)(torch.randn(2, 1, 32, 32), torch.tensor([0, 2]))

def test_label_from_dicom_tag_with_mapping(mr_dir, tmp_path):
    dls = gan_dls(mr_dir, size=32, bs=8, z_dim=16, label='PatientPosition', label_map={'HFS': 'supine', 'HFP': 'prone'},
                  cache_dir=tmp_path, progress=False, verbose=False)
    assert list(dls.vocab) == ['prone', 'supine']
    assert set(Path(f).parent.name for f in dls.items.file) == {'HFS', 'HFP'}  # the unmapped positions are left out

def test_label_from_dataframe_column(mr_dir, tmp_path):
    from medgan_fastai.series import scan
    df = scan(mr_dir, progress=False)
    df['view'] = ['left' if 'HFDL' in f else 'right' if 'HFDR' in f else '' for f in df.file]
    dls = gan_dls(df, size=32, bs=8, z_dim=16, label='view', cache_dir=tmp_path, progress=False, verbose=False)
    assert list(dls.vocab) == ['left', 'right'] and len(dls.items) <= 70
    # the column, not a cached copy: new values give new labels
    df['view'] = df['view'].replace({'left': 'L', 'right': 'R'})
    dls = gan_dls(df, size=32, bs=8, z_dim=16, label='view', cache_dir=tmp_path, progress=False, verbose=False)
    assert list(dls.vocab) == ['L', 'R']

# --- large data ------------------------------------------------------------------------------------------------

def test_cache_streams_and_checks(mr_dir, tmp_path):
    from medgan_fastai.series import scan
    items = scan(mr_dir, progress=False)
    items = pd.concat([items] * 3, ignore_index=True)  # 420 slices: the worker path with bounded submission
    cache = SliceCache.build(items[['file', 'frame']], tmp_path/'c', size=32, n_workers=2, progress=False)
    assert len(cache) == 420 and SliceCache.is_valid(tmp_path/'c')
    assert cache.meta['crc32'] == file_crc32(tmp_path/'c'/'slices.u16') == zlib.crc32((tmp_path/'c'/'slices.u16').read_bytes())
    assert torch.equal(cache[0], cache[140]) and cache.gather([1, 2]).shape == (2, 1, 32, 32)
    ref = [bool((np.asarray(cache.data[i, 0], np.float32) / 65535 < 0.05).mean() > 0.95) for i in range(len(cache))]
    assert blank_mask(cache).tolist() == ref
    # a corrupted byte is noticed
    with open(tmp_path/'c'/'slices.u16', 'r+b') as f: f.seek(100); b = f.read(1); f.seek(100); f.write(bytes([b[0] ^ 1]))
    assert not SliceCache.is_valid(tmp_path/'c')

def test_split_by_patient_keeps_patients_apart(mr_dir, ct_dir, tmp_path):
    from medgan_fastai.series import scan
    items = pd.concat([scan(mr_dir, progress=False), scan(ct_dir, progress=False)], ignore_index=True)
    assert items.patient.nunique() >= 2
    val = set(_split_idxs(items, 0.3, 'patient', 0))
    train = set(range(len(items))) - val
    assert val and train
    assert not set(items.patient.iloc[sorted(val)]) & set(items.patient.iloc[sorted(train)])

# --- mixed precision ---------------------------------------------------------------------------------------------

def test_cpu_stays_fp32(mr_dls):
    learn = gan_learner(mr_dls, arch='dcgan', seed=0, **TINY_DCGAN)
    assert learn.precision == 'fp32' and not any(isinstance(c, GANMixedPrecision) for c in learn.cbs)
    with pytest.warns(UserWarning, match='needs a GPU'):
        learn = gan_learner(mr_dls, arch='dcgan', seed=0, precision='bf16', **TINY_DCGAN)
    assert learn.precision == 'fp32' and not any(isinstance(c, GANMixedPrecision) for c in learn.cbs)
    learn.fit(1)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert learn.model.generator(torch.randn(2, 16), labels=torch.tensor([0, 1])).dtype == torch.float32

@pytest.mark.parametrize('dtype', ['bf16', 'fp16'])
def test_mixed_precision_mechanics_on_cpu_autocast(mr_dls, dtype):
    "The callback's event plumbing (autocast around both updates, one GradScaler per net) with CPU autocast"
    learn = gan_learner(mr_dls, arch='dcgan', seed=0, cbs=[GANMixedPrecision(dtype, device_type='cpu')], **TINY_DCGAN)
    g0 = [p.detach().clone() for p in learn.model.generator.parameters()]
    learn.fit(1)
    mp = [c for c in learn.cbs if isinstance(c, GANMixedPrecision)][0]
    assert not mp._on  # autocast closed after the fit
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, p) for a,p in zip(g0, learn.model.generator.parameters()))
    if dtype == 'fp16': assert set(mp.scalers) == {'generator', 'critic'} and mp.scalers['generator'] is not mp.scalers['critic']

# --- multi-process data parallel ---------------------------------------------------------------------------------

DDP_SCRIPT = r'''
import hashlib, json, sys
from pathlib import Path
from fastai.callback.core import Callback
from medgan_fastai.data import gan_dls
from medgan_fastai.learner import gan_learner
from medgan_fastai.callbacks import GANCheckpoint, SampleGrid, LossChart
from medgan_fastai.distributed import init_distributed, on_rank0_first
out, arch, src = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rank = init_distributed()
class WeightLog(Callback):
    "A hash of every weight (generator, critic, EMA) after each batch"
    order = 95
    def before_fit(self): self.rows = []
    def after_batch(self):
        h = hashlib.sha1()
        for m in (self.model.generator, self.model.critic, self.learn.gan_state.ema):
            for p in m.parameters(): h.update(p.detach().cpu().numpy().tobytes())
        self.rows.append(h.hexdigest())
    def after_fit(self): (out/f'weights_rank{rank}.json').write_text(json.dumps(dict(rows=self.rows, n_dl=len(self.dl))))
dls = on_rank0_first(gan_dls, src, size=32, bs=8, z_dim=16, label='folder', cache_dir=out/'cache', progress=False, verbose=False)
kw = (dict(g_kwargs=dict(ngf=8), c_kwargs=dict(ndf=8)) if arch == 'dcgan' else
      dict(g_kwargs=dict(channel_base=64, channel_max=16, w_dim=16), c_kwargs=dict(channel_base=64, channel_max=16), r1_every=2, pl_weight=2.))
learn = gan_learner(dls, arch=arch, seed=0, path=out/'run', ema=True, cbs=[WeightLog(), SampleGrid(nrow=4), LossChart(), GANCheckpoint()], **kw)
with learn.distrib_ctx(): learn.fit(1)
'''

@pytest.mark.parametrize('arch', ['dcgan', 'style'])
def test_two_gloo_processes_stay_in_step(arch, mr_dir, tmp_path):
    script = tmp_path/'train_ddp.py'
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
                        str(tmp_path), arch, str(mr_dir)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    w0,w1 = (json.loads((tmp_path/f'weights_rank{i}.json').read_text()) for i in (0, 1))
    # each process had half of the epoch's batches (fastai's DistributedDL), and the weights agree after every step
    assert w0['n_dl'] == w1['n_dl'] == 134 // 2 // 8
    assert len(w0['rows']) == w0['n_dl'] and w0['rows'] == w1['rows']
    assert len(set(w0['rows'])) == len(w0['rows'])  # and they did train
    run = tmp_path/'run'
    assert sorted(p.name for p in (run/'checkpoints').iterdir()) == ['epoch_001.pth']
    assert sorted(p.name for p in (run/'samples').iterdir()) == ['epoch_001.png', 'progress.gif']
    assert sorted(p.name for p in run.iterdir()) == ['checkpoints', 'loss.csv', 'loss.png', 'samples']

BUDGET_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from fastai.callback.core import Callback
from medgan_fastai.data import gan_dls
from medgan_fastai.learner import gan_learner
from medgan_fastai.callbacks import TrainingBudget
from medgan_fastai.distributed import init_distributed, on_rank0_first
out, src = Path(sys.argv[1]), sys.argv[2]
rank = init_distributed()
class LateStart(Callback):
    "The second process begins its fit 2 s after the first, so their clocks disagree by 2 s all along"
    order = 90  # before TrainingBudget starts its clock
    def before_fit(self):
        if rank == 1: time.sleep(2)
class BatchLog(Callback):
    order = 96
    def before_fit(self): self.n = 0
    def after_batch(self): self.n += self.training
    def after_fit(self):
        (out/f'budget_rank{rank}.json').write_text(json.dumps(dict(batches=self.n, reason=budget.reason, at=budget.stopped_at)))
dls = on_rank0_first(gan_dls, src, size=32, bs=8, z_dim=16, cache_dir=out/'cache', progress=False, verbose=False)
budget = TrainingBudget(minutes=0.05)
learn = gan_learner(dls, arch='dcgan', seed=0, path=out/'run', cbs=[LateStart(), budget, BatchLog()], g_kwargs=dict(ngf=8), c_kwargs=dict(ndf=8))
with learn.distrib_ctx(): learn.fit(10_000)
"""

def test_a_minutes_budget_stops_all_processes_after_the_same_batch(mr_dir, tmp_path):
    # each process reads its own clock; the second starts 2 s late, so on its own clock the 3 s budget would end a
    # dozen batches after the first process stopped, and it would wait forever for it in the next gradient exchange
    script = tmp_path/'budget_ddp.py'
    script.write_text(BUDGET_SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    try:
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
                            str(tmp_path), str(mr_dir)], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    except subprocess.TimeoutExpired: pytest.fail('a process was left waiting: the budget ended the processes at different batches')
    assert r.returncode == 0, r.stderr[-3000:]
    b0,b1 = (json.loads((tmp_path/f'budget_rank{i}.json').read_text()) for i in (0, 1))
    assert b0 == b1 and b0['reason'] == '0.05 minutes' and b0['at'] in ('batch', 'epoch')
    assert 0 < b0['batches'] < 10_000 * (140 // 2 // 8)
