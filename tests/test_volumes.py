"NIfTI volumes as a training source: real dcm2niix volumes against their DICOM, orientation, intensities, labels, bad input, the cache."
import os, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
import nibabel as nib, nilearn
from medgan_fastai.volumes import *
from medgan_fastai.slices import prepare, read_slice, SliceCache
from medgan_fastai.data import gan_dls, LabelError

NILEARN_DATA = Path(nilearn.__file__).parent/'datasets'/'data'
MNI_T1 = NILEARN_DATA/'mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz'
MNI_GM = NILEARN_DATA/'mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz'
NIB_DATA = Path(nib.__file__).parent/'tests'/'data'

@pytest.fixture(scope='session')
def nifti_dir(shared_data): return shared_data/'nifti'

@pytest.fixture
def cache_dir(tmp_path): return tmp_path/'cache'

@pytest.fixture(scope='session')
def mni_seg(tmp_path_factory):
    "The MNI grey-matter probability map thresholded at 0.5: a label volume (1: grey matter) on the T1's grid"
    gm = nib.load(MNI_GM)
    p = tmp_path_factory.mktemp('seg')/'gm_labels.nii.gz'
    nib.save(nib.Nifti1Image((np.asarray(gm.dataobj) >= 128).astype(np.uint8), gm.affine), p)
    return p

def _corr(a, b): return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])

def _save(data, affine, path, **hdr):
    img = nib.Nifti1Image(np.asarray(data), affine)
    for k,v in hdr.items(): img.header[k] = v
    nib.save(img, path)
    return path

# --- the real dcm2niix volumes against the DICOM path -------------------------------------------------------------

def test_sagittal_mr_nifti_matches_the_dicom_series(nifti_dir, mr_dir, cache_dir):
    vol = prepare(nifti_dir/'mr-t1-sag_HFS.nii.gz', size=64, cache_dir=cache_dir, progress=False, volume=VolumeOptions(axis='sagittal'))
    dcm = prepare(mr_dir/'HFS', size=64, cache_dir=cache_dir, progress=False)
    assert len(vol) == len(dcm) == 35
    assert (vol.items.axis == 'sagittal').all() and (vol.items.modality == 'MR').all()  # from dcm2niix's sidecar
    corrs = [_corr(vol.data[i], dcm.data[i]) for i in range(35)]
    assert min(corrs) >= 0.95, corrs  # the same images, in the same order
    # and the order is anatomical: a shifted pairing is clearly worse
    assert np.mean([_corr(vol.data[i], dcm.data[i + 3]) for i in range(32)]) < np.mean(corrs) - 0.05

def test_ct_nifti_with_the_brain_window(nifti_dir, ct_dir, cache_dir, tmp_path):
    dls = gan_dls(nifti_dir/'ct-head.nii.gz', size=64, bs=8, window='brain', skip_blank=False, cache_dir=cache_dir,
                  progress=False, verbose=False)
    x = (torch.cat([b[1] for b in dls.train.new(shuffle=False, drop_last=False)]) + 1) / 2
    assert tuple(x.shape[1:]) == (1, 64, 64) and len(x) == 28
    assert (dls.cache.items.window_used == 'C40/W80').all() and (dls.cache.items.modality == 'CT').all()
    # as the DICOM path: brain tissue mid-grey, air black
    assert 0.3 < x[(x > 0.05) & (x < 0.95)].median() < 0.7
    assert (x < 0.02).float().mean() > 0.2
    ref = (torch.cat([b[1] for b in gan_dls(ct_dir, size=64, bs=8, window='brain', skip_blank=False, cache_dir=cache_dir,
                                                 progress=False, verbose=False).train.new(shuffle=False, drop_last=False)]) + 1) / 2
    assert abs(float((x < 0.02).float().mean() - (ref < 0.02).float().mean())) < 0.05
    # without the sidecar the HU heuristic still finds CT; the modality override turns the presets off
    shutil.copy(nifti_dir/'ct-head.nii.gz', tmp_path/'ct.nii.gz')
    assert load_volume(tmp_path/'ct.nii.gz').ct
    assert not load_volume(tmp_path/'ct.nii.gz', VolumeOptions(modality='MR')).ct
    mr_like = next(volume_slices(tmp_path/'ct.nii.gz', 'brain', VolumeOptions(modality='MR')))
    assert mr_like['window_used'] != 'C40/W80'  # a HU preset means nothing on a volume not in HU: the percentile window

def test_anisotropic_voxels_become_square_pixels(nifti_dir):
    s = next(volume_slices(nifti_dir/'mr-t1-sag_HFS.nii.gz', opts=VolumeOptions(axis='axial')))
    # 35 sagittal slices 4.8 mm apart across 256 rows of 1.016 mm: 165 columns of square pixels
    assert (s['rows'], s['cols']) == (256, round(35 * 4.8 / 1.015625)) and s['frames'] == 256
    x = read_slice((nifti_dir/'mr-t1-sag_HFS.nii.gz', 128), size=32, volume=VolumeOptions(axis='axial'))
    assert x.shape == (1, 32, 32) and (x[0, :, :3] == 0).all()  # padded left and right, not stretched

# --- orientation ----------------------------------------------------------------------------------------------------

def test_orientation_landmarks_on_the_mni_template(tmp_path):
    img = nib.load(MNI_T1)
    data = np.asarray(img.dataobj).astype(np.float32)
    # a bright marker in the right frontal lobe, placed by world coordinates (RAS mm) through the file's own affine
    ijk = np.rint(np.linalg.inv(img.affine) @ [30, 50, 40, 1])[:3].astype(int)
    data[tuple(slice(c - 2, c + 3) for c in ijk)] = 255
    # stored flipped left-right and front-back (LPS order): the reorientation must undo it
    flip = np.diag([-1, -1, 1, 1]).astype(float); flip[0, 3],flip[1, 3] = data.shape[0] - 1,data.shape[1] - 1
    p = _save(data[::-1, ::-1].astype(np.uint8), img.affine @ flip, tmp_path/'mni_lps.nii.gz')
    assert nib.aff2axcodes(nib.load(p).affine) == ('L', 'P', 'S')
    def marker(axis):
        vol = load_volume(p, VolumeOptions(axis=axis))
        k = int(np.argmax([np.count_nonzero(vol.image(k, (127.5, 256)) > 0.99) for k in range(vol.n_slices)]))
        im = vol.image(k, (127.5, 256))
        r,c = np.argwhere(im > 0.99).mean(0)
        return r / im.shape[0], c / im.shape[1], im
    r,c,ax = marker('axial')
    assert r < 0.5 and c < 0.5  # anterior up, the patient's right on the image's left
    brain_rows = np.flatnonzero((ax > 0.2).any(1))
    # the frontal pole (the brain's anterior end, ~70 mm from the marker's 50 mm) is in the top half
    assert brain_rows[0] < ax.shape[0] / 2 and brain_rows[0] < r * ax.shape[0]
    r,c,_ = marker('coronal')
    assert r < 0.5 and c < 0.5  # superior up, right on the left
    r,c,_ = marker('sagittal')
    assert r < 0.5 and c < 0.5  # superior up, anterior on the left

def test_reorientation_is_nibabels_on_oblique_and_4d_files():
    f = NIB_DATA/'example4d.nii.gz'  # oblique affine, 2 volumes
    ref = nib.as_closest_canonical(nib.load(f)).get_fdata(dtype=np.float32)
    assert np.array_equal(load_volume(f, VolumeOptions(volume=1)).data, ref[..., 1])
    rows = [dict((k, v) for k,v in s.items() if k != 'image') for s in volume_slices(f, opts=VolumeOptions(volume='all'))]
    assert len(rows) == 2 * 24 and {r['series_uid'][-2:] for r in rows} == {'#0', '#1'}
    assert [r['frame'] for r in rows] == list(range(48)) and len({r['subject'] for r in rows}) == 1
    with pytest.raises(VolumeError, match='volume 5 asked for, the file holds 2'): load_volume(f, VolumeOptions(volume=5))

def test_2d_nifti_is_one_slice(tmp_path):
    p = _save(np.arange(20 * 30, dtype=np.float32).reshape(20, 30), np.eye(4), tmp_path/'flat.nii')
    s = list(volume_slices(p, opts=VolumeOptions(axis='sagittal')))  # the axis asked for does not apply to a single slice
    assert len(s) == 1 and s[0]['image'].shape == (30, 20) and s[0]['axis'] == 'axial'

# --- intensities ----------------------------------------------------------------------------------------------------

def test_scaling_nonfinite_voxels_and_percentile_options(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, (16, 16, 8)).astype(np.int16)
    p = _save(a, np.eye(4), tmp_path/'scaled.nii.gz', scl_slope=2., scl_inter=-100.)
    v = load_volume(p)
    assert np.allclose(v.data, a * 2. - 100.)  # scl_slope / scl_inter as nibabel applies them
    f = rng.random((16, 16, 8)).astype(np.float32) * 100
    f[3, 4, 2],f[5, 5, 2],f[0, 0, 5] = np.nan, np.inf, -np.inf
    q = _save(f, np.eye(4), tmp_path/'nan.nii.gz')
    rows = list(volume_slices(q))
    assert [r['nonfinite'] for r in rows] == [0, 0, 2, 0, 0, 1, 0, 0]
    assert all(np.isfinite(r['image']).all() for r in rows)
    assert rows[2]['image'][11, 12] == 0  # NaN is background
    wide = next(volume_slices(q, opts=VolumeOptions(percentiles=(0, 100))))['window_used']
    assert wide != rows[0]['window_used']

def test_window_is_per_volume_not_per_slice(nifti_dir):
    rows = list(volume_slices(nifti_dir/'mr-t1-sag_HFS.nii.gz', opts=VolumeOptions(axis='sagittal')))
    assert len({r['window_used'] for r in rows}) == 1
    # an edge slice is darker than the middle one, as in the volume (a per-slice window would stretch it)
    assert rows[0]['image'].mean() < 0.6 * rows[17]['image'].mean()

def test_central_fraction(nifti_dir):
    rows = list(volume_slices(nifti_dir/'mr-t1-sag_HFS.nii.gz', opts=VolumeOptions(axis='sagittal', central_fraction=0.5)))
    assert [r['frame'] for r in rows] == list(range(8, 26))

# --- labels ---------------------------------------------------------------------------------------------------------

def test_segmentation_labels_and_subject_level_splits(mni_seg, tmp_path, cache_dir):
    src = tmp_path/'subjects'; src.mkdir()
    for s in ('sub-01', 'sub-02', 'sub-03', 'sub-04'):
        os.symlink(MNI_T1, src/f'{s}_t1.nii.gz'); os.symlink(mni_seg, src/f'{s}_seg.nii.gz')
    opts = VolumeOptions(axis='axial', seg_rule='brats', seg_labels=1)
    dls = gan_dls(src, size=16, bs=16, label='seg', valid_pct=0.5, skip_blank=False, cache_dir=cache_dir,
                  progress=False, verbose=False, volume=opts)
    items = dls.cache.items
    assert set(items.subject) == {'sub-01', 'sub-02', 'sub-03', 'sub-04'} and len(items) == 4 * 189  # segmentations are not images
    one = items[items.subject == 'sub-01'].sort_values('frame')
    assert one.seg_class.iloc[0] == 'empty' and one.seg_class.iloc[-1] == 'empty'  # below and above the brain
    assert (one.seg_class.iloc[60:120] == '1').all()
    assert set(dls.vocab) == {'1', 'empty'} and dls.one_batch()[2].shape == (16,)
    train = set(items.loc[list(dls.train_ds.items), 'patient']); valid = set(items.loc[list(dls.valid_ds.items), 'patient'])
    assert train and valid and not train & valid  # no subject in two splits
    # dominant-label mode; a label CSV by subject
    dom = list(volume_slices(src/'sub-01_t1.nii.gz', opts=VolumeOptions(seg_rule='brats')))
    assert {r['seg_class'] for r in dom} == {'1', 'empty'}
    pd.DataFrame(dict(subject=['sub-01', 'sub-02', 'sub-03'], label=['a', 'b', 'a'])).to_csv(tmp_path/'labels.csv', index=False)
    dls = gan_dls(src, size=16, bs=16, label=tmp_path/'labels.csv', cache_dir=cache_dir, progress=False, verbose=False, volume=opts)
    assert set(dls.vocab) == {'a', 'b'} and set(dls.items.subject) == {'sub-01', 'sub-02', 'sub-03'}  # sub-04 has no label
    with pytest.raises(LabelError, match='seg_rule'): gan_dls(src, label='seg', cache_dir=cache_dir)

def test_segmentation_on_another_grid_is_resampled_nearest_neighbour(tmp_path):
    lab = np.zeros((20, 20, 10), np.uint8); lab[5:15, 5:15, 3:7] = 3; lab[8:12, 8:12, 4:6] = 7
    _save(np.ones((20, 20, 10), np.float32), np.eye(4), tmp_path/'a_t1.nii.gz')
    shifted = np.eye(4); shifted[:3, 3] = 0.4  # the same grid size, placed 0.4 mm off
    _save(lab, shifted, tmp_path/'a_seg.nii.gz')
    v = load_volume(tmp_path/'a_t1.nii.gz', VolumeOptions(seg_rule='brats'))
    assert set(np.unique(v.seg)) == {0, 3, 7}  # never an interpolated value between labels
    assert set(np.unique(v.label_image(5))) <= {0, 3, 7}
    assert v.seg_class(0) == 'empty' and v.seg_class(5) == '3'

# --- bad input ------------------------------------------------------------------------------------------------------

def _bad_volumes(folder):
    "A folder of good and bad volumes: {file name: expected reason}"
    folder.mkdir(parents=True, exist_ok=True)
    good = np.random.default_rng(1).random((24, 24, 12)).astype(np.float32)
    _save(good, np.eye(4), folder/'good_t1.nii.gz')
    _save(good, np.eye(4), folder/'other_t1.nii.gz')
    b = (folder/'good_t1.nii.gz').read_bytes()
    (folder/'cut_t1.nii.gz').write_bytes(b[:len(b) // 2])
    for name,aff in (('flat_t1.nii.gz', np.zeros((4, 4))), ('nan_t1.nii.gz', np.diag([np.nan, 1, 1, 1]))):
        h = nib.Nifti1Header(); h.set_data_shape(good.shape); h.set_data_dtype(np.float32)
        h.set_qform(None, code=0); h.set_sform(aff, code=1)  # the header's only orientation: zero, or with a NaN
        nib.save(nib.Nifti1Image(good, None, h), folder/name)
    _save(np.ones((1, 1, 1), np.float32), np.eye(4), folder/'dot_t1.nii.gz')
    _save(good, np.eye(4), folder/'pair_t1.nii.gz'); _save(np.zeros((24, 24, 11), np.uint8), np.eye(4), folder/'pair_seg.nii.gz')
    return {'cut_t1.nii.gz': 'truncated or corrupt image data', 'flat_t1.nii.gz': 'zero or singular affine',
            'nan_t1.nii.gz': 'non-finite affine', 'dot_t1.nii.gz': 'a single voxel',
            'pair_t1.nii.gz': 'segmentation pair_seg.nii.gz has shape (24, 24, 11), the image (24, 24, 12)'}

def test_bad_volumes_are_rows_with_reasons_and_errors_when_read(tmp_path, cache_dir, mr_dir):
    src = tmp_path/'mixed'
    expected = _bad_volumes(src)
    shutil.copytree(mr_dir/'HFS', src/'dicom')  # DICOM and NIfTI in one folder
    opts = VolumeOptions(seg_rule='brats')
    c = prepare(src, size=16, cache_dir=cache_dir, progress=False, volume=opts)
    reasons = {Path(f).name: r for f,r in zip(c.skipped.file, c.skipped.reason)}
    for name,why in expected.items():
        assert why in reasons[name], (name, reasons.get(name))
        with pytest.raises(VolumeError, match=why.split(' (')[0][:30]) as e: load_volume(src/name, opts)
        assert e.value.path.endswith(name)
    assert set(Path(f).name for f in c.items.file if f.endswith('.nii.gz')) == {'good_t1.nii.gz', 'other_t1.nii.gz'}
    assert (c.items.file.str.endswith('.dcm')).sum() == 35
    # the folder trains: DataLoaders and a batch
    dls = gan_dls(src, size=16, bs=8, cache_dir=cache_dir, progress=False, verbose=False, volume=opts)
    assert dls.one_batch()[1].shape == (8, 1, 16, 16)
    with pytest.raises(VolumeError, match='out of range'): read_slice((src/'good_t1.nii.gz', 99), volume=opts)

def test_medgan_train_on_a_folder_mixing_good_and_bad_volumes(tmp_path, cache_dir, mr_dir, monkeypatch):
    "`medgan train` on a folder of good and bad volumes and DICOM: one line per kind of bad file, then a trained, exported run"
    from medgan_fastai.cli import main
    from medgan_fastai.persist import load_generator
    src = tmp_path/'mixed'
    _bad_volumes(src)
    shutil.copytree(mr_dir/'HFS', src/'dicom')
    monkeypatch.setenv('MEDGAN_CACHE', str(cache_dir))
    out = tmp_path/'run'
    main(['train', str(src), '--out', str(out), '--epochs', '1', '--size', '32', '--bs', '8', '--samples', '4', '--seg-rule', 'brats'])
    g = load_generator(out)
    assert g.size == 32 and g.info['volume']['seg_rule'] == 'brats' and (out/'checkpoints'/'epoch_001.pth').exists()

# --- the cache ------------------------------------------------------------------------------------------------------

def test_second_build_reads_no_volume_and_touching_one_invalidates(nifti_dir, tmp_path, cache_dir, monkeypatch):
    import builtins
    src = tmp_path/'src'; src.mkdir()
    for n in ('mr-t1-sag_HFS.nii.gz', 'mr-t1-sag_HFP.nii.gz', 'mr-t1-sag_HFS.json'): shutil.copy(nifti_dir/n, src/n)
    calls = []
    real_load,real_open = nib.load,builtins.open
    monkeypatch.setattr(nib, 'load', lambda *a, **k: calls.append('load') or real_load(*a, **k))
    def opening(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and str(src) in os.path.abspath(file): calls.append('open')
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, 'open', opening)
    opts = VolumeOptions(axis='sagittal')
    first = prepare(src, size=32, cache_dir=cache_dir, progress=False, n_workers=0, volume=opts)
    assert calls.count('load') == 2 and len(first) == 70  # one read per volume
    calls.clear()
    second = prepare(src, size=32, cache_dir=cache_dir, progress=False, volume=opts)
    assert calls == [] and second.folder == first.folder
    assert np.array_equal(np.asarray(first.data), np.asarray(second.data))
    # other options are another cache; a touched volume invalidates
    assert prepare(src, size=32, cache_dir=cache_dir, progress=False, n_workers=0, volume=VolumeOptions(axis='axial')).folder != first.folder
    f = src/'mr-t1-sag_HFP.nii.gz'
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    calls.clear()
    third = prepare(src, size=32, cache_dir=cache_dir, progress=False, n_workers=0, volume=opts)
    assert third.folder != first.folder and calls.count('load') == 2

def test_touching_a_segmentation_invalidates(mni_seg, tmp_path, cache_dir):
    src = tmp_path/'s'; src.mkdir()
    shutil.copy(MNI_T1, src/'x_t1.nii.gz'); shutil.copy(mni_seg, src/'x_seg.nii.gz')
    opts = VolumeOptions(seg_rule='brats', central_fraction=0.1)
    a = prepare(src/'x_t1.nii.gz', size=16, cache_dir=cache_dir, progress=False, volume=opts)
    f = src/'x_seg.nii.gz'
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert prepare(src/'x_t1.nii.gz', size=16, cache_dir=cache_dir, progress=False, volume=opts).folder != a.folder

def test_options_are_checked():
    with pytest.raises(ValueError, match='axis'): VolumeOptions(axis='transverse')
    with pytest.raises(ValueError, match='central_fraction'): VolumeOptions(central_fraction=0)
    with pytest.raises(ValueError, match='volume'): VolumeOptions(volume=-1)
    assert volume_options({'axis': 'coronal'}, volume='all') == VolumeOptions(axis='coronal', volume='all')

def test_rows_given_as_a_dataframe_read_each_volume_once(nifti_dir, cache_dir, monkeypatch):
    opts = VolumeOptions(axis='coronal', central_fraction=0.25)
    full = prepare(nifti_dir/'mr-t1-sag_HFS.nii.gz', size=32, cache_dir=cache_dir, progress=False, volume=opts)
    rows = full.items.iloc[::4].reset_index(drop=True)
    loads = []
    real = nib.load
    monkeypatch.setattr(nib, 'load', lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    part = prepare(rows, size=32, cache_dir=cache_dir, progress=False, n_workers=0, volume=opts)
    assert len(loads) == 1 and len(part) == len(rows)
    assert np.array_equal(np.asarray(part.data), np.asarray(full.data)[::4])
