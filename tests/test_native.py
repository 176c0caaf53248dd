"""The one reading path (`read_dicom`, then `load_dicom` / `dicom_slice`) against pydicom's own `pixel_array` and LUTs,
on every real file pip and ../shared bring, on variants of them and on cut and corrupted copies."""
import math, random, warnings
from pathlib import Path
import numpy as np, pydicom, pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.sequence import Sequence
import medgan_fastai.dicom as D
from medgan_fastai.dicom import *
from medgan_fastai.series import scan_file

TEST_FILES = Path(get_testdata_file('CT_small.dcm')).parent
DATA_STORE = Path(get_testdata_file('emri_small.dcm')).parent  # the pydicom-data package

def _files(shared=None):
    fs = [p for p in [*TEST_FILES.rglob('*'), *DATA_STORE.glob('*')] if p.is_file()]
    if shared is not None: fs += sorted(shared.rglob('*.dcm'))
    return sorted(map(str, fs))

def _pydicom(path):
    "pydicom's own reading of `path` (warnings off), or None when it cannot read it"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return pydicom.dcmread(path)
    except Exception: return None

def _reference(ds, i):
    "Frame `i` of `ds` in modality units as pydicom computes it (float64): colour to BT.601 luminance"
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        arr = pydicom.pixels.pixel_array(ds, index=i)
    if ds.PhotometricInterpretation == 'PALETTE COLOR': arr = apply_color_lut(arr, ds)
    if arr.ndim == 3: return arr.astype(np.float64) @ [0.299, 0.587, 0.114]
    return np.asarray(apply_modality_lut(arr, ds), np.float64)

def _frames(ds):
    n = n_frames(ds)
    return sorted({0, n - 1})

def _has_frame_groups(ds): return 'PerFrameFunctionalGroupsSequence' in ds or 'SharedFunctionalGroupsSequence' in ds

def test_load_dicom_equals_pydicom_on_every_real_file(shared_data):
    "Modality units equal pydicom's pixel_array + modality LUT (or colour LUT + luminance), frame by frame"
    compared, plain, refused = 0, 0, 0
    for f in _files(shared_data):
        ds = _pydicom(f)
        if ds is None or not any(k in ds for k in ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')): continue
        for i in _frames(ds):
            try: ref = _reference(ds, i)
            except Exception:  # pydicom cannot decode it: neither can we, and we say why
                with pytest.raises(DicomError) as e: load_dicom(f, i)
                assert e.value.reason, f
                refused += 1; continue
            mine = read_dicom(f)
            plain += D._plain(mine)
            got = load_dicom(mine, i)
            assert got.dtype == np.float32 and got.shape == ref.shape, f
            if _has_frame_groups(ds): continue  # per-frame rescales: `test_dicom.py` checks those against their own items
            if ds.PhotometricInterpretation == 'PALETTE COLOR' and ds.original_encoding[1] is False:
                continue  # pydicom 3.0 reads big endian LUT data as little endian; `test_dicom.py`'s lossless twins check these
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-3, err_msg=f'{f} frame {i}')
            compared += 1
    shared = [f for f in _files(shared_data) if str(shared_data) in f]
    assert compared > 300 and refused >= 2
    assert plain >= len(shared) + 12  # the fast path ran on the scanner exports and on pydicom's plain files

def test_plain_fast_path_gives_pydicoms_stored_values(shared_data):
    "Where the stored values are viewed straight from the pixel data, they equal pydicom's pixel_array: dtype and values"
    n = 0
    for f in _files(shared_data):
        ds = _pydicom(f)
        if ds is None or pixel_problem(ds) or not D._plain(ds): continue  # (`load_dicom` refuses what `pixel_problem` refuses)
        for i in _frames(ds):
            ref = pydicom.pixels.pixel_array(ds, index=i)
            got = D._stored_frame(ds, i)
            assert got.dtype == ref.dtype and np.array_equal(got, ref), (f, i)
            n += 1
    assert n >= 180

def _pil_box(x, size):
    return np.asarray(Image.fromarray(x.astype(np.float32)).resize((size, size), Image.Resampling.BOX), np.float32)

@pytest.mark.parametrize('window', ['auto', 'file', 'brain'])
def test_display_slices_of_the_shared_scans_equal_pydicoms(shared_data, window):
    "The display path on real scanner exports: pydicom's pixels and rescale, windowed, PIL's box filter to 64 px"
    for f in sorted(shared_data.rglob('*.dcm')):
        ds = _pydicom(str(f))
        hu = _reference(ds, 0).astype(np.float32)
        c, w = resolve_window(window, hu, ds)
        ref = _pil_box(window_image(hu, c, w), 64)
        np.testing.assert_allclose(dicom_slice(f, window=window, size=64), ref, atol=2e-6, err_msg=str(f))

def test_scan_rows_equal_from_a_path_and_from_a_dataset(shared_data):
    "`scan` reads headers only, the cache builder reads files whole: both give the same rows"
    for f in _files(shared_data):
        try: ds = read_dicom(f)
        except DicomError: continue
        a, b = scan_file(f), scan_file(ds)
        assert len(a) == len(b), f
        for x, y in zip(a, b):
            for k in x:
                if k == 'reason' and x[k].startswith('truncated pixel data'): assert y[k].startswith('truncated pixel data'), f
                elif isinstance(x[k], float) and math.isnan(x[k]): assert isinstance(y[k], float) and math.isnan(y[k]), (f, k)
                else: assert x[k] == y[k], (f, k, x[k], y[k])

def test_frames_from_disk_equal_frames_from_memory(monkeypatch):
    "Pixel data left on disk (over `MAX_HELD_BYTES`) is decoded a frame at a time to the same values, for every syntax"
    names = ['emri_small.dcm', 'emri_small_RLE.dcm', 'emri_small_big_endian.dcm', 'emri_small_jpeg_2k_lossless.dcm',
             'emri_small_jpeg_ls_lossless.dcm', 'SC_rgb_rle_2frame.dcm', 'CT_small.dcm']
    held = {n: [load_dicom(get_testdata_file(n), i) for i in range(n_frames(read_dicom(get_testdata_file(n))))] for n in names}
    monkeypatch.setattr(D, 'MAX_HELD_BYTES', 1024)
    for n in names:
        ds = read_dicom(get_testdata_file(n))
        assert D._deferred(ds, 'PixelData'), n
        for i, x in enumerate(held[n]): np.testing.assert_array_equal(load_dicom(ds, i), x, err_msg=f'{n} frame {i}')
        assert D._deferred(ds, 'PixelData'), n  # still on disk

def _variant(tmp_path, name, change, src='CT_small.dcm', **save):
    ds = pydicom.dcmread(get_testdata_file(src))
    change(ds)
    p = tmp_path/f'{name}.dcm'
    ds.save_as(p, **save)
    return str(p)

def test_variants_equal_pydicom(tmp_path):
    "Files written to exercise what plain files may hold: each decodes to pydicom's values, and scans as usable"
    def implicit(ds): ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    def nested_undefined(ds):
        inner = Dataset(); inner.CodeValue = '123'; inner.CodeMeaning = 'x' * 60
        item = Dataset(); item.ReferencedSOPInstanceUID = '1.2.3'; item.ConceptNameCodeSequence = Sequence([inner, inner])
        ds.ReferencedImageSequence = Sequence([item, item])
        ds['ReferencedImageSequence'].is_undefined_length = True
        ds.ReferencedImageSequence[0]['ConceptNameCodeSequence'].is_undefined_length = True
        item.is_undefined_length_sequence_item = inner.is_undefined_length_sequence_item = True
    def high_bits(ds):  # signed 12-bit values with garbage in the 4 unused bits: pydicom ignores them, so must we
        a = ds.pixel_array.astype(np.int16)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (np.clip(a, -2048, 2047).view(np.uint16) ^ np.uint16(0x5000)).tobytes()
    def unsigned_high_bits(ds):
        a = ds.pixel_array.astype(np.int32) + 1024
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
        ds.PixelData = (np.clip(a, 0, 4095).astype(np.uint16) | np.uint16(0xA000)).tobytes()
    def eight_bit(ds):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 1
        ds.PixelData = (ds.pixel_array // 16).astype(np.int8).tobytes()
    def modality_lut(ds):
        lut = Dataset(); lut.LUTDescriptor = [4096, 0, 16]; lut.LUTData = np.arange(4096, dtype='<u2').tobytes(); lut.ModalityLUTType = 'HU'
        ds.ModalityLUTSequence = Sequence([lut])
    def two_frames(ds): ds.NumberOfFrames = 2; ds.PixelData = ds.PixelData * 2
    def accented_id(ds): ds.SpecificCharacterSet = 'ISO_IR 100'; ds.PatientID = 'Müller'
    def wrong_vr(ds): ds['Rows'].VR = 'UL'
    def half_rescale(ds): del ds.RescaleSlope
    def monochrome1(ds): ds.PhotometricInterpretation = 'MONOCHROME1'
    for change in (implicit, nested_undefined, high_bits, unsigned_high_bits, eight_bit, modality_lut, two_frames, accented_id,
                   wrong_vr, half_rescale, monochrome1):
        f = _variant(tmp_path, change.__name__, change)
        ds = pydicom.dcmread(f)
        for i in range(n_frames(ds)):
            np.testing.assert_allclose(load_dicom(f, i), _reference(ds, i), rtol=1e-6, atol=1e-3, err_msg=change.__name__)
        assert scan_file(f)[0]['ok'] and scan_file(f)[0]['patient'] == str(ds.PatientID), change.__name__
        if change is nested_undefined: assert Path(f).read_bytes().count(b'\xfe\xff\x0d\xe0') >= 2  # item delimiters written
    assert D._plain(read_dicom(_variant(tmp_path, 'x', high_bits)))  # the garbage bits went through the fast path
    f = _variant(tmp_path, 'no_pixel_representation', lambda ds: delattr(ds, 'PixelRepresentation'))
    with pytest.raises(DicomError, match='pixel data'): load_dicom(f)  # pydicom's decoder decides, and words it

def test_cut_and_corrupted_files_raise_only_dicom_errors(tmp_path):
    "Anything short of a whole file, or a header with random bytes: a slice, or a `DicomError` with a reason, never another error"
    src = get_testdata_file('CT_small.dcm')
    b = Path(src).read_bytes()
    at = pydicom.dcmread(src, defer_size=1).get_item('PixelData', keep_deferred=True).value_tell  # where the pixel data starts
    for cut in (0, 100, 132, 140, 300, at - 10, at, at + 100, at + 128 * 128 * 2 - 1):
        p = tmp_path/f'cut{cut}.dcm'; p.write_bytes(b[:cut])
        with pytest.raises(DicomError) as e: dicom_slice(p)
        assert e.value.reason and str(p) in str(e.value), cut
        assert not scan_file(p)[0]['ok'] and scan_file(p)[0]['reason'], cut
    rng = random.Random(0)
    for i in range(300):
        c = bytearray(b)
        for _ in range(rng.randint(1, 4)): c[rng.randrange(132, at)] = rng.randrange(256)
        p = tmp_path/'fuzz.dcm'; p.write_bytes(bytes(c))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # pydicom's notes on the garbled values
            rows = scan_file(p)  # never raises
            assert rows and all(r['ok'] or r['reason'] for r in rows)
            try: img = dicom_slice(p, size=32)
            except DicomError as e: assert e.reason; continue
        assert img.shape == (32, 32) and img.dtype == np.float32
