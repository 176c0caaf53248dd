"Reading, windowing and indexing real DICOM files: ../shared/data, pydicom's test files and pydicom-data."
import subprocess, sys, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, pydicom
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_windowing
from medgan_fastai.dicom import *
from medgan_fastai.series import *

TEST_FILES = Path(get_testdata_file('CT_small.dcm')).parent
DATA_STORE = Path(get_testdata_file('emri_small.dcm')).parent  # the pydicom-data package
def data(name): return get_testdata_file(name)

def test_ct_small_in_hounsfield_units():
    path = data('CT_small.dcm')
    ds = pydicom.dcmread(path)
    hu = load_dicom(path)
    assert hu.dtype == np.float32 and hu.shape == (ds.Rows, ds.Columns)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(hu, expected)

def test_modality_lut_table_matches_pydicom():
    ds = pydicom.dcmread(data('mlut_18.dcm'))
    assert 'ModalityLUTSequence' in ds
    np.testing.assert_array_equal(load_dicom(ds), apply_modality_lut(ds.pixel_array, ds))

def test_window_presets_map_to_unit_range():
    x = np.linspace(-2000, 3000, 1001, dtype=np.float32)
    for name in ('brain', 'subdural', 'stroke', 'bone', 'lung', 'mediastinum', 'abdomen', 'soft_tissue', 'liver'):
        c, w = WINDOWS[name]
        y = window_image(x, c, w)
        assert y.min() == 0 and y.max() == 1, name
        assert abs(float(window_image(np.float32(c), c, w)) - 0.5) < 1 / w + 1e-3, name

@pytest.mark.parametrize('fn', ['LINEAR', 'LINEAR_EXACT', 'SIGMOID'])
def test_fast_window_matches_pydicom(fn):
    x = np.random.default_rng(0).uniform(-3000, 3000, 20000).astype(np.float32)
    for c, w in [(40, 80), (-600, 1500), (0.5, 1), (7, 2), (1000.3, 3.7)]:
        ds = pydicom.Dataset()
        ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = 'MONOCHROME2', 16, 0
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = c, w, fn
        np.testing.assert_allclose(window_image(x, c, w, fn), apply_windowing(x.astype(np.float64), ds) / 65535, atol=1e-5)  # < a 16-bit step

def test_auto_window_spans_percentiles():
    x = np.random.default_rng(1).normal(300, 50, (512, 512)).astype(np.float32)
    y = window_image(x, *auto_window(x))
    assert 0.004 < (y == 0).mean() < 0.007 and 0.004 < (y == 1).mean() < 0.007

def test_resolve_window_forms():
    ds = pydicom.dcmread(data('CT_small.dcm'))
    ds.WindowCenter, ds.WindowWidth = [40, 400], [80, 2000]  # multi-valued: the first is the primary window
    assert resolve_window('file', ds=ds) == (40., 80.)
    assert resolve_window('lung') == (-600., 1500.)
    assert resolve_window((10, 20)) == (10., 20.)
    x = load_dicom(ds)
    del ds.WindowCenter, ds.WindowWidth
    assert resolve_window('file', x, ds) == auto_window(x) == resolve_window(None, x) == resolve_window('auto', x)
    with pytest.raises(ValueError, match='unknown window'): resolve_window('brains')

def test_missing_and_foreign_files_raise_dicom_error(tmp_path):
    with pytest.raises(DicomError, match='file not found'): load_dicom(tmp_path/'nope.dcm')
    bad = tmp_path/'notes.txt'
    bad.write_text('not a dicom file')
    with pytest.raises(DicomError, match='notes.txt: not a DICOM file'): load_dicom(bad)
    for name, reason in [('rtplan.dcm', 'no pixel data'), ('test-SR.dcm', 'no pixel data'), ('waveform_ecg.dcm', 'no pixel data'),
                         ('MR_truncated.dcm', 'truncated pixel data'), ('JPEG-lossy.dcm', 'pixel data cannot be decoded')]:
        with pytest.raises(DicomError, match=reason) as e: load_dicom(data(name))
        assert name in str(e.value)
    with pytest.raises(DicomError, match='no pixel data .a DICOMDIR'): load_dicom(TEST_FILES/'dicomdirtests'/'DICOMDIR')

def test_missing_decoder_is_named():
    "In an environment without the pylibjpeg plugins, JPEG-LS is refused with the transfer syntax named"
    code = ("import sys\nfor m in ('pylibjpeg', 'libjpeg'): sys.modules[m] = None\n"
            "from medgan_fastai.dicom import load_dicom, DicomError\n"
            f"try: load_dicom({data('MR_small_jpeg_ls_lossless.dcm')!r})\nexcept DicomError as e: print(e.reason)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert 'transfer syntax 1.2.840.10008.1.2.4.80 needs a decoder that is not installed' in out.stdout, out.stderr[-2000:]

def test_colour_to_luminance_or_rejected():
    rgb = pydicom.dcmread(data('SC_rgb.dcm')).pixel_array.astype(np.float64)
    np.testing.assert_allclose(load_dicom(data('SC_rgb.dcm')), rgb @ [0.299, 0.587, 0.114], atol=1e-3)
    pal = load_dicom(data('OBXXXX1A.dcm'))
    assert pal.shape == (600, 800) and pal.max() > 0
    for f in ('SC_rgb.dcm', 'OBXXXX1A.dcm', 'US1_J2KR.dcm', 'SC_ybr_full_uncompressed.dcm'):
        with pytest.raises(DicomError, match='colour image'): load_dicom(data(f), color='reject')

LOSSLESS_TWINS = [  # (reference, twin): same pixels after decoding
    ('MR_small.dcm', ['MR_small_RLE.dcm', 'MR_small_bigendian.dcm', 'MR_small_expb.dcm', 'MR_small_implicit.dcm',
                      'MR_small_jp2klossless.dcm', 'MR_small_jpeg_ls_lossless.dcm']),           # signed 16-bit MR
    ('693_UNCR.dcm', ['693_J2KR.dcm']),                                                           # signed CT with rescale
    ('MR2_UNCR.dcm', ['MR2_J2KR.dcm']),                                                           # 12-bit MR
    ('RG3_UNCR.dcm', ['RG3_J2KR.dcm']),                                                           # MONOCHROME1 CR
    ('US1_UNCR.dcm', ['US1_J2KR.dcm']),                                                           # RGB vs YBR_RCT J2K
    ('OBXXXX1A.dcm', ['OBXXXX1A_rle.dcm', 'OBXXXX1A_expb.dcm']),                                  # palette colour, big endian LUT
    ('gdcm-US-ALOKA-16.dcm', ['gdcm-US-ALOKA-16_big.dcm']),                                       # segmented 16-bit palette
    ('SC_rgb.dcm', ['SC_rgb_rle.dcm', 'SC_rgb_expb.dcm', 'SC_rgb_jpeg_gdcm.dcm', 'SC_rgb_gdcm_KY.dcm']),  # JPEG lossless, J2K
    ('liver_1frame.dcm', ['liver_expb_1frame.dcm']),                                              # 1-bit segmentation
    ('JPEG2000_UNC.dcm', ['JPEG2000.dcm']),                                                       # NM, J2K
    ('rtdose_1frame.dcm', ['rtdose_rle_1frame.dcm', 'rtdose_expb_1frame.dcm']),                   # 32-bit
]

@pytest.mark.parametrize('ref,twins', LOSSLESS_TWINS, ids=[r for r, _ in LOSSLESS_TWINS])
def test_lossless_twins_decode_identically(ref, twins):
    a = load_dicom(data(ref))
    for t in twins: np.testing.assert_array_equal(load_dicom(data(t)), a, err_msg=t)

def test_multiframe_twins_every_frame():
    ref = 'emri_small.dcm'
    for t in ['emri_small_RLE.dcm', 'emri_small_big_endian.dcm', 'emri_small_jpeg_2k_lossless.dcm', 'emri_small_jpeg_ls_lossless.dcm']:
        for i in range(10): np.testing.assert_array_equal(load_dicom(data(t), i), load_dicom(data(ref), i), err_msg=f'{t} frame {i}')
    assert not np.array_equal(load_dicom(data(ref), 0), load_dicom(data(ref), 9))
    with pytest.raises(DicomError, match='frame 10 out of range'): load_dicom(data(ref), 10)

# lossy: the mean absolute error stays under 1.5% of the image's range (693_J2KI is compressed hardest: 1.4%)
LOSSY_TWINS = [('693_UNCR.dcm', '693_J2KI.dcm'), ('MR2_UNCR.dcm', 'MR2_J2KI.dcm'), ('RG3_UNCR.dcm', 'RG3_J2KI.dcm'),
               ('US1_UNCR.dcm', 'US1_J2KI.dcm'), ('SC_rgb.dcm', 'SC_rgb_dcmtk_+eb+cr.dcm'), ('SC_rgb.dcm', 'SC_rgb_jls_lossy_line.dcm'),
               ('SC_rgb.dcm', 'SC_rgb_jpeg_dcmtk.dcm')]

@pytest.mark.parametrize('ref,lossy', LOSSY_TWINS)
def test_lossy_twins_close(ref, lossy):
    a, b = load_dicom(data(ref)), load_dicom(data(lossy))
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 0.015 * (a.max() - a.min())

def test_enhanced_multiframe_per_frame_rescale():
    ds = pydicom.dcmread(data('eCT_Supplemental.dcm'))
    raw = ds.pixel_array
    own = pydicom.Dataset()
    own.RescaleSlope, own.RescaleIntercept, own.RescaleType = 1, -500, 'US'
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = [own]
    np.testing.assert_array_equal(load_dicom(ds, 0), raw[0].astype(np.float32) - 1024)  # shared group's intercept
    np.testing.assert_array_equal(load_dicom(ds, 1), raw[1].astype(np.float32) - 500)   # this frame's own
    assert resolve_window('file', ds=ds) == (49., 102.)  # Frame VOI LUT

def test_monochrome1_is_inverted_for_display():
    for f in ('RG3_UNCR.dcm', str(TEST_FILES/'dicomdirtests/77654033/CR1/6154')):
        x = load_dicom(get_testdata_file(f) if not f.startswith('/') else f)
        for w in ['auto', (float(np.median(x)), float(x.max() - x.min() + 1))]:
            c, wd = resolve_window(w, x)
            np.testing.assert_allclose(dicom_slice(f if f.startswith('/') else data(f), window=w), 1 - window_image(x, c, wd), atol=1e-6)

def test_dicom_slice_resizes_by_area():
    path = data('CT_small.dcm')
    full = dicom_slice(path, window='abdomen')
    small = dicom_slice(pydicom.dcmread(path), window='abdomen', size=32)
    np.testing.assert_allclose(small, full.reshape(32, 4, 32, 4).mean((1, 3)), atol=1e-5)
    assert dicom_slice(path, size=(20, 40)).shape == (20, 40)

def test_block_mean_resize_equals_pil_box():
    from PIL import Image
    rng = np.random.default_rng(0)
    for (h, w), out in [((256, 256), 64), ((512, 512), 64), ((256, 512), (32, 64)), ((96, 96), 32), ((100, 100), 64)]:
        x = rng.uniform(0, 1, (h, w)).astype(np.float32)
        size = (out, out) if isinstance(out, int) else out
        box = np.asarray(Image.fromarray(x).resize(size[::-1], Image.Resampling.BOX), np.float32)
        np.testing.assert_allclose(resize_slice(x, out), box, atol=1e-6)

def test_file_voi_lut_table():
    img = dicom_slice(data('vlut_04.dcm'), window='file')
    assert img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1 and img.std() > 0.05

def test_shared_data_every_file_reads_and_orders(shared_data):
    df = scan(shared_data, progress=False)
    dcm = df[df.file.str.endswith('.dcm')]
    assert len(dcm) == 168 and dcm.ok.all(), dcm[~dcm.ok].reason.tolist()
    assert set(df[~df.ok].reason.str[:16]) == {'not a DICOM file'}  # README/LICENSE files
    assert dcm.series_uid.nunique() == 5 and (dcm.patient != '').all()
    for _, s in dcm.groupby('series_uid'): assert s.position.is_monotonic_increasing and s.position.notna().all()
    for f in dcm.file[::7]:
        img = dicom_slice(f, size=64)
        assert img.shape == (64, 64) and 0 <= img.min() and img.max() <= 1 and img.std() > 0.01

def test_ct_head_tilt_uneven_spacing_hu(ct_dir):
    files = sorted(ct_dir.glob('*.dcm'), reverse=True)  # handed in the wrong order on purpose
    df = scan(files, progress=False)
    assert df.ok.all() and df.series_uid.nunique() == 1
    gaps = np.diff(df.position)
    assert (gaps > 0).all() and gaps.min() < 1.5 and gaps.max() > 6.5  # uneven: 1.08 to 7 mm
    ds = pydicom.dcmread(df.file[0], stop_before_pixels=True)
    assert abs(float(ds.ImageOrientationPatient[5])) > 0.1  # tilted gantry: the normal is not z
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in df.file]
    assert not np.allclose(df.position, z)
    assert sort_slices(df.sample(frac=1, random_state=0)).file.tolist() == df.file.tolist()
    hu = load_dicom(df.file[14])
    air = hu[(hu > -1400) & (hu < -500)]
    assert abs(np.median(air) + 1000) < 30
    assert 20 <= np.median(hu[200:300, 200:300]) <= 50  # brain parenchyma

def test_blank_slices_in_mr(mr_dir):
    files = [r.file for r in scan(mr_dir/'HFS', progress=False).itertuples()]
    flags = [is_blank(dicom_slice(f)) for f in files]
    assert flags[0] and not any(flags[10:25])
    assert blank_fraction(np.zeros((4, 4))) == 1 and blank_fraction(np.ones((4, 4))) == 0

def test_sort_slices_falls_back_to_instance_and_name():
    df = pd.DataFrame(dict(series_uid=['a'] * 4 + ['b'], position=[np.nan, 2., np.nan, 2., 0.],
                           instance=pd.array([2, 5, 1, 4, 1], dtype='Int64'), file=['w', 'x', 'y', 'z', 'v'], frame=0))
    assert sort_slices(df).file.tolist() == ['z', 'x', 'y', 'w', 'v']

def _all_package_files():
    return sorted(str(p) for p in [*TEST_FILES.rglob('*'), *DATA_STORE.glob('*')] if p.is_file())

def test_every_package_file_read_or_reasoned():
    files = _all_package_files()
    df = scan(files, progress=False, n_workers=2)
    assert set(df.file) == set(files) and set(df.columns) >= {'file', 'frame', 'sop_class', 'modality', 'series_uid', 'study_uid',
        'patient', 'instance', 'position', 'rows', 'cols', 'photometric', 'window_center', 'window_width', 'size', 'mtime', 'ok', 'reason'}
    assert (df.reason[~df.ok] != '').all() and (df.reason[df.ok] == '').all()
    assert df.ok.sum() > 250 and (~df.ok).sum() > 40
    reasons = dict(zip(df.file.map(lambda f: Path(f).name), df.reason))
    assert reasons['rtplan.dcm'].startswith('no pixel data') and reasons['waveform_ecg.dcm'].startswith('no pixel data')
    assert reasons['MR_truncated.dcm'].startswith('truncated pixel data')
    assert reasons['emri_small_jpeg_2k_lossless_too_short.dcm'].startswith('truncated pixel data')
    assert (df[df.file.str.endswith('color3d_jpeg_baseline.dcm')].frame.tolist() == list(range(120)))
    undecodable = set()
    for r in df[df.ok].itertuples():
        if r.frames > 2 and r.frame not in (0, r.frames - 1): continue  # first and last frame of long clips
        try: img = dicom_slice(r.file, r.frame, size=32)
        except DicomError as e:
            assert e.reason and r.file in str(e); undecodable.add(Path(r.file).name); continue
        assert img.shape == (32, 32) and np.isfinite(img).all() and 0 <= img.min() and img.max() <= 1, r.file
        assert load_dicom(r.file, r.frame).shape == (r.rows, r.cols), r.file
        # the fast path (pixels straight from the file) equals the full read of the same file
        np.testing.assert_allclose(img, dicom_slice(read_dicom(r.file), r.frame, size=32), atol=1e-6, err_msg=r.file)
    assert undecodable == {'JPEG-lossy.dcm', 'JPEG2000-embedded-sequence-delimiter.dcm'}  # corrupt streams, reported
    serial = scan(files, progress=False, n_workers=0)
    pd.testing.assert_frame_equal(serial, df)

def truncated_copies(folder, n_cuts=None):
    "Real files cut at several byte offsets (in the preamble, the header and the pixel data)"
    srcs = [data('CT_small.dcm'), data('MR_small_jp2klossless.dcm'), data('emri_small_RLE.dcm'), data('SC_rgb_jpeg_gdcm.dcm')]
    out = []
    for s in srcs:
        b = Path(s).read_bytes()
        for cut in (0, 64, 131, 200, 600, len(b) // 3, len(b) // 2, len(b) - 200, len(b) - 2):
            p = Path(folder)/f'{Path(s).stem}_cut{cut}.dcm'
            p.write_bytes(b[:cut]); out.append(p)
    return out

def test_truncated_files_are_reported_never_crash(tmp_path):
    files = truncated_copies(tmp_path)
    df = scan(tmp_path, progress=False)
    assert set(df.file) == {str(f) for f in files} and (df.reason[~df.ok] != '').all()
    for r in df.itertuples():
        try: dicom_slice(r.file, r.frame)
        except DicomError as e: assert e.reason
    ct = df[df.file.str.contains('CT_small_cut')]
    ct = ct.set_index(ct.file.map(lambda f: int(f.split('cut')[1][:-4])))
    n = Path(data('CT_small.dcm')).stat().st_size
    for cut in (n // 3, n // 2, n - 200): assert ct.reason[cut].startswith('truncated pixel data'), ct.reason[cut]
    for cut in (0, 64, 131): assert ct.reason[cut].startswith('not a DICOM file')
    for cut in (200, 600): assert ct.reason[cut].startswith('no pixel data, although CT Image Storage should have it')
    jp = df[df.file.str.contains('jp2klossless_cut')]
    assert jp.reason.str.startswith('truncated pixel data').sum() == 3  # cut inside the compressed stream
