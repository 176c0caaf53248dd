"Every kind of DICOM file the project writes passes dicom3tools' `dciodvfy` with no errors, and `dcm2niix` reads a synthetic series."
import os, shutil, subprocess
from pathlib import Path
import numpy as np, pytest, pydicom
from medgan_fastai.convert import write_dicom_series, write_synthetic_dicom
from medgan_fastai.data import demo_series

def tool(name):
    "Path of a validator: skipped where it is missing, failed in CI (`make pytest` installs it)"
    path = shutil.which(name)
    if path: return path
    why = f'{name} not found: `make validators` installs it (Debian packages dicom3tools and dcm2niix, as root)'
    if os.environ.get('CI'): pytest.fail(why)
    pytest.skip(why)

def dciodvfy(path)->tuple:
    "dciodvfy's error lines and all its lines for one file (it reports on stderr; warnings are allowed)"
    r = subprocess.run([tool('dciodvfy'), str(path)], capture_output=True, text=True, timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    return [l for l in lines if l.startswith('Error')], lines

def assert_valid(paths):
    for p in paths:
        errors,lines = dciodvfy(p)
        assert not errors, f'{p.name}:\n' + '\n'.join(lines)
        assert lines and lines[0] in ('SCImage', 'CTImage', 'MRImage'), lines  # dciodvfy recognised the IOD

rng = np.random.default_rng(0)
WRITERS = {  # the files `medgan generate --format dicom`, the app's download and other callers write
    'ot_unit_series': lambda d: write_dicom_series(list(rng.random((3, 40, 48))), d, modality='OT', units='unit', synthetic=True,
                                                   series_description='medgan_fastai synthetic (dcgan)'),
    'ct_hu_series': lambda d: write_dicom_series(np.round(rng.uniform(-1024, 2000, (3, 16, 16))), d, modality='CT', units='modality'),
    # `medgan generate --format dicom --units hu`: a CT-window model's [0, 1] output stored as HU over its window
    'ct_window_hu_series': lambda d: write_dicom_series(rng.random((3, 16, 16)), d, modality='CT', units='hu', window=(40, 80),
                                                        synthetic=True, series_description='medgan_fastai synthetic (style)'),
    'mr_sagittal_series': lambda d: write_dicom_series(rng.random((2, 24, 24)), d, modality='MR', orientation=(0, 1, 0, 0, 0, -1)),
    'derived_mr_series': lambda d: write_dicom_series(rng.uniform(0, 7.3, (2, 8, 8)), d, modality='MR', units='modality',
                                                      synthetic=False, series_description='a resampled template'),
    'single_file': lambda d: [write_synthetic_dicom(rng.random((32, 32)), d/'one.dcm', series_description='seed 3 psi 0.7',
                                                    window=(0.5 * 65535, 0.8 * 65535))],
}

@pytest.mark.parametrize('kind', list(WRITERS))
def test_written_dicom_passes_dciodvfy(kind, tmp_path):
    tool('dciodvfy')
    paths = WRITERS[kind](tmp_path)
    assert_valid(paths)
    ds = pydicom.dcmread(paths[0])  # valid, and still marked as what it is
    assert ds.ImageType[0] == 'DERIVED' and ds.PatientIdentityRemoved == 'YES'
    if kind != 'derived_mr_series': assert ds.SeriesDescription.startswith('SYNTHETIC') and 'SYNTHETIC' in ds.ImageComments

def test_demo_series_passes_dciodvfy(tmp_path, monkeypatch):
    tool('dciodvfy')
    monkeypatch.setenv('MEDGAN_CACHE', str(tmp_path/'cache'))  # a fresh demo series, written by this version
    files = sorted(demo_series().glob('*.dcm'))
    assert str(files[0]).startswith(str(tmp_path)) and len(files) > 100
    assert_valid([files[0], files[len(files) // 2], files[-1]])

def test_demo_series_written_by_an_older_version_is_written_again(tmp_path):
    folder = tmp_path/'demo'
    folder.mkdir(); (folder/'IM0001.dcm').write_bytes(b'old'); (folder/'.complete').write_text('mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz\n')
    assert demo_series(folder, step=60) == folder
    assert len(list(folder.glob('*.dcm'))) == 4 and pydicom.dcmread(folder/'IM0001.dcm').BodyPartExamined == 'BRAIN'

@pytest.mark.parametrize('kind', ['ot_unit_series', 'ct_hu_series', 'ct_window_hu_series'])
def test_dcm2niix_reads_a_synthetic_series(kind, tmp_path):
    import nibabel as nib
    exe = tool('dcm2niix')
    paths = WRITERS[kind](tmp_path/'dicom')
    (tmp_path/'nii').mkdir()
    r = subprocess.run([exe, '-z', 'n', '-o', str(tmp_path/'nii'), str(tmp_path/'dicom')], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    niis = sorted((tmp_path/'nii').glob('*.nii*'))
    assert len(niis) == 1, out  # one series, one volume
    img = nib.load(niis[0])
    ds = pydicom.dcmread(paths[0])
    assert img.shape[:3] == (ds.Columns, ds.Rows, len(paths)), out
    if kind in ('ct_hu_series', 'ct_window_hu_series'):  # HU survive, whatever way the volume is flipped
        from pydicom.pixels import apply_modality_lut
        hu = np.stack([apply_modality_lut(d.pixel_array, d) for d in map(pydicom.dcmread, paths)]).astype(float)
        np.testing.assert_allclose(np.sort(img.get_fdata().ravel()), np.sort(hu.ravel()), rtol=1e-5, atol=1e-3)
        if kind == 'ct_window_hu_series': assert ds.Modality == 'CT' and ds.RescaleType == 'HU' and 0 <= hu.min() and hu.max() <= 79
