"DICOM -> PNG/JPG conversion with a report, the `medgan convert` command, and the synthetic DICOM writer."
import os, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from medgan_fastai.dicom import *
from medgan_fastai.series import *
from medgan_fastai.convert import *
from medgan_fastai.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_dicom import truncated_copies, _all_package_files

def test_convert_shared_data_png(shared_data, tmp_path):
    rep = convert_folder(shared_data, tmp_path, size=64, progress=False)
    dicom, nifti = rep[~rep.file.str.contains(r'\.nii')], rep[rep.file.str.contains(r'\.nii')]  # nifti/: the same scans as volumes
    assert dicom.ok.sum() == 168 and set(dicom.reason[~dicom.ok].str[:16]) == {'not a DICOM file'}
    assert nifti.ok.all() and nifti.file.nunique() == 4 and not rep.file.str.endswith('.json').any()
    assert 'patient' not in rep.columns
    csv = pd.read_csv(tmp_path/'report.csv')
    assert len(csv) == len(rep) and list(csv.columns) == list(rep.columns)
    outs = sorted(tmp_path.glob('*.png'))
    assert len(outs) == rep.ok.sum() and {o.name for o in outs} == set(rep.output[rep.ok])
    im = Image.open(tmp_path/'ct-head_14.png')
    assert im.mode == 'L' and im.size == (64, 64)
    assert (tmp_path/'mr-t1-sag_HFS_0001_1.3.12.2.1107.5.2.43.67060.2022040715053454597060816.png').exists()

def test_png16_jpg_and_tree(ct_dir, tmp_path):
    files = sorted(ct_dir.glob('*.dcm'))[:3]
    rep = convert_folder(files, tmp_path/'p16', bits=16, window='brain', progress=False)
    back = np.asarray(Image.open(tmp_path/'p16'/rep.output[0])).astype(np.float64) / 65535
    np.testing.assert_allclose(back, dicom_slice(rep.file[0], window='brain'), atol=0.5/65535 + 1e-7)
    rep = convert_folder(ct_dir.parent, tmp_path/'jpg', fmt='jpg', window=(40, 80), size=(32, 48), keep_tree=True, progress=False)
    assert (tmp_path/'jpg'/'ct-head'/'01.jpg').exists() and (tmp_path/'jpg'/'mr-t1-sag'/'HFS').is_dir()
    assert Image.open(tmp_path/'jpg'/'ct-head'/'01.jpg').size == (48, 32)
    with pytest.raises(ValueError, match='16'): convert_folder(files, tmp_path/'x', fmt='jpg', bits=16, progress=False)
    with pytest.raises(ValueError, match='unknown window'): convert_folder(files, tmp_path/'x', window='brian', progress=False)

def test_never_overwrites_unless_asked(ct_dir, tmp_path):
    files = sorted(ct_dir.glob('*.dcm'))[:2]
    convert_folder(files, tmp_path, window='brain', progress=False)
    out = tmp_path/'01.png'
    before = out.read_bytes()
    rep = convert_folder(files, tmp_path, window='bone', progress=False)
    assert not rep.ok.any() and rep.reason.str.startswith('output exists').all() and out.read_bytes() == before
    rep = convert_folder(files, tmp_path, window='bone', overwrite=True, progress=False)
    assert rep.ok.all() and out.read_bytes() != before
    names = sorted(p.name for p in tmp_path.iterdir())   # no temporary files left; the second run's report kept beside the first
    assert names[:3] == ['01.png', '02.png', 'report.csv'] and len(names) == 4 and names[3].startswith('report_2')

def test_skip_blank(mr_dir, tmp_path):
    rep = convert_folder(mr_dir/'HFS', tmp_path, skip_blank=True, progress=False)
    blank = rep.reason.str.startswith('blank')
    assert blank.sum() >= 1 and rep.ok.sum() == 35 - blank.sum() and len(list(tmp_path.glob('*.png'))) == rep.ok.sum()

def test_convert_every_package_file_and_truncated_never_crashes(tmp_path):
    (tmp_path/'cut').mkdir()
    trunc = truncated_copies(tmp_path/'cut')
    rep = convert_folder([*_all_package_files(), *map(str, trunc)], tmp_path/'out', size=32, progress=False)
    assert ((rep.output != '') == rep.ok).all() and (rep.reason[~rep.ok] != '').all()
    assert rep.ok.sum() > 250 and len(list((tmp_path/'out').glob('*.png'))) == rep.ok.sum()
    assert rep.reason[rep.file.str.endswith('JPEG-lossy.dcm')].iloc[0].startswith('pixel data cannot be decoded')

def test_cli_convert_exit_codes(ct_dir, tmp_path, capsys):
    assert main(['convert', str(ct_dir), str(tmp_path/'a'), '--window', '40,80', '--size', '32']) is None
    out = capsys.readouterr().out
    assert 'converted 28 of 29 input slices' in out and len(list((tmp_path/'a').glob('*.png'))) == 28
    with pytest.raises(SystemExit) as e: main(['convert', str(ct_dir/'LICENSE'), str(tmp_path/'b')])
    assert 'no image was converted' in str(e.value.code)

IDENTITY = ('PatientName', 'PatientID', 'PatientBirthDate', 'StudyInstanceUID', 'SeriesInstanceUID', 'FrameOfReferenceUID',
            'AccessionNumber', 'InstitutionName', 'ReferringPhysicianName', 'StudyID', 'StationName', 'DeviceSerialNumber')

def test_synthetic_series_round_trip_and_markers(ct_dir, tmp_path):
    template = pydicom.dcmread(sorted(ct_dir.glob('*.dcm'))[0])
    imgs = np.random.default_rng(0).random((4, 40, 48))
    paths = write_dicom_series(imgs, tmp_path, modality='CT', template=template, pixel_spacing=(0.5, 0.7), slice_thickness=2.5)
    with pydicom.config.strict_reading():
        dss = [pydicom.dcmread(p) for p in paths]
    back = np.stack([load_dicom(ds) for ds in dss]).astype(np.float64) / 65535
    np.testing.assert_allclose(back, imgs, atol=0.5/65535 + 1e-9)
    for k in ('StudyInstanceUID', 'SeriesInstanceUID', 'FrameOfReferenceUID'): assert len({ds[k].value for ds in dss}) == 1
    assert len({ds.SOPInstanceUID for ds in dss}) == 4 and [ds.InstanceNumber for ds in dss] == [1, 2, 3, 4]
    ds = dss[0]
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and list(ds.ImageType) == ['DERIVED', 'SECONDARY', 'AXIAL']
    assert 'SYNTHETIC' in ds.SeriesDescription and 'SYNTHETIC' in ds.ImageComments and ds.PatientIdentityRemoved == 'YES'
    assert ds.BurnedInAnnotation == 'NO' and ds.Rows == 40 and ds.Columns == 48 and [float(v) for v in ds.PixelSpacing] == [0.5, 0.7]
    for k in IDENTITY:
        if k in template and str(template[k].value): assert str(ds.get(k, '')) != str(template[k].value), k
    text = ' '.join(str(e.value) for e in ds.iterall() if e.VR not in ('OB', 'OW'))
    assert str(template.PatientName) not in text and template.PatientID not in text
    idx = scan(tmp_path, progress=False)
    assert idx.ok.all() and idx.series_uid.nunique() == 1 and np.allclose(np.diff(idx.position), 2.5)
    assert idx.file.tolist() == [str(p) for p in paths]
    with pytest.raises(FileExistsError): write_dicom_series(imgs, tmp_path, modality='CT')
    write_dicom_series(imgs[:1], tmp_path, overwrite=True)

def test_modality_units_and_derived_series(tmp_path):
    hu = np.round(np.random.default_rng(1).uniform(-1024, 3000, (3, 16, 16)))
    paths = write_dicom_series(hu, tmp_path/'hu', modality='CT', units='modality', positions=[10, 12.5, 20])
    np.testing.assert_array_equal(np.stack([load_dicom(p) for p in paths]), hu)
    assert [float(pydicom.dcmread(p).SliceLocation) for p in paths] == [10, 12.5, 20]
    t1 = np.random.default_rng(2).uniform(0, 7.3, (2, 8, 8))  # float modality values: fitted rescale
    paths = write_dicom_series(t1, tmp_path/'t1', modality='MR', units='modality', synthetic=False,
                               series_description='MNI152 T1 template, resampled')
    ds = pydicom.dcmread(paths[0])
    slope = float(ds.RescaleSlope)
    np.testing.assert_allclose(np.stack([load_dicom(p) for p in paths]), t1, atol=slope / 2 + 1e-6)
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and list(ds.ImageType) == ['DERIVED', 'SECONDARY', 'OTHER']
    assert 'SYNTHETIC' not in ds.SeriesDescription and 'MNI152' in ds.SeriesDescription and 'SYNTHETIC' not in ds.ImageComments
    ot = write_synthetic_dicom(np.full((8, 8), 0.25), tmp_path/'one.dcm')
    ds = pydicom.dcmread(ot)
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and ds.ConversionType == 'SYN'
    assert np.allclose(load_dicom(ot), round(0.25 * 65535))
    with pytest.raises(FileExistsError): write_synthetic_dicom(np.zeros((8, 8)), ot)

def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os, stat
    from medgan_fastai.persist import write_atomic
    um = os.umask(0o022); os.umask(um)
    out = tmp_path/'a.txt'
    assert write_atomic(out, lambda p: open(p, 'w').write('x'))
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~um


def test_a_rerun_that_converts_nothing_keeps_the_first_report(tmp_path):
    "`medgan convert` run again without --overwrite replaced report.csv with one that says every output exists"
    src = Path(get_testdata_file('CT_small.dcm'))
    first = convert_folder(src, tmp_path, size=32, progress=False)
    kept = (tmp_path/'report.csv').read_bytes()
    again = convert_folder(src, tmp_path, size=32, progress=False)
    assert first.ok.all() and not again.ok.any()
    assert (tmp_path/'report.csv').read_bytes() == kept
    assert again.attrs['path'] != tmp_path/'report.csv' and again.attrs['path'].name.startswith('report_')

def test_convert_of_an_empty_folder_says_so(tmp_path):
    (tmp_path/'empty').mkdir()
    with pytest.raises(SourceError, match='no files found'): convert_folder(tmp_path/'empty', tmp_path/'out', progress=False)
    assert not (tmp_path/'out'/'report.csv').exists()

# NIfTI volumes (issue #17): converted a volume at a time, one report row per slice
from medgan_fastai.volumes import volume_slices, VolumeOptions

def _png(path): return np.asarray(Image.open(path), dtype=np.float32)

def test_nifti_mr_sagittal_pngs_are_the_volume_slices_resized(shared_data, tmp_path):
    nii = shared_data/'nifti'/'mr-t1-sag_HFS.nii.gz'
    rep = convert_folder(nii, tmp_path, size=64, bits=16, volume=dict(axis='sagittal'), progress=False)
    ref = list(volume_slices(nii, 'auto', VolumeOptions(axis='sagittal')))
    assert len(rep) == len(ref) == 35 and rep.ok.all() and list(rep.frame) == list(range(35))
    assert list(rep.output) == [f'mr-t1-sag_HFS_sagittal_s{k:04d}.png' for k in range(35)]
    assert (rep.axis == 'sagittal').all() and (rep.nonfinite == 0).all() and rep.position.is_monotonic_increasing
    for r, o in zip(ref, rep.output):
        x = _png(tmp_path/o) / 65535
        assert x.shape == (64, 64) and np.abs(x - resize_slice(r['image'], 64)).max() <= 1 / 65535 + 1e-6
    assert pd.read_csv(rep.attrs['path']).window_used.nunique() == 1  # one window for the whole volume

def test_nifti_ct_axial_brain_window(shared_data, tmp_path):
    nii = shared_data/'nifti'/'ct-head.nii.gz'
    rep = convert_folder(nii, tmp_path, size=128, window='brain', progress=False)  # axial is the default plane
    ref = list(volume_slices(nii, 'brain'))
    assert len(rep) == len(ref) == 28 and rep.ok.all() and (rep.modality == 'CT').all() and (rep.window_used == 'C40/W80').all()
    for r, o in zip(ref, rep.output):
        assert o.startswith('ct-head_axial_s') and np.abs(_png(tmp_path/o) / 255 - resize_slice(r['image'], 128)).max() <= 0.5 / 255 + 1e-6
    mid = _png(tmp_path/rep.output[14]) / 255
    assert mid[:4, :4].max() == 0  # air, as the DICOM path gives it
    centre = mid[48:80, 48:80]
    assert 0.2 < np.median(centre) < 0.8  # brain is mid-grey in the brain window

def test_a_folder_of_good_and_bad_volumes_and_dicom(shared_data, ct_dir, tmp_path):
    import shutil
    src = tmp_path/'src'; src.mkdir()
    nii = shared_data/'nifti'/'mr-t1-sag_HFS.nii.gz'
    shutil.copy(nii, src); shutil.copy(nii.with_suffix('').with_suffix('.json'), src)
    (src/'truncated.nii.gz').write_bytes(nii.read_bytes()[:len(nii.read_bytes()) // 2])
    dcm = sorted(ct_dir.glob('*.dcm'))[0] if list(ct_dir.glob('*.dcm')) else sorted(p for p in ct_dir.iterdir() if p.name != 'LICENSE')[0]
    shutil.copy(dcm, src/'ct.dcm')
    rep = convert_folder(src, tmp_path/'out', size=32, volume=dict(axis='sagittal'), progress=False, n_workers=2)
    assert rep.ok.sum() == 36 and len(list((tmp_path/'out').glob('*.png'))) == 36  # 35 MR slices and the CT slice
    bad = rep[rep.file.str.endswith('truncated.nii.gz')]
    assert len(bad) == 1 and not bad.ok.iloc[0] and 'truncated or corrupt' in bad.reason.iloc[0]
    assert not rep.file.str.endswith('.json').any()  # the sidecar belongs to its volume
    assert 'truncated.nii.gz' in (tmp_path/'out'/'report.csv').read_text()
    # a second run without overwrite writes nothing and says so for every slice
    again = convert_folder(src, tmp_path/'out', size=32, volume=dict(axis='sagittal'), progress=False, n_workers=0)
    assert again.ok.sum() == 0 and (again.reason == 'output exists (pass overwrite=True to replace it)').sum() == 36

def test_4d_volumes_and_name_clashes(tmp_path):
    import nibabel as nib
    rng = np.random.default_rng(0)
    src = tmp_path/'src'; src.mkdir()
    data = rng.uniform(0, 100, (12, 10, 3, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1., 1., 2., 1.])), src/'a.nii.gz')
    nib.save(nib.Nifti1Image(data[..., 0], np.eye(4)), src/'a.nii')  # same stem: its names must not collide
    rep = convert_folder(src, tmp_path/'out', volume=dict(volume='all'), progress=False, n_workers=0)
    assert rep.ok.all() and len(rep) == 3 * 2 + 3 and rep.output.is_unique
    assert list(rep[rep.file.str.endswith('.nii')].output) == ['a_axial_s0000.png', 'a_axial_s0001.png', 'a_axial_s0002.png']
    assert {'a_2_axial_t0000_s0000.png', 'a_2_axial_t0001_s0002.png'} <= set(rep.output)  # a.nii.gz comes second: `_2`
    assert list(rep[rep.file.str.endswith('.nii.gz')].frame) == list(range(6))  # slice + t * slices
    one = convert_folder(src/'a.nii.gz', tmp_path/'one', volume=dict(volume=1), progress=False)
    assert list(one.output) == [f'a_axial_t0001_s{k:04d}.png' for k in range(3)]

def test_cli_convert_nifti_flags(shared_data, tmp_path, capsys):
    nii = str(shared_data/'nifti'/'mr-t1-sag_HFS.nii.gz')
    assert main(['convert', nii, str(tmp_path/'a'), '--axis', 'sagittal', '--central-fraction', '0.5', '--percentiles', '1,99',
                 '--modality', 'MR', '--size', '32']) is None
    rep = pd.read_csv(tmp_path/'a'/'report.csv')
    assert 'converted 18 of 18 input slices' in capsys.readouterr().out and list(rep.frame) == list(range(8, 26))  # the central 18 of 35
    default = list(volume_slices(nii, 'auto', VolumeOptions(axis='sagittal')))[0]['window_used']
    assert rep.window_used.iloc[0] != default  # the percentiles were used
    for flags, msg in ((['--axis', 'oblique'], "axis 'oblique'"), (['--nifti-volume', 'x'], "'x'"),
                       (['--percentiles', '5'], "'5'"), (['--central-fraction', '2'], 'central_fraction 2'),
                       (['--percentiles', '90,10'], 'percentiles')):
        with pytest.raises(SystemExit) as e: main(['convert', nii, str(tmp_path/'b'), *flags])
        line = str(e.value.code)  # one line naming the flag and what is wrong with its value
        assert line.startswith(f'medgan convert: {flags[0]}: ') and msg in line and '\n' not in line, line
    assert not (tmp_path/'b').exists()
    with pytest.raises(SystemExit) as e: main(['convert', '--help'])
    assert e.value.code == 0
    helptext = ' '.join(capsys.readouterr().out.split())
    for flag in ('--axis', '--nifti-volume', '--central-fraction', '--percentiles', '--modality'): assert flag in helptext
    assert helptext.count('NIfTI') >= 5

def test_a_conversion_killed_mid_write_is_cleaned_up_by_the_next_one_and_the_users_files_stay(ct_dir, tmp_path, capsys):
    "The kernel kills a conversion while it writes a PNG (a file size limit with SIGXFSZ's default action, as kill -9: no handler runs)"
    import resource, signal, subprocess, time
    dst = tmp_path/'out'; dst.mkdir()
    (dst/'.backup.20241201.png').write_bytes(b'the user\'s'); os.utime(dst/'.backup.20241201.png', (time.time() - 3600,) * 2)
    code = ('import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); from medgan_fastai.convert import convert_folder; '
            'convert_folder(sys.argv[1], sys.argv[2], n_workers=0, progress=False)')
    r = subprocess.run([sys.executable, '-c', code, str(ct_dir), str(dst)], capture_output=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**10, 16 * 2**10)))
    assert r.returncode == -signal.SIGXFSZ
    left = [p for p in dst.iterdir() if p.name.startswith('.') and 'backup' not in p.name]
    assert len(left) == 1 and left[0].stat().st_size > 0           # the half-written PNG
    os.utime(left[0], (time.time() - 3600,) * 2)                   # an hour later
    assert main(['convert', str(ct_dir), str(dst)]) is None        # success
    rep = pd.read_csv(dst/'report.csv')
    assert rep.ok.sum() == len(list(ct_dir.glob('*.dcm')))                                          # every slice, the killed one too
    assert sorted(p.name for p in dst.iterdir()) == sorted(['.backup.20241201.png', 'report.csv', *rep.output[rep.ok]])
    assert (dst/'.backup.20241201.png').read_bytes() == b'the user\'s'
