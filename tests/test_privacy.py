"The privacy filter at export: `medgan generate` and the app leave out near-copies of the run's own training slices, and say so."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np, pydicom, pytest, torch
from torch import nn
from medgan_fastai.models import DCGANGenerator
from medgan_fastai.persist import save_generator, load_generator
from medgan_fastai.privacy import *
from medgan_fastai.data import training_slices
from medgan_fastai.cli import main
import medgan_fastai.latent as latent

MEDGAN = str(Path(sys.executable).parent/'medgan')

@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    "A decode-once cache of this module's own, for this process and the commands it starts"
    mp = pytest.MonkeyPatch()
    mp.setenv('MEDGAN_CACHE', str(tmp_path_factory.mktemp('cache')))
    yield
    mp.undo()

def make_run(folder: Path, source) -> Path:
    "A run folder as `medgan train` leaves it (the resolved recipe in config.json, generator.pth), holding an untrained 32 px DCGAN"
    from medgan_fastai.run import Recipe
    folder.mkdir(parents=True)
    Recipe(source=str(source), size=32).resolved().to_json(folder/'config.json')
    torch.manual_seed(0)
    save_generator(DCGANGenerator(32, z_dim=100, ngf=8), folder/'generator.pth', source=str(source), window='auto', size=32, skip_blank=True)
    return folder

@pytest.fixture(scope='module')
def run(mr_dir, cache, tmp_path_factory): return make_run(tmp_path_factory.mktemp('runs')/'mr32', mr_dir)

@pytest.fixture(scope='module')
def train(run): return training_slices(training_record(run), progress=False)

class Replayer(nn.Module):
    "A generator that memorised its data: each seed's image is a training slice, moved by a pixel and mirrored"
    def __init__(self, slices):
        super().__init__()
        self.register_buffer('slices', slices)
        self.anchor = nn.Parameter(torch.zeros(()))  # where the model lives, for the latent tools
        self.z_dim,self.size,self.n_channels,self.config = 100,slices.shape[-1],slices.shape[1],{'arch': 'replayer'}

    def slice_of(self, z): return (z[:, 0].abs() * 1e4).long() % len(self.slices)
    def forward(self, z): return torch.roll(self.slices[self.slice_of(z)], 1, -1).flip(-1)

def _run(args, check=True):
    r = subprocess.run([MEDGAN] + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    if check and r.returncode: raise AssertionError(f'{args} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}')
    return r

def test_training_slices_are_the_runs(run, train, mr_dir):
    rec = training_record(run)
    assert rec['source'] == str(mr_dir) and rec['size'] == 32 and rec['run'] == run
    assert train.images.shape[1:] == (1, 32, 32) and 100 < len(train.images) <= 140 and train.images.min() >= -1
    assert train.groups is not None and len(set(train.groups)) > 1  # the threshold is calibrated on held-out series

def test_replayed_training_slices_are_all_withheld(run, train, monkeypatch, tmp_path):
    "A generator that replays its training slices has no image written; audit.json names each one and the slice it copies"
    rep = Replayer(train.images)
    monkeypatch.setattr(latent, 'generate', lambda G, seeds, **kw: rep(latent.seed_latents(rep, seeds)))
    out = tmp_path/'out'
    with pytest.raises(SystemExit) as e: main(['generate', str(run), '-n', '4', '--out', str(out)])
    assert 'only 0 of 4 images passed the privacy filter' in str(e.value.code)
    audit = json.loads((out/'audit.json').read_text())
    assert (audit['privacy_filter'], audit['requested'], audit['written']) == ('on', 4, 0)
    assert [r['seed'] for r in audit['images']] == list(range(16))  # 4 asked for, then 3 spare seeds per image
    assert not any(r['kept'] for r in audit['images']) and all(r['similarity'] > r['threshold'] for r in audit['images'])
    copied = rep.slice_of(latent.seed_latents(rep, list(range(16)))).tolist()
    assert [r['nearest_slice'] for r in audit['images']] == [int(train.rows[i]) for i in copied]
    assert not list(out.glob('seed_*')) and (out/'audit'/'closest_pairs.png').exists()
    assert audit['threshold'] == pytest.approx(audit['images'][0]['threshold'], abs=1e-4) and 'groups' in audit['rule']

def test_near_copies_are_replaced_by_the_next_seeds(run, train, monkeypatch, tmp_path):
    "Seeds 0 and 1 replay training slices: their places go to seeds 4 and 5, so -n 4 still writes 4 DICOM files"
    rep,real = Replayer(train.images),latent.generate
    def generate(G, seeds, **kw): return torch.cat([rep(latent.seed_latents(rep, [s])) if s < 2 else real(G, [s], **kw) for s in seeds])
    monkeypatch.setattr(latent, 'generate', generate)
    main(['generate', str(run), '-n', '4', '--out', str(tmp_path), '--format', 'dicom'])
    audit = json.loads((tmp_path/'audit.json').read_text())
    assert [(r['seed'], r['kept'], r.get('replaced_by')) for r in audit['images']] == [
        (0, False, 4), (1, False, 5), (2, True, None), (3, True, None), (4, True, None), (5, True, None)]
    # in slot order: seed 4 takes the first place, seed 5 the second
    assert {r['seed']: r['file'] for r in audit['images'] if r['kept']} == {4: 'IM0001.dcm', 5: 'IM0002.dcm', 2: 'IM0003.dcm', 3: 'IM0004.dcm'}
    got = np.stack([pydicom.dcmread(f).pixel_array / 65535 for f in sorted(tmp_path.glob('*.dcm'))])
    want = ((real(load_generator(run, 'cpu'), [4, 5, 2, 3]).clamp(-1, 1) + 1) / 2)[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)  # each file holds its seed's own image

def test_a_generators_own_images_pass_with_their_audit(run, tmp_path):
    r = _run(['generate', run, '-n', '8', '--out', tmp_path/'a'])
    assert 'privacy filter on: 0 of 8 images withheld' in r.stdout
    audit = json.loads((tmp_path/'a'/'audit.json').read_text())
    assert audit['written'] == 8 and all(r['kept'] and r['similarity'] < r['threshold'] for r in audit['images'])
    assert sorted(p.name for p in (tmp_path/'a').glob('seed_*.png')) == [r['file'] for r in audit['images']]
    # the calibration is kept beside the decode-once cache and read, not redone, by the next command
    kept = PrivacyFilter.from_model(run).calibration_file
    assert json.loads(kept.read_text())['calibration'] == 'groups'
    before = kept.stat().st_mtime_ns
    main(['generate', str(run), '-n', '2', '--out', str(tmp_path/'b')])
    assert kept.stat().st_mtime_ns == before and len(list((tmp_path/'b').glob('seed_*.png'))) == 2
    assert not (run/'privacy.json').exists()  # nothing is added to the run folder

def test_missing_training_data_stops_unless_the_filter_is_off(cache, tmp_path):
    run = make_run(tmp_path/'run', tmp_path/'scans')  # the scans were trained on, then deleted
    r = _run(['generate', run, '-n', '3', '--out', tmp_path/'out'], check=False)
    assert r.returncode == 1 and not (tmp_path/'out').exists()
    assert len(r.stderr.strip().splitlines()) == 1 and 'training data is not there' in r.stderr and '--no-privacy-filter' in r.stderr
    r = _run(['generate', run, '-n', '3', '--out', tmp_path/'out', '--no-privacy-filter'])
    assert 'privacy filter off' in r.stdout and len(list((tmp_path/'out').glob('seed_*.png'))) == 3
    audit = json.loads((tmp_path/'out'/'audit.json').read_text())
    assert audit['privacy_filter'] == 'off' and audit['status'].startswith('privacy filter off') and audit['written'] == 3

def test_a_model_without_a_record_of_its_data_says_the_filter_is_off(tmp_path, capsys):
    model = save_generator(DCGANGenerator(32, z_dim=8, ngf=4), tmp_path/'generator.pth', window='brain')
    main(['generate', str(model), '-n', '2', '--out', str(tmp_path/'out')])
    assert 'privacy filter off (the model records no training data' in capsys.readouterr().out
    assert json.loads((tmp_path/'out'/'audit.json').read_text())['privacy_filter'] == 'off'

# --- the app ----------------------------------------------------------------------------------------------------

def test_app_crosses_out_near_copies_and_refuses_their_downloads(mr_dir, train, cache, tmp_path):
    from medgan_fastai.app import GeneratorApp
    info = dict(source=str(mr_dir), size=32, window='auto', skip_blank=True)
    rep = Replayer(train.images)
    rep.info = info
    app = GeneratorApp(rep, 'cpu', n_directions=0, out_dir=tmp_path/'copier')
    note = app.privacy_note(5)
    assert note.startswith('**near-copy of a training slice**') and 'similarity 0.9' in note
    shown = np.asarray(app.image(5), np.float64)
    raw = np.round(((app.images(5)[0, 0].clamp(-1, 1) + 1) / 2 * 255).numpy())
    assert (shown != raw).mean() > 0.05 and (shown[np.eye(32, dtype=bool)] == 255).all()  # crossed out, in the pixels
    with pytest.raises(ValueError, match='privacy filter refuses'): app.export(5)
    with pytest.raises(ValueError, match='privacy filter refuses'): app.animation(5, 6, 3)
    assert '4 near-copies' in app.grid_note(0, 4)
    assert not list((tmp_path/'copier').rglob('*.dcm'))
    torch.manual_seed(0)
    fresh = DCGANGenerator(32, z_dim=100, ngf=8)
    fresh.info = info
    ok = GeneratorApp(fresh, 'cpu', out_dir=tmp_path/'fresh')
    assert ok.privacy_note(5).startswith('privacy filter: passes') and 'no near-copy' in ok.grid_note(0, 4)
    assert np.array_equal(np.asarray(ok.image(5), np.float64), np.round(((ok.images(5)[0, 0].clamp(-1, 1) + 1) / 2 * 255).numpy()))
    assert all(Path(f).exists() for f in ok.export(5))

def test_app_needs_the_training_data_it_records(tmp_path):
    from medgan_fastai.app import GeneratorApp, build_app
    model = save_generator(DCGANGenerator(32, z_dim=8, ngf=4), tmp_path/'generator.pth', source=str(tmp_path/'gone'), window='auto')
    with pytest.raises(TrainingDataError, match='training data is not there'): GeneratorApp(model, 'cpu', out_dir=tmp_path/'x')
    app = GeneratorApp(model, 'cpu', out_dir=tmp_path/'x', privacy_filter=False)
    assert app.privacy_note(0) == 'privacy filter off: turned off' and app.export(0)
    ids = {getattr(b, 'elem_id', None) for b in build_app(app).blocks.values()}
    assert {'privacy', 'grid-privacy'} <= ids

def test_nifti_training_slices_are_cut_as_the_model_records(shared_data, cache, tmp_path):
    "A model trained on NIfTI records its `volume` options: the filter rebuilds the same slices (sagittal here, not the default axial)"
    from medgan_fastai.data import gan_dls
    nii = shared_data/'nifti'/'mr-t1-sag_HFS.nii.gz'  # 35 sagittal slices of 256x256: 256 axial ones
    def model(folder, **info):
        folder.mkdir()
        torch.manual_seed(0)
        save_generator(DCGANGenerator(32, z_dim=100, ngf=8), folder/'generator.pth', window='auto', size=32, skip_blank=True, **info)
        return folder
    sag, ax = model(tmp_path/'sag', source=str(nii), volume=dict(axis='sagittal')), model(tmp_path/'ax', source=str(nii))
    rec = training_record(sag)
    assert rec['volume'] == {'axis': 'sagittal'} and training_record(ax)['volume'] is None
    s, a = training_slices(rec, progress=False), training_slices(training_record(ax), progress=False)
    dls = gan_dls(nii, size=32, window='auto', skip_blank=True, volume=dict(axis='sagittal'), bs=8, verbose=False)
    assert len(s.images) == len(dls.train_ds) + len(dls.valid_ds) and 20 <= len(s.images) <= 35 and len(a.images) > 100
    assert len(PrivacyFilter.from_model(sag).train) == len(s.images)
    # a model that records its options but not its data: the source given, the options its own
    moved = model(tmp_path/'moved', volume=dict(axis='sagittal'))
    assert training_record(moved) is None and len(PrivacyFilter.from_model(moved, source=nii).train) == len(s.images)

def test_a_nifti_run_folder_is_sliced_as_its_recipe_says(shared_data, cache, tmp_path):
    "A run folder's config.json holds the recipe's NIfTI options (--axis ...): the filter slices the volumes the same way"
    from medgan_fastai.run import Recipe
    nii = shared_data/'nifti'/'mr-t1-sag_HFS.nii.gz'
    run = tmp_path/'sag'
    run.mkdir()
    Recipe(source=str(nii), size=32, axis='sagittal').resolved().to_json(run/'config.json')
    save_generator(DCGANGenerator(32, z_dim=100, ngf=8), run/'generator.pth', source=str(nii), window='auto', size=32, skip_blank=True)
    rec = training_record(run)
    assert rec['volume']['axis'] == 'sagittal' and 20 <= len(training_slices(rec, progress=False).images) <= 35
