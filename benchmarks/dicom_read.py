"""DICOM reading speed: our path (one pydicom read per file: scan rows + modality LUT + window + resize to 64 px) against
a naive per-file loop, the readers underneath it (pydicom, and dicomsdl when it is installed), and the header scan of
10,000 files. Prints figures and ratios measured in the same run (timings on a shared machine are noisy).

Usage: python benchmarks/dicom_read.py [N_FILES]   (default 10000; the shared files are replicated as symlinks in /tmp)
"""
import os, shutil, sys, tempfile, time, warnings
from pathlib import Path
import numpy as np, pydicom
from PIL import Image
from fastcore.parallel import parallel
from medgan_fastai.dicom import dicom_slice, load_dicom, read_dicom, window_image, resize_slice, WINDOWS
from medgan_fastai.series import scan, scan_file
from medgan_fastai.slices import read_slice

SHARED = Path(__file__).resolve().parents[1].parent/'shared'/'data'
N = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
warnings.simplefilter('ignore')

def naive(path):
    "The naive way: decode, min-max scale the stored values, 8-bit, PIL resize"
    a = pydicom.dcmread(path).pixel_array.astype(np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6) * 255
    return np.asarray(Image.fromarray(a.astype(np.uint8)).resize((64, 64)))

def ours(path):
    "What the cache builder does per file: one read, the file's scan rows and its slice from it"
    ds = read_dicom(path)
    return scan_file(ds), read_slice(ds, size=64)

SDL_TAGS = ('SOPClassUID', 'Modality', 'SeriesInstanceUID', 'StudyInstanceUID', 'PatientID', 'InstanceNumber', 'ImagePositionPatient',
            'ImageOrientationPatient', 'Rows', 'Columns', 'PhotometricInterpretation', 'WindowCenter', 'WindowWidth', 'RescaleSlope',
            'RescaleIntercept', 'BitsAllocated', 'BitsStored', 'PixelRepresentation', 'SamplesPerPixel')

def sdl(path):
    "dicomsdl's reading of the same values and pixels (a C++ reader; not a dependency: measured when installed)"
    import dicomsdl
    d = dicomsdl.open(path)
    return [getattr(d, k, None) for k in SDL_TAGS], d.pixelData(storedvalue=True)

def best_of(f, n=3):
    ts = []
    for _ in range(n): t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)

files = sorted(str(p) for p in SHARED.rglob('*.dcm'))
print(f'{len(files)} shared DICOM files, {os.cpu_count()} CPUs')

# 1. per file, in one process (the data pipeline runs this in worker processes on top)
ms = lambda t: t / len(files) * 1e3
t_naive = best_of(lambda: [naive(f) for f in files])
t_pyd = best_of(lambda: [pydicom.dcmread(f).pixel_array for f in files])
t_ours = best_of(lambda: [ours(f) for f in files])
t_read = best_of(lambda: [dicom_slice(f, window='auto', size=64) for f in files])
print(f'ms per file: naive loop (dcmread + pixel_array + min-max + PIL resize) {ms(t_naive):.3f}; '
      f'pydicom dcmread + pixel_array alone {ms(t_pyd):.3f}')
print(f'ms per file: ours, one read -> scan rows + windowed 64 px slice {ms(t_ours):.3f}   ratio naive/ours {t_naive/t_ours:.2f}')
print(f'ms per file: ours, dicom_slice alone (read + modality LUT + auto window + MONOCHROME1 + area resize) {ms(t_read):.3f}   '
      f'ratio naive/ours {t_naive/t_read:.2f}')
try:
    import dicomsdl  # noqa: F401
    t_sdl = best_of(lambda: [sdl(f) for f in files])
    print(f'ms per file: dicomsdl open + the same header values + pixels {ms(t_sdl):.3f}   (pydicom/dicomsdl {t_pyd/t_sdl:.2f}x)')
except ImportError: print('dicomsdl not installed: `pip install dicomsdl` to compare it')
t_scan0 = best_of(lambda: scan(files, n_workers=0, progress=False))
print(f'our scan (headers only, once per dataset): {len(files)/t_scan0:6.0f} files/s')

# 2. window before or after resizing: equivalent within 1/255?
ct = sorted(str(p) for p in (SHARED/'ct-head').glob('*.dcm'))
diffs = []
for f in ct:
    hu = load_dicom(f)
    a = resize_slice(window_image(hu, *WINDOWS['brain']), 64)
    b = window_image(resize_slice(hu, 64), *WINDOWS['brain'])
    diffs.append(np.abs(a - b))
d = np.stack(diffs)
hu = load_dicom(ct[14])
t_wr = best_of(lambda: [resize_slice(window_image(hu, 40, 80), 64) for _ in range(50)]) / 50
t_rw = best_of(lambda: [window_image(resize_slice(hu, 64), 40, 80) for _ in range(50)]) / 50
print(f'window->resize vs resize->window on ct-head (brain window, 512->64): max diff {d.max():.3f}, '
      f'{(d > 1/255).mean():.1%} of pixels differ by > 1/255; time {t_wr*1e3:.2f} ms vs {t_rw*1e3:.2f} ms per slice '
      f'-> we window first')

# 3. header scan of N files (symlinks to the shared files)
tmp = Path(tempfile.mkdtemp(prefix='medgan_scan_bench_'))
try:
    for i in range(N):
        sub = tmp/f'd{i // 500:03d}'
        sub.mkdir(exist_ok=True)
        os.symlink(files[i % len(files)], sub/f'{i:05d}.dcm')
    t = time.perf_counter(); df = scan(tmp, progress=False); t_scan = time.perf_counter() - t
    assert len(df) == N and df.ok.all()
    print(f'scan of {N} files (processes, default): {t_scan:.1f} s = {N/t_scan:.0f} files/s   (target: < 60 s)')
    sample = sorted(str(p) for p in tmp.rglob('*.dcm'))[:2000]
    t_serial = best_of(lambda: scan(sample, n_workers=0, progress=False), 1)
    t_proc = best_of(lambda: scan(sample, progress=False), 1)
    t_thread = best_of(lambda: parallel(scan_file, sample, n_workers=os.cpu_count(), threadpool=True), 1)
    print(f'2000 headers: serial {t_serial:.2f} s, processes {t_proc:.2f} s, threads (no sorting) {t_thread:.2f} s'
          f'  -> processes/serial speedup {t_serial/t_proc:.2f}, threads/serial {t_serial/t_thread:.2f}')
finally: shutil.rmtree(tmp)
