"The `medgan` commands end to end, as a user runs them: train, generate, resume after a hard kill."
import os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image

MEDGAN = str(Path(sys.executable).parent/'medgan')

@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return {**os.environ, 'MEDGAN_CACHE': str(tmp_path_factory.mktemp('cache')), 'PYTHONUNBUFFERED': '1'}

def _run(args, env, check=True):
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    if check and r.returncode: raise AssertionError(f'{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
    return r

def _train_args(src, out, epochs):
    return [MEDGAN, 'train', str(src), '--size', '32', '--bs', '16', '--epochs', str(epochs), '--out', str(out), '--seed', '7', '--samples', '16',
            '--overhead', '0']  # a grid and a checkpoint after every epoch, as these tests count them

@pytest.fixture(scope='module')
def run2(mr_dir, env, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')/'mr32'
    _run(_train_args(mr_dir, out, 2), env)
    return out

def test_two_epoch_run_folder(run2):
    assert sorted(p.name for p in (run2/'samples').glob('epoch_*.png')) == ['epoch_001.png', 'epoch_002.png']
    assert (run2/'samples'/'progress.gif').exists() and (run2/'loss.png').exists() and (run2/'generator.pth').exists()
    import pandas as pd
    df = pd.read_csv(run2/'loss.csv')
    assert len(df) > 0 and np.isfinite(df[['crit_loss', 'gen_loss']].values).all()
    assert (run2/'checkpoints'/'epoch_002.pth').exists()

def test_generate_is_reproducible(run2, env, tmp_path):
    a, b = tmp_path/'a', tmp_path/'b'
    for d in (a, b): _run([MEDGAN, 'generate', str(run2), '-n', '6', '--out', str(d), '--seed', '11'], env)
    fa, fb = sorted(a.glob('*.png')), sorted(b.glob('*.png'))
    assert len(fa) == 6 and [f.name for f in fa] == [f.name for f in fb]
    for x, y in zip(fa, fb): assert np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y)))
    # and they are what the exported generator gives for those seeds
    from medgan_fastai.persist import load_generator
    from medgan_fastai.latent import generate
    imgs = generate(load_generator(run2/'generator.pth', device='cpu'), list(range(11, 17)))
    ref = np.round(((imgs.clamp(-1, 1) + 1) / 2)[:, 0].numpy() * 255)
    got = np.stack([np.asarray(Image.open(f), np.float64) for f in fa])
    assert np.abs(got - ref).max() <= 1
    # DICOM output: one synthetic series
    dcm = tmp_path/'dcm'
    _run([MEDGAN, 'generate', str(run2), '-n', '3', '--out', str(dcm), '--format', 'dicom'], env)
    import pydicom
    dss = [pydicom.dcmread(f) for f in sorted(dcm.glob('*.dcm'))]
    assert len(dss) == 3 and len({d.SeriesInstanceUID for d in dss}) == 1
    assert 'DERIVED' in dss[0].ImageType and 'synthetic' in str(dss[0].SeriesDescription).lower()

def test_existing_run_is_not_overwritten(run2, mr_dir, env):
    before = (run2/'generator.pth').stat().st_mtime_ns
    r = _run(_train_args(mr_dir, run2, 2), env, check=False)
    assert r.returncode != 0 and '--resume' in r.stderr
    assert (run2/'generator.pth').stat().st_mtime_ns == before

KILLER = textwrap.dedent('''
    import os, signal, sys
    import medgan_fastai.learner as L
    from fastai.callback.core import Callback
    from medgan_fastai.cli import main
    class KillDuringEpoch3(Callback):
        "SIGKILL this process in the middle of the third epoch: no chance to clean up"
        def after_batch(self):
            if self.training and self.epoch == 2 and self.iter == 3: os.kill(os.getpid(), signal.SIGKILL)
    _gan_learner = L.gan_learner
    L.gan_learner = lambda *a, cbs=None, **k: _gan_learner(*a, cbs=list(cbs or []) + [KillDuringEpoch3()], **k)
    main(sys.argv[1:])
''')

def test_resume_after_sigkill_equals_uninterrupted_run(mr_dir, env, tmp_path):
    full, cut = tmp_path/'full', tmp_path/'cut'
    _run(_train_args(mr_dir, full, 4), env)
    r = _run([sys.executable, '-c', KILLER] + _train_args(mr_dir, cut, 4)[1:], env, check=False)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    cks = sorted(p.name for p in (cut/'checkpoints').glob('*.pth'))
    assert cks == ['epoch_001.pth', 'epoch_002.pth']          # killed in epoch 3, before its checkpoint
    r = _run([MEDGAN, 'train', '--out', str(cut), '--resume', '--epochs', '4'], env)
    assert 'after epoch 2' in r.stdout
    a = torch.load(full/'checkpoints'/'epoch_004.pth', weights_only=True)
    b = torch.load(cut/'checkpoints'/'epoch_004.pth', weights_only=True)
    for net in ('generator', 'critic'):
        for k in a[net]:   # bitwise equal (the augmentation's extra state, its probability p, is a dict)
            assert (torch.equal(a[net][k], b[net][k]) if isinstance(a[net][k], torch.Tensor) else a[net][k] == b[net][k]), (net, k)
    assert len(list((cut/'samples').glob('epoch_*.png'))) == 4

def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(mr_dir, env, tmp_path):
    import signal, time
    out = tmp_path/'int'
    p = subprocess.Popen(_train_args(mr_dir/'HFS', out, 500), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out/'checkpoints'/'epoch_001.pth').exists() and time.time() < deadline and p.poll() is None: time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert 'Traceback' not in stderr and 'interrupted during epoch' in stdout
    saved = sorted((out/'checkpoints').glob('*_interrupted.pth'))
    assert len(saved) == 1
    r = _run([MEDGAN, 'train', '--out', str(out), '--resume', '--epochs', str(int(saved[0].name[6:9]) + 1)], env)
    assert 'resuming' in r.stdout and (out/'generator.pth').exists()

def _file_size_limit(nbytes):
    "For `preexec_fn`: files the process writes may not grow past `nbytes` (a full disk, for writing; SIGXFSZ becomes an error)"
    import resource, signal
    def f():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return f

def test_a_checkpoint_that_cannot_be_written_ends_the_run_in_one_line_and_keeps_the_last(mr_dir, env, tmp_path):
    out = tmp_path/'full'
    _run(_train_args(mr_dir/'HFS', out, 1), env)
    ck = out/'checkpoints'/'epoch_001.pth'
    before = ck.read_bytes()
    # checkpoints are ~25 MB at this size; samples, charts and the slice cache stay far below 10 MB
    r = subprocess.run([MEDGAN, 'train', '--out', str(out), '--resume', '--epochs', '2'], env=env, capture_output=True, text=True,
                       timeout=600, preexec_fn=_file_size_limit(10 * 2**20))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr and 'epoch_002.pth' in r.stderr and 'could not be written' in r.stderr, r.stderr[-2000:]
    assert 'MB free there' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f'continue with: medgan train --out {out} --resume' in r.stdout
    assert sorted(p.name for p in (out/'checkpoints').iterdir()) == ['epoch_001.pth']  # no temporary left behind
    assert ck.read_bytes() == before
    r = _run([MEDGAN, 'train', '--out', str(out), '--resume', '--epochs', '2'], env)   # space again: the run goes on
    assert 'after epoch 1' in r.stdout and (out/'checkpoints'/'epoch_002.pth').exists()

# --- evaluate: utility, intervals and the floor; generate --units hu

def _conditional_run(folder, window='auto', label='Modality'):
    "A run folder holding an (untrained) conditional DCGAN over classes CT and MR, and the recipe's label rule"
    import json
    from medgan_fastai.models import build_generator
    from medgan_fastai.persist import save_generator
    torch.manual_seed(0)
    g = build_generator(dict(arch='dcgan', size=64, z_dim=16, ngf=8, n_channels=1, n_classes=2))
    folder.mkdir(parents=True)
    save_generator(g, folder/'generator.pth', window=window, size=64, skip_blank=False, vocab=['CT', 'MR'], arch='dcgan')
    (folder/'config.json').write_text(json.dumps(dict(label=label, label_map=None, window=window, size=64)))
    return folder

def _linked(folder, files):
    "`folder` of symbolic links to the real files (the data stay where they are, read-only)"
    folder.mkdir(parents=True)
    for f in files: (folder/f'{f.parent.name}_{f.name}').symlink_to(f)
    return folder

def test_evaluate_utility_with_holdout_intervals_and_ranking(mr_dir, ct_dir, env, tmp_path):
    import json
    ct = sorted(ct_dir.glob('*.dcm'))
    src = _linked(tmp_path/'src', sorted((mr_dir/'HFS').glob('*.dcm'))[8:24] + ct[:20])
    hold = _linked(tmp_path/'hold', sorted((mr_dir/'HFP').glob('*.dcm'))[8:24] + ct[20:])
    run = _conditional_run(tmp_path/'run')
    r = _run([MEDGAN, 'evaluate', str(run), str(src), '--metrics', 'utility', '-n', '16', '--n-boot', '20', '--holdout', str(hold)], env)
    out = json.loads((run/'metrics.json').read_text())
    m = out['metrics']
    for s in ('real', 'synthetic', 'mixed'):
        for k in ('accuracy', 'balanced_accuracy', 'auc'):
            key = f'utility_{s}_{k}'
            assert 0 <= m[key] <= 1 and out['intervals'][key][0] <= m[key] <= out['intervals'][key][1], key
    assert m['utility_n_holdout'] == 24 and out['notes']['utility_split'] == 'explicit holdout set' and 'tstr_trtr' in m
    assert m['utility_real_balanced_accuracy'] >= 0.9  # MR vs CT is learnt from real slices and holds on unseen series
    assert 'utility_real_balanced_accuracy' in r.stdout and 'tstr_trtr' in r.stdout
    # an unconditional model: one line, exit status 1
    r = _run([MEDGAN, 'evaluate', 'demo', str(src), '--metrics', 'utility', '-n', '8'], env, check=False)
    assert r.returncode == 1 and 'unconditional' in r.stderr and 'Traceback' not in r.stderr

def test_ranking_marks_overlapping_intervals():
    from medgan_fastai.cli import _ranking
    rows = [dict(model='a', swd=10.), dict(model='b', swd=12.), dict(model='c', swd=30.)]
    iv = dict(a=dict(swd=[8, 13]), b=dict(swd=[11, 14]), c=dict(swd=[25, 35]))
    df, first = _ranking(rows, iv)
    assert first == 'swd' and list(df.model) == ['a', 'b', 'c']
    assert list(df['distinguishable']) == ['best', 'no: overlaps the best', 'yes'] and df['swd 95%'].iloc[0] == '8..13'

def test_evaluate_reports_intervals_and_floor(env, tmp_path):
    import json
    run = tmp_path/'demo'
    run.mkdir()
    from medgan_fastai.persist import load_generator, save_generator
    save_generator(load_generator('demo-dcgan', device='cpu'), run/'generator.pth', window='auto', size=64, skip_blank=True)
    r = _run([MEDGAN, 'evaluate', str(run), 'demo', '--metrics', 'swd,pr', '-n', '32', '--n-boot', '20'], env)
    out = json.loads((run/'metrics.json').read_text())
    assert set(out['metrics']) == {'swd_64', 'swd_32', 'swd_16', 'swd', 'precision', 'recall'}  # the card's keys, as before
    for k, v in out['metrics'].items(): assert out['intervals'][k][0] <= v <= out['intervals'][k][1] and k in out['floors']
    assert 'real-vs-real floor' in r.stdout

def test_generate_units_hu(env, tmp_path):
    import pydicom
    from pydicom.pixels import apply_modality_lut
    run = _conditional_run(tmp_path/'ct', window='brain')
    out = tmp_path/'hu'
    r = _run([MEDGAN, 'generate', str(run), '-n', '2', '--format', 'dicom', '--units', 'hu', '--out', str(out), '--no-privacy-filter'], env)
    assert 'HU over the training window 40,80' in r.stdout
    ds = [pydicom.dcmread(f) for f in sorted(out.glob('*.dcm'))]
    assert len(ds) == 2 and ds[0].Modality == 'CT' and ds[0].RescaleType == 'HU' and float(ds[0].WindowWidth) == 80
    hu = np.stack([apply_modality_lut(d.pixel_array, d) for d in ds])
    assert 0 <= hu.min() and hu.max() <= 79 and hu.std() > 0  # [0, 1] -> 0..79 HU (brain window 40, 80)
    # a model without a fixed window has no HU scale: refused in one line
    r = _run([MEDGAN, 'generate', 'demo', '-n', '1', '--format', 'dicom', '--units', 'hu', '--out', str(tmp_path/'no'),
              '--no-privacy-filter'], env, check=False)
    assert r.returncode == 1 and '--units hu needs a model trained on CT' in r.stderr and not (tmp_path/'no').exists()

def test_evaluate_a_nifti_source_sliced_as_the_model_records_or_the_flags_say(shared_data, env, tmp_path, monkeypatch):
    "NIfTI SOURCE: the model's recorded `volume` options make the real slices; a flag given explicitly wins over them"
    import json
    from medgan_fastai.persist import load_generator, save_generator
    from medgan_fastai.cli import main
    monkeypatch.setenv('MEDGAN_CACHE', env['MEDGAN_CACHE'])
    nii = str(shared_data/'nifti'/'mr-t1-sag_HFS.nii.gz')  # 35 sagittal slices of 256x256: 256 axial ones
    g = load_generator('demo', device='cpu')
    plain, rec = tmp_path/'plain', tmp_path/'rec'
    save_generator(g, plain/'generator.pth', window='auto', size=g.size, skip_blank=True)
    save_generator(g, rec/'generator.pth', window='auto', size=g.size, skip_blank=True, volume=dict(axis='sagittal'))
    args = ['--metrics', 'swd', '-n', '64', '--n-boot', '0', '--no-floor', '--overwrite']
    n_real = lambda run: json.loads((run/'metrics.json').read_text())['n_real']
    main(['evaluate', str(plain), str(rec), nii, *args])
    assert n_real(plain) == 64 and 20 <= n_real(rec) <= 35  # no record: axial (the default); recorded: sagittal
    main(['evaluate', str(plain), nii, '--axis', 'sagittal', *args])
    assert n_real(plain) == n_real(rec)  # the flag supplies what the model does not record
    main(['evaluate', str(rec), nii, '--axis', 'axial', *args])
    assert n_real(rec) == 64  # the flag wins over the record
    with pytest.raises(SystemExit) as e: main(['evaluate', str(rec), nii, '--axis', 'oblique', *args])
    assert str(e.value.code).startswith("medgan evaluate: --axis: axis 'oblique'")
