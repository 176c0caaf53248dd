"The fastai data pipeline on real DICOM: windowed batches, PNG/DICOM agreement, the decode-once cache."
import os, shutil
from pathlib import Path
import numpy as np, pydicom, pytest, torch
from medgan_fastai.data import *
from medgan_fastai.slices import *
from medgan_fastai.series import scan, SourceError

@pytest.fixture
def cache_dir(tmp_path): return tmp_path/'cache'

def _all_batches(dls):
    "Every training slice once, in cache order (no shuffle), as one tensor in [-1, 1]"
    return torch.cat([b[1] for b in dls.train.new(shuffle=False, drop_last=False)])

def test_mr_batches(mr_dir, cache_dir):
    dls = gan_dls(mr_dir, size=64, bs=16, cache_dir=cache_dir, progress=False)
    xb, yb = dls.one_batch()
    assert tuple(yb.shape) == (16, 1, 64, 64) and tuple(xb.shape) == (16, 100)
    assert yb.min() >= -1 and yb.max() <= 1
    assert yb.std() > 0.2  # real anatomy, not a constant
    # the 4 x 35 slices minus the mostly-background ones
    assert 80 <= len(dls.items) <= 140

def test_ct_brain_window_statistics(ct_dir, cache_dir):
    dls = gan_dls(ct_dir, size=64, bs=8, window='brain', cache_dir=cache_dir, progress=False, skip_blank=False)
    x = (_all_batches(dls) + 1) / 2  # back to [0, 1]
    assert tuple(x.shape[1:]) == (1, 64, 64) and len(x) == 28
    # brain window C40/W80: air is black, bone white, brain tissue (20-50 HU) mid-grey
    hu_mid = x[(x > 0.05) & (x < 0.95)]
    assert 0.3 < hu_mid.median() < 0.7
    assert (x < 0.02).float().mean() > 0.2      # air around the head
    # compare with HU read independently with pydicom
    f = sorted(ct_dir.glob('*.dcm'))[0]
    ds = pydicom.dcmread(f)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() <= -900  # air about -1000 HU

def test_show_batch_writes_an_image(mr_dir, cache_dir, tmp_path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    dls = gan_dls(mr_dir, size=32, bs=8, cache_dir=cache_dir, progress=False, verbose=False)
    dls.show_batch(max_n=4)
    out = tmp_path/'batch.png'
    plt.gcf().savefig(out); plt.close('all')
    assert out.stat().st_size > 1000

def test_png_and_dicom_paths_agree(mr_dir, cache_dir, tmp_path):
    from medgan_fastai.convert import convert_folder
    src = mr_dir/'HFS'
    png = tmp_path/'png'
    convert_folder(src, png, fmt='png', bits=8, window='auto', progress=False)
    a = gan_dls(src, size=64, bs=8, cache_dir=cache_dir, progress=False, skip_blank=False, verbose=False)
    b = gan_dls(png, size=64, bs=8, cache_dir=cache_dir, progress=False, skip_blank=False, verbose=False)
    xa, xb = _all_batches(a), _all_batches(b)
    assert xa.shape == xb.shape
    # the two caches order slices differently (DICOM by position along the normal, PNG by name): pair them by file
    sa = [Path(f).stem for f in a.items.file]
    sb = {Path(f).stem: i for i, f in enumerate(b.items.file)}
    xb = xb[[sb[s] for s in sa]]
    # both in [-1, 1]: 1/255 of the [0, 1] range is 2/255 here
    assert (xa - xb).abs().max() <= 2 / 255 + 1e-6

def test_one_read_build_orders_like_scan(mr_dir, cache_dir):
    # 140 files: decoded by worker processes as they are scanned, then put in `scan`'s anatomical order
    c = prepare(mr_dir, size=32, cache_dir=cache_dir, progress=False, n_workers=2)
    ref = scan(mr_dir, progress=False, n_workers=0)
    assert list(c.items.file) == list(ref.file[ref.ok]) and len(c) == 140
    assert list(c.items.file) != sorted(c.items.file)  # not name order: the slices were reordered with the rows
    for i in (0, 17, 70, 139):
        np.testing.assert_allclose(c[i].numpy(), read_slice(c.items.file[i], size=32), atol=1 / 65535)
    assert (c.items['index'] == np.arange(140)).all()

def test_source_files_survive_a_symlink_loop(mr_dir, tmp_path):
    src = tmp_path/'src'
    shutil.copytree(mr_dir/'HFP', src/'a')
    (src/'a'/'loop').symlink_to(src, target_is_directory=True)
    (src/'.hidden.dcm').write_bytes(b'x'); (src/'report.csv').write_text('x')
    files = source_files(src)
    assert len(files) == 35 and all(f.suffix == '.dcm' and 'loop' not in str(f) for f in files)

def test_png_folder_splits_by_file(mr_dir, cache_dir, tmp_path):
    # PNG slices carry no patient: each file is its own group, so a split leaves both sides non-empty
    from medgan_fastai.convert import convert_folder
    png = tmp_path/'png'
    convert_folder(mr_dir/'HFS', png, fmt='png', bits=8, window='auto', progress=False)
    dls = gan_dls(png, size=32, bs=4, valid_pct=0.25, cache_dir=cache_dir, progress=False, skip_blank=False, verbose=False)
    assert len(dls.valid_ds) == round(0.25 * 35) and len(dls.train_ds) == 35 - len(dls.valid_ds)

def test_cache_second_run_reads_no_dicom(mr_dir, cache_dir, monkeypatch):
    import builtins, pydicom.pixels
    calls = []
    def counting(f, name):
        def wrapped(*a, **k):
            calls.append(name)
            return f(*a, **k)
        return wrapped
    # every way the library reads DICOM: pydicom's reads (one per file) and its frame-from-file decoding
    monkeypatch.setattr(pydicom, 'dcmread', counting(pydicom.dcmread, 'dcmread'))
    monkeypatch.setattr(pydicom.pixels, 'pixel_array', counting(pydicom.pixels.pixel_array, 'pixel_array'))
    # and below all of them, any opening of a source file
    real_open = builtins.open
    def opening(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and str(mr_dir) in os.path.abspath(file): calls.append('open')
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, 'open', opening)
    # 35 files: decoded in this process, so the counters see the first run's reads
    first = gan_dls(mr_dir/'HFP', size=32, bs=8, cache_dir=cache_dir, progress=False, verbose=False)
    assert calls.count('dcmread') == 35 and calls.count('open') >= 35  # one read per file: scan rows and slice from it
    calls.clear()
    second = gan_dls(mr_dir/'HFP', size=32, bs=8, cache_dir=cache_dir, progress=False, verbose=False)
    assert calls == []
    assert torch.equal(_all_batches(first), _all_batches(second))

def test_cache_invalidated_by_touch_and_rebuilt_when_truncated(mr_dir, cache_dir, tmp_path):
    src = tmp_path/'src'
    shutil.copytree(mr_dir/'HFDL', src)
    c1 = prepare(src, size=32, cache_dir=cache_dir, progress=False)
    f = sorted(src.glob('*.dcm'))[3]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    c2 = prepare(src, size=32, cache_dir=cache_dir, progress=False)
    assert c2.folder != c1.folder
    # a truncated data file is detected and rebuilt, never read as valid
    data = c2.folder/'slices.u16'
    ref = np.array(c2.data)
    with open(data, 'r+b') as fh: fh.truncate(data.stat().st_size // 2)
    assert not SliceCache.is_valid(c2.folder)
    c3 = prepare(src, size=32, cache_dir=cache_dir, progress=False)
    assert SliceCache.is_valid(c3.folder) and np.array_equal(np.array(c3.data), ref)
    # a cache whose meta.json never got written (interrupted build) is not valid either
    (c3.folder/'meta.json').unlink()
    assert not SliceCache.is_valid(c3.folder)

def test_bad_files_are_skipped_with_a_summary(mr_dir, cache_dir, tmp_path, capsys):
    src = tmp_path/'mixed'
    shutil.copytree(mr_dir/'HFS', src)
    (src/'notes.dcm').write_text('not dicom')
    good = sorted(src.glob('0*.dcm'))[5]
    (src/'truncated.dcm').write_bytes(good.read_bytes()[:5000])
    dls = gan_dls(src, size=32, bs=8, cache_dir=cache_dir, progress=False)
    out = capsys.readouterr().out
    assert '2 files skipped' in out
    assert len(dls.cache.skipped) == 2 and set(dls.cache.skipped.reason) != {''}

def test_stacked_windows_and_labels(ct_dir, mr_dir, cache_dir, tmp_path):
    dls = gan_dls(ct_dir, size=32, bs=4, window=['brain', 'subdural', 'bone'], cache_dir=cache_dir, progress=False, verbose=False)
    assert tuple(dls.one_batch()[1].shape) == (4, 3, 32, 32)
    dls = gan_dls(mr_dir, size=32, bs=8, label='folder', cache_dir=cache_dir, progress=False, verbose=False)
    noise, real, lab = dls.one_batch()
    assert set(dls.vocab) == {'HFDL', 'HFDR', 'HFP', 'HFS'} and tuple(lab.shape) == (8,)

def test_split_keeps_series_together(mr_dir, cache_dir):
    dls = gan_dls(mr_dir, size=32, bs=8, valid_pct=0.25, split_by='series', cache_dir=cache_dir, progress=False, verbose=False)
    valid_idx = set(dls.valid_ds.items)
    items = dls.cache.items
    s_valid = set(items.loc[list(valid_idx), 'series_uid'])
    s_train = set(items.loc[list(set(dls.train_ds.items)), 'series_uid'])
    assert s_valid and s_train and not (s_valid & s_train)

def test_two_processes_building_the_same_cache_at_once(mr_dir, tmp_path):
    "Parallel notebooks or runs may build one cache together: both must end with the same valid cache"
    import subprocess, sys
    code = ('import sys; from medgan_fastai.slices import prepare; '
            'c = prepare(sys.argv[1], size=32, cache_dir=sys.argv[2], progress=False, n_workers=0); print(c.folder, len(c))')
    ps = [subprocess.Popen([sys.executable, '-c', code, str(mr_dir/'HFS'), str(tmp_path/'cache')], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in ps]
    assert all(p.returncode == 0 for p in ps), [o[1][-2000:] for o in outs]
    (f1, n1), (f2, n2) = (o[0].split() for o in outs)
    assert f1 == f2 and n1 == n2 == '35' and SliceCache.is_valid(f1)
    assert not list((tmp_path/'cache'/'slices').glob('.*.tmp'))   # no staging folder left behind

def test_big_files_are_decoded_frame_by_frame(tmp_path, monkeypatch):
    "Pixel data over the hold-in-memory limit stays on disk and is decoded a frame at a time, with the same slices and labels"
    import medgan_fastai.dicom as D, pydicom.filereader
    from pydicom.data import get_testdata_file
    files = [get_testdata_file('emri_small.dcm'), get_testdata_file('emri_small_RLE.dcm'), get_testdata_file('CT_small.dcm')]
    whole = prepare(files, size=32, cache_dir=tmp_path/'a', progress=False, n_workers=0)
    whole_t = prepare(files, size=32, tags=['Modality'], cache_dir=tmp_path/'a', progress=False, n_workers=0)
    monkeypatch.setattr(D, 'MAX_HELD_BYTES', 4096)  # the test files' pixel data (8 to 80 KB) now counts as big
    loads, frames = [], []
    real_load, real_frame = pydicom.filereader.read_deferred_data_element, pydicom.pixels.pixel_array
    monkeypatch.setattr(pydicom.filereader, 'read_deferred_data_element', lambda *a, **k: loads.append(a[-1].tag) or real_load(*a, **k))
    monkeypatch.setattr(pydicom.pixels, 'pixel_array', lambda src, **k: frames.append((src, k.get('index'))) or real_frame(src, **k))
    framed = prepare(files, size=32, cache_dir=tmp_path/'b', progress=False, n_workers=0)
    assert 0x7FE00010 not in loads  # the pixel data was never read whole
    assert sorted(frames) == sorted((f, i) for f, n in zip(files, (10, 10, 1)) for i in range(n))  # one decode per frame, from the file
    assert len(whole) == len(framed) == 10 + 10 + 1
    assert list(whole.items.file) == list(framed.items.file) and np.array_equal(np.array(whole.data), np.array(framed.data))
    framed_t = prepare(files, size=32, tags=['Modality'], cache_dir=tmp_path/'b', progress=False, n_workers=0)
    assert list(framed_t.items.Modality) == list(whole_t.items.Modality) == ['MR'] * 20 + ['CT']
    assert np.array_equal(np.array(whole_t.data), np.array(framed_t.data))
    D.read_dicom(files[2]).PixelData  # (the watch works: using the pixel data of a dataset read this way loads it)
    assert 0x7FE00010 in loads

def test_a_file_gone_before_its_decode_is_a_reason(mr_dir, tmp_path):
    "Listed, then deleted (or an image that cannot be read): the build records why and goes on"
    files = sorted((mr_dir/'HFP').glob('*.dcm'))[:5]
    gone, bad_png = tmp_path/'gone.dcm', tmp_path/'gone.png'
    c = SliceCache.build([*files, gone, bad_png], tmp_path/'cache', size=32, n_workers=0, progress=False)
    assert len(c) == 5 and set(c.skipped.file) == {str(gone), str(bad_png)}
    assert all(r for r in c.skipped.reason)

def test_demo_series_replaces_a_stale_temporary_folder(tmp_path):
    "A build interrupted earlier leaves its private folder behind: the next one removes it and writes the series"
    folder = tmp_path/'demo'
    stale = tmp_path/f'.demo.{os.getpid()}.tmp'
    stale.mkdir(); (stale/'half_written.dcm').write_bytes(b'x')
    out = demo_series(folder, step=60)
    assert out == folder and (folder/'.complete').exists() and not stale.exists()
    files = sorted(folder.glob('*.dcm'))
    assert len(files) == 4 and not (folder/'half_written.dcm').exists()
    assert read_slice(files[1], size=32).std() > 0.05  # real anatomy

def test_one_exception_type_per_problem(mr_dir, cache_dir, tmp_path):
    "DICOM, image-file, source and label problems each raise their own type, with the file (or source, label) and the reason"
    from medgan_fastai.dicom import DicomError, load_dicom
    (tmp_path/'broken.png').write_text('not an image')
    with pytest.raises(ImageFileError, match='broken.png: not a readable image') as e: read_slice(tmp_path/'broken.png')
    assert not isinstance(e.value, DicomError) and e.value.reason.startswith('not a readable image')
    with pytest.raises(DicomError, match='broken.png: not a DICOM file'): load_dicom(tmp_path/'broken.png')
    with pytest.raises(SourceError, match='nowhere: no such file or folder'): gan_dls(tmp_path/'nowhere', cache_dir=cache_dir, progress=False)
    (tmp_path/'empty').mkdir()
    with pytest.raises(SourceError, match='no files found'): prepare(tmp_path/'empty', cache_dir=cache_dir, progress=False)
    with pytest.raises(SourceError, match=r'no usable slices \(1 file skipped: not a readable image'):
        gan_dls([tmp_path/'broken.png'], cache_dir=cache_dir, progress=False)
    with pytest.raises(LabelError, match="label 'SeriesDescriptio': no slice has a") as e:  # a misspelt tag: read, empty everywhere
        gan_dls(mr_dir/'HFS', size=32, label='SeriesDescriptio', cache_dir=cache_dir, progress=False, verbose=False)
    assert isinstance(e.value, ValueError) and e.value.label == 'SeriesDescriptio'
    import pickle  # worker processes send them back pickled: the reason survives
    for err in (ImageFileError('a.png', 'why'), SourceError('src', 'why'), LabelError('folder', 'why')):
        assert pickle.loads(pickle.dumps(err)).reason == 'why'

def test_oversized_and_tiny_images_are_skipped_with_their_reason(mr_dir, tmp_path):
    "A 13,000 px PNG trained (2.4 GB RSS) and a 1x1 PNG trained without a word: both are now skipped and reported"
    from PIL import Image
    from medgan_fastai.slices import MAX_SOURCE_SIDE
    src = tmp_path/'pngs'
    src.mkdir()
    for i, f in enumerate(sorted((mr_dir/'HFS').glob('*.dcm'))[10:22]):
        Image.fromarray((read_slice(f, size=64)[0] * 255).astype(np.uint8)).save(src/f'{i:02d}.png')
    Image.new('L', (MAX_SOURCE_SIDE + 4808, MAX_SOURCE_SIDE + 4808)).save(src/'huge.png')
    Image.new('L', (1, 1), 128).save(src/'tiny.png')
    dls = gan_dls(src, size=32, bs=4, cache_dir=tmp_path/'cache', progress=False, verbose=False)
    assert len(dls.train_ds) == 12
    why = dict(zip(dls.cache.skipped.file.map(lambda f: Path(f).name), dls.cache.skipped.reason))
    assert 'larger than 8192 px a side' in why['huge.png'] and 'too small to be a slice' in why['tiny.png']

# --- the slices a model trained on ---------------------------------------------------------------------------------

def test_training_slices_are_the_slices_gan_dls_trained_on(mr_dir, cache_dir):
    "From a model's record (a dict, or a generator's `info`): the same cache, slices, order, classes and patient/series groups"
    from medgan_fastai.models import DCGANGenerator
    dls = gan_dls(mr_dir, size=32, bs=8, cache_dir=cache_dir, progress=False, verbose=False)
    rec = dict(source=str(mr_dir), size=32, window='auto', skip_blank=True)
    t = training_slices(rec, cache_dir=cache_dir, progress=False)
    assert t.cache.folder == dls.cache.folder and t.labels is None and 80 <= len(t.images) <= 140
    assert list(t.rows) == list(dls.train_ds.items) and torch.equal(t.images, dls.cache.gather(t.rows) * 2 - 1)
    assert torch.allclose(t.images, _all_batches(dls), atol=1e-6)  # what the learner saw, batch by batch
    assert len(set(t.groups)) == 4 and len(t.groups) == len(t.images)  # one volunteer: the four scans are the groups
    g = DCGANGenerator(32, z_dim=8, ngf=4)
    g.info = dict(source=str(mr_dir), window='auto', skip_blank=True)
    assert torch.equal(training_slices(g, cache_dir=cache_dir, progress=False, n=10).images, t.images[:10])
    # a conditional model: its label rule gives each slice the class it trained with
    dls = gan_dls(mr_dir, size=32, bs=8, label='folder', cache_dir=cache_dir, progress=False, verbose=False)
    t = training_slices({**rec, 'label': 'folder'}, labelled=True, cache_dir=cache_dir, progress=False)
    assert t.labels == dls.items.label.tolist() and list(t.rows) == list(dls.train_ds.items)
    assert {c: len(set(gr for gr, l in zip(t.groups, t.labels) if l == c)) for c in set(t.labels)} == {p: 1 for p in ('HFS', 'HFP', 'HFDL', 'HFDR')}
    with pytest.raises(LabelError, match='no label rule'): training_slices(rec, labelled=True, cache_dir=cache_dir, progress=False)

def test_training_slices_of_a_nifti_volume_follow_the_recorded_axis_unless_told_otherwise(shared_data, cache_dir):
    nii = shared_data/'nifti'/'mr-t1-sag_HFS.nii.gz'  # 35 sagittal slices of 256x256
    rec = dict(source=str(nii), size=32, window='auto', skip_blank=True, volume=dict(axis='sagittal'))
    dls = gan_dls(nii, size=32, bs=8, volume=dict(axis='sagittal'), cache_dir=cache_dir, progress=False, verbose=False)
    t = training_slices(rec, cache_dir=cache_dir, progress=False)
    assert t.cache.folder == dls.cache.folder and 20 <= len(t.images) <= 35
    assert torch.equal(t.images, dls.cache.gather(list(dls.train_ds.items)) * 2 - 1)
    ax = training_slices(rec, volume=dict(axis='axial'), cache_dir=cache_dir, progress=False)  # an option given wins
    assert ax.cache.meta['volume']['axis'] == 'axial' and len(ax.images) > 100

def test_the_summary_says_whether_files_volumes_or_slices_were_skipped(shared_data, cache_dir, tmp_path, capsys):
    import pandas as pd
    nii = str(shared_data/'nifti'/'mr-t1-sag_HFS.nii.gz')
    (tmp_path/'broken.nii.gz').write_bytes(b'not a volume')
    gan_dls([nii, tmp_path/'broken.nii.gz'], size=32, bs=8, volume=dict(axis='sagittal'), cache_dir=cache_dir, progress=False)
    out = capsys.readouterr().out
    assert 'from 1 volume;' in out and '; 1 volume skipped (not a readable NIfTI' in out
    rows = pd.DataFrame(dict(file=[nii] * 37, frame=list(range(35)) + [900, 901]))  # two slices the volume does not have
    gan_dls(rows, size=32, bs=8, volume=dict(axis='sagittal'), cache_dir=cache_dir, progress=False)
    assert '; 2 slices of 1 volume skipped (frame 900 out of range' in capsys.readouterr().out

def test_reading_slices_imports_no_training_code(mr_dir, cache_dir):
    "The privacy filter of `medgan generate` and the app reads slices through `data`: it must not pull in fastai's Learner or torchvision"
    import subprocess, sys
    code = ("import sys, medgan_fastai.data; "
            "print([m for m in ('fastai.learner', 'fastai.vision.gan', 'torchvision', 'medgan_fastai.learner') if m in sys.modules])")
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip() == '[]'
    dls = gan_dls(mr_dir/'HFS', size=32, bs=8, flip=True, cache_dir=cache_dir, progress=False, verbose=False)  # imported when used
    assert tuple(dls.one_batch()[1].shape) == (8, 1, 32, 32)
