"`read_native` (plain DICOM files read without pydicom) against pydicom, on every real file pip and ../shared bring."
import math, random, warnings
from pathlib import Path
import numpy as np, pydicom, pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from medgan_fastai.dicom import *
from medgan_fastai.dicom import NATIVE_TAGS
from medgan_fastai.series import scan_file

TEST_FILES = Path(get_testdata_file('CT_small.dcm')).parent
DATA_STORE = Path(get_testdata_file('emri_small.dcm')).parent  # the pydicom-data package

def _files(shared=None):
    fs = [p for p in [*TEST_FILES.rglob('*'), *DATA_STORE.glob('*')] if p.is_file()]
    if shared is not None: fs += sorted(shared.rglob('*.dcm'))
    return sorted(map(str, fs))

def _pydicom_value(ds, kw):
    "What `read_native` should give for `kw`: numbers as numbers, several DS values as a list, text stripped"
    v = ds.get(kw)
    if v is None or v == '': return None
    if isinstance(v, pydicom.multival.MultiValue): return [float(x) for x in v]
    if kw in ('InstanceNumber', 'NumberOfFrames'): return int(v)
    if isinstance(v, (int, float)) and not isinstance(v, str): return float(v) if isinstance(v, float) else v
    return str(v).strip()

def _same_row(a, b):
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and math.isnan(x): assert isinstance(y, float) and math.isnan(y), k
        else: assert x == y, (k, x, y)

def test_native_equals_pydicom_on_every_real_file(shared_data):
    files = _files(shared_data)
    n = 0
    for f in files:
        h = read_native(f)
        if h is None: continue
        n += 1
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            ds = pydicom.dcmread(f)
            ref = ds.pixel_array
        # pixels: same dtype, same values (bits above BitsStored dropped the way pydicom does)
        assert h.pixels.dtype == ref.dtype and np.array_equal(h.pixels, ref), f
        for kw,_ in NATIVE_TAGS.values():
            want = _pydicom_value(ds, kw)
            got = h.get(kw)
            assert (got in (None, '') and want is None) or got == want, (f, kw, got, want)
        assert h.file_meta['TransferSyntaxUID'] == ds.file_meta.TransferSyntaxUID
        # scan rows and display slices equal pydicom's path on the same file
        _same_row(scan_file(f)[0], scan_file(f, dataset=pydicom.dcmread(f))[0])
        for w in ('auto', 'file', 'brain'):
            np.testing.assert_allclose(dicom_slice(f, window=w, size=32), dicom_slice(ds, window=w, size=32), atol=2e-6, err_msg=f)
    shared = [f for f in files if str(shared_data) in f]
    assert all(read_native(f) is not None for f in shared)  # the scanner exports in ../shared are all plain files
    assert n >= len(shared) + 12  # and some of pydicom's files (implicit VR, signed, 8-bit, MONOCHROME1)

def test_not_native_goes_to_pydicom():
    # compressed, big endian, deflated, colour, multi-frame, no DICM prefix, truncated, not DICOM at all
    for name in ('JPEG2000.dcm', 'MR_small_bigendian.dcm', 'image_dfl.dcm', 'SC_rgb.dcm', 'emri_small.dcm',
                 'ExplVR_LitEndNoMeta.dcm', 'MR_truncated.dcm', 'rtplan.dcm'):
        assert read_native(get_testdata_file(name)) is None, name
    assert read_native('no/such/file.dcm') is None

def _variant(tmp_path, name, change, src='CT_small.dcm', **save):
    ds = pydicom.dcmread(get_testdata_file(src))
    change(ds)
    p = tmp_path/f'{name}.dcm'
    ds.save_as(p, **save)
    return str(p)

def test_variants_read_natively_or_refused(tmp_path):
    def implicit(ds): ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    def nested_undefined(ds):
        inner = Dataset(); inner.CodeValue = '123'; inner.CodeMeaning = 'x' * 60
        item = Dataset(); item.ReferencedSOPInstanceUID = '1.2.3'; item.ConceptNameCodeSequence = Sequence([inner, inner])
        ds.ReferencedImageSequence = Sequence([item, item])
        ds['ReferencedImageSequence'].is_undefined_length = True
        ds.ReferencedImageSequence[0]['ConceptNameCodeSequence'].is_undefined_length = True
        item.is_undefined_length_sequence_item = inner.is_undefined_length_sequence_item = True  # items end with a delimiter too
    def high_bits(ds):  # signed 12-bit values with garbage in the 4 unused bits
        a = ds.pixel_array.astype(np.int16)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (np.clip(a, -2048, 2047).view(np.uint16) ^ np.uint16(0x5000)).tobytes()
    for change in (implicit, nested_undefined, high_bits):
        f = _variant(tmp_path, change.__name__, change)
        h, ds = read_native(f), pydicom.dcmread(f)
        assert h is not None, change.__name__
        if change is nested_undefined: assert Path(f).read_bytes().count(b'\xfe\xff\x0d\xe0') >= 2  # item delimiters were written
        assert np.array_equal(h.pixels, ds.pixel_array) and h.Rows == ds.Rows and h.PatientID == ds.PatientID, change.__name__
    def modality_lut(ds):
        lut = Dataset(); lut.LUTDescriptor = [4096, 0, 16]; lut.LUTData = np.arange(4096, dtype='<u2').tobytes(); lut.ModalityLUTType = 'HU'
        ds.ModalityLUTSequence = Sequence([lut])
    def two_frames(ds): ds.NumberOfFrames = 2; ds.PixelData = ds.PixelData * 2
    def accented_id(ds): ds.SpecificCharacterSet = 'ISO_IR 100'; ds.PatientID = 'Müller'
    def wrong_vr(ds): ds['Rows'].VR = 'UL'
    def half_rescale(ds): del ds.RescaleSlope
    def no_pixel_representation(ds): del ds.PixelRepresentation
    for change in (modality_lut, two_frames, accented_id, wrong_vr, half_rescale):
        f = _variant(tmp_path, change.__name__, change)
        assert read_native(f) is None, change.__name__
        assert dicom_slice(f).shape == (128, 128) and scan_file(f)[0]['ok'], change.__name__  # pydicom reads them
    f = _variant(tmp_path, 'no_pixel_representation', no_pixel_representation)
    assert read_native(f) is None  # a type 1 element missing: pydicom's reading (and its error) decides

def test_cut_and_corrupted_files_never_raise(tmp_path):
    src = get_testdata_file('CT_small.dcm')
    b = Path(src).read_bytes()
    good = read_native(src)
    at = good['_pixel_at']
    for cut in (0, 100, 132, 140, 300, at - 10, at, at + 100, at + good.pixels.nbytes - 1):
        p = tmp_path/f'cut{cut}.dcm'; p.write_bytes(b[:cut])
        assert read_native(p) is None, cut  # anything short of the whole pixel data is pydicom's (and its reason's) business
        assert not scan_file(p)[0]['ok']
    rng = random.Random(0)
    for i in range(300):  # random bytes in the header: an answer consistent with its own header, or None, never an exception
        c = bytearray(b)
        for _ in range(rng.randint(1, 4)): c[rng.randrange(132, at)] = rng.randrange(256)
        p = tmp_path/'fuzz.dcm'; p.write_bytes(bytes(c))
        h = read_native(p)
        if h is not None: assert h.pixels.shape == (h.Rows, h.Columns) and h.BitsAllocated in (8, 16, 32)

def test_header_only_reads_match_and_long_headers(shared_data):
    mr = sorted((shared_data/'mr-t1-sag').rglob('*.dcm'))[0]  # a 120 KB Siemens CSA header before the pixels
    head, full = read_native(mr, pixels=False), read_native(mr)
    assert head.pixels is None and full.pixels.shape == (full.Rows, full.Columns)
    assert {k: v for k, v in head.items()} == {k: v for k, v in full.items()}
    assert head['_pixel_at'] > 100_000
