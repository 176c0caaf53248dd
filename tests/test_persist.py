"What is written to disk: generator files load without the training stack; checkpoints are ordered by epoch number."
import subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from medgan_fastai.models import DCGANGenerator
from medgan_fastai.style import StyleGenerator
from medgan_fastai.persist import *

TRAINING_STACK = ('fastai.learner', 'medgan_fastai.learner', 'medgan_fastai.callbacks', 'medgan_fastai.run')

@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('models')
    save_generator(DCGANGenerator(32, z_dim=8, ngf=4), d/'dcgan.pth', window='brain')
    save_generator(StyleGenerator(size=32, z_dim=16, w_dim=16, channel_base=64, channel_max=16), d/'style.pth')
    return d

def _fresh(code, cwd):
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

@pytest.mark.parametrize('name', ['dcgan', 'style'])
def test_loading_a_generator_imports_no_training_code(model_files, name, tmp_path):
    out = _fresh(f'''
        import sys
        from medgan_fastai.persist import load_generator
        g = load_generator({str(model_files/f"{name}.pth")!r}, device='cpu')
        import medgan_fastai.latent, medgan_fastai.app
        from medgan_fastai.cli import main
        main(['generate', {str(model_files/f"{name}.pth")!r}, '-n', '2', '--out', {str(tmp_path/"png")!r}])
        print(sorted(m for m in sys.modules if m in {TRAINING_STACK!r}))
    ''', tmp_path)
    assert out.strip().splitlines()[-1] == '[]'
    assert len(list((tmp_path/'png').glob('*.png'))) == 2

def test_star_import_still_brings_everything(tmp_path):
    out = _fresh('''
        from medgan_fastai import *
        names = dir()
        print(all(n in names for n in ('load_generator', 'train_run', 'gan_learner', 'GANState', 'dicom_slice', 'Recipe')))
    ''', tmp_path)
    assert out.strip() == 'True'

def test_checkpoints_are_ordered_by_epoch_number(tmp_path):
    "Text order put epoch_1000.pth before epoch_999.pth: the newest was pruned and resume went back to epoch 999"
    from medgan_fastai.callbacks import GANCheckpoint
    d = tmp_path/'checkpoints'
    for e in (998, 999, 1000): write_checkpoint(dict(epoch=e), d/f'epoch_{e:03d}.pth')
    assert latest_checkpoint(tmp_path).name == 'epoch_1000.pth'
    assert [checkpoint_epoch(p) for p in checkpoint_files(tmp_path)] == [998, 999, 1000]
    cb = GANCheckpoint(keep=2)
    for old in checkpoint_files(d)[:-cb.keep]: old.unlink()  # what the callback prunes
    assert sorted(p.name for p in d.iterdir()) == ['epoch_1000.pth', 'epoch_999.pth']

def test_generator_file_round_trip_and_refusals(model_files, tmp_path):
    g = load_generator(model_files/'dcgan.pth', device='cpu')
    assert g.info['window'] == 'brain' and not g.training
    (tmp_path/'junk.pth').write_bytes(b'not a model')
    with pytest.raises(CheckpointError, match='junk.pth: not a loadable model file'): load_generator(tmp_path/'junk.pth')
    with pytest.raises(CheckpointError, match='no generator.pth and no checkpoint'): load_generator(tmp_path)
