"Shared fixtures: the real DICOM sets beside the clone (`../shared/data`, read-only) and pydicom's own files."
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent/'shared'/'data'

@pytest.fixture(scope='session')
def shared_data():
    "`../shared/data`: `mr-t1-sag/` (140 MR slices) and `ct-head/` (28 tilted CT slices); never written to"
    if not (SHARED_DATA/'mr-t1-sag').is_dir(): pytest.skip(f'real DICOM sets not found at {SHARED_DATA}')
    return SHARED_DATA

@pytest.fixture(scope='session')
def mr_dir(shared_data): return shared_data/'mr-t1-sag'

@pytest.fixture(scope='session')
def ct_dir(shared_data): return shared_data/'ct-head'
