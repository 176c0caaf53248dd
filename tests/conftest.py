"Shared fixtures: the real DICOM sets beside the clone (`../shared/data`, read-only) and pydicom's own files."
import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent/'shared'/'data'

def pytest_sessionstart(session):
    "In CI the real data must be there: a missing `../shared/data` fails the run instead of skipping half the suite"
    if os.environ.get('CI') and not (SHARED_DATA/'mr-t1-sag').is_dir():
        pytest.exit(f'CI is set but the real DICOM sets are missing at {SHARED_DATA}: the tests that need them cannot run',
                    returncode=1)

@pytest.fixture(scope='session')
def shared_data():
    "`../shared/data`: `mr-t1-sag/` (140 MR slices) and `ct-head/` (28 tilted CT slices); never written to"
    if not (SHARED_DATA/'mr-t1-sag').is_dir(): pytest.skip(f'real DICOM sets not found at {SHARED_DATA}')
    return SHARED_DATA

@pytest.fixture(scope='session')
def mr_dir(shared_data): return shared_data/'mr-t1-sag'

@pytest.fixture(scope='session')
def ct_dir(shared_data): return shared_data/'ct-head'
