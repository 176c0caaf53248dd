"Reading and windowing real DICOM files."
import numpy as np, pytest
from pydicom.data import get_testdata_file
from medgan_fastai.dicom import *

def test_ct_small_in_hounsfield_units():
    import pydicom
    path = get_testdata_file('CT_small.dcm')
    ds = pydicom.dcmread(path)
    hu = load_dicom(path)
    assert hu.dtype == np.float32 and hu.shape == (ds.Rows, ds.Columns)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(hu, expected)

def test_window_presets_map_to_unit_range():
    x = np.linspace(-2000, 3000, 1001, dtype=np.float32)
    for name, (c, w) in WINDOWS.items():
        y = window_image(x, c, w)
        assert y.min() == 0 and y.max() == 1, name
        assert abs(float(window_image(np.float32(c), c, w)) - 0.5) < 1 / w + 1e-3, name

def test_missing_and_foreign_files_raise_dicom_error(tmp_path):
    with pytest.raises(DicomError, match='file not found'): load_dicom(tmp_path/'nope.dcm')
    bad = tmp_path/'notes.txt'
    bad.write_text('not a dicom file')
    with pytest.raises(DicomError, match='notes.txt'): load_dicom(bad)
