"""Data pipeline throughput, all measured in the same run on this machine:

- the cached loader (`gan_dls` batches after the cache exists) at 64 px and 128 px, images/s;
- the first, uncached epoch (scan + decode + window + resize into the cache, then one epoch), images/s, against a naive
  per-file loop (pydicom `dcmread` + `pixel_array` + min-max + PIL resize to 64 px); also the cache
  build alone in this one process (`n_workers=0`), to show what the per-file work costs without the second core;
- what training consumes: real images/s of the DCGAN step at 64 px, bs 64 (`gan_learner`).

Targets ([data] issue): cached loader >= 20x the training step's consumption; first epoch >= 2x the naive loop.

NIfTI ([volumes] issue): the first, uncached epoch from `.nii.gz` volumes (the shared dcm2niix volumes and the MNI T1
template, symlinked `--nifti-copies` times, sliced axially at 64 px through `gan_dls(volume=...)`), slices/s, against naive
slicing (each slice request loads its volume with nibabel `get_fdata()` and cuts the slice, min-max, PIL resize), measured
on a sample of the same requests; target >= 5x. Peak memory of a cache build in one process (its own `ru_maxrss`, in a fresh
process) against the largest volume's size as float32: memory bounded by one volume at a time.

usage: python benchmarks/data.py [--copies 6] [--data ../shared/data] [--only dicom|nifti] [--nifti-copies 3]
"""
import argparse, json, os, resource, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np, torch

ROOT = Path(__file__).resolve().parents[1]

def replicate(src, dst, copies):
    "`copies` symlinked copies of every file of `src` (distinct paths, real content)"
    files = [f for f in Path(src).rglob('*.dcm')]
    for c in range(copies):
        for f in files:
            t = Path(dst)/f'c{c}'/f.relative_to(src)
            t.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), t)
    return len(files) * copies

def naive_loop(folder, size=64):
    "The naive way: every file read and decoded, min-max scaled, resized with PIL"
    import pydicom
    from PIL import Image
    n = 0
    for f in sorted(Path(folder).rglob('*.dcm')):
        a = pydicom.dcmread(f).pixel_array.astype(np.float32)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-6)
        np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((size, size)))
        n += 1
    return n

def loader_rate(dls, min_seconds=2.):
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds:
        for b in dls.train: n += len(b[1])
    return n / (time.perf_counter() - t)

def nifti_volumes(data, dst, copies):
    "`copies` symlinked copies of the shared `.nii.gz` volumes (and their sidecars) and of nilearn's MNI T1 template"
    import nilearn
    vols = sorted(Path(data, 'nifti').glob('*.nii.gz'))
    vols.append(Path(nilearn.__file__).parent/'datasets'/'data'/'mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz')
    for c in range(copies):
        d = Path(dst)/f'c{c}'
        d.mkdir(parents=True)
        for v in vols:
            os.symlink(v.resolve(), d/v.name)
            side = v.with_name(v.name[:-7] + '.json')
            if side.exists(): os.symlink(side.resolve(), d/side.name)
    return sorted(Path(dst).rglob('*.nii.gz'))

def naive_volume_slice(f, k, size=64):
    "The naive way: the whole volume loaded for one slice request, cut axially, min-max scaled, resized with PIL"
    import nibabel as nib
    from PIL import Image
    a = nib.as_closest_canonical(nib.load(f)).get_fdata()[:, :, k]
    a = (a - a.min()) / max(a.max() - a.min(), 1e-6)
    return np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((size, size)))

def nifti_memory(folder, cache_dir):
    "Worker mode: build a cache of `folder` in this process; print its peak resident memory increase (MiB) as JSON"
    from medgan_fastai.slices import prepare
    from medgan_fastai.volumes import VolumeOptions
    import nibabel as nib
    import threading, tracemalloc
    rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    base,peak,done = rss(),[0],threading.Event()
    def watch():  # resident memory sampled every 2 ms (ru_maxrss would still hold the peak of the imports)
        while not done.is_set(): peak[0] = max(peak[0], rss()); time.sleep(0.002)
    w = threading.Thread(target=watch); w.start()
    tracemalloc.start()  # numpy's buffers and nibabel's decompression buffers are traced allocations
    c = prepare(folder, size=64, cache_dir=cache_dir, n_workers=0, progress=False, volume=VolumeOptions(axis='axial'))
    traced = tracemalloc.get_traced_memory()[1]
    done.set(); w.join()
    biggest = max(int(np.prod(nib.load(f).shape)) * 4 for f in Path(folder).rglob('*.nii.gz'))
    print(json.dumps(dict(slices=len(c), base_mb=base / 2**20, increase_mb=(peak[0] - base) / 2**20, traced_mb=traced / 2**20,
                          largest_volume_mb=biggest / 2**20)))

def nifti_section(args, tmp):
    "The NIfTI figures: first epoch through the cache vs naive per-slice volume loads; peak memory of one build"
    from medgan_fastai.data import gan_dls
    from medgan_fastai.volumes import VolumeOptions
    files = nifti_volumes(args.data, tmp/'nii', args.nifti_copies)
    print(f'\n{len(files)} .nii.gz volumes ({args.nifti_copies} copies of {len(files) // args.nifti_copies}), sliced axially at 64 px')
    first = []
    for r in range(args.repeats):
        t = time.perf_counter()
        dls = gan_dls(tmp/'nii', size=64, bs=64, cache_dir=tmp/f'ncache{r}', progress=False, verbose=False, skip_blank=False,
                      volume=VolumeOptions(axis='axial'))
        m = sum(len(b[1]) for b in dls.train)
        first.append(m / (time.perf_counter() - t))
        print(f'repeat {r+1}: first epoch (read volumes + slice + window + cache + epoch) {first[-1]:.0f} slices/s ({len(dls.cache)} slices)')
    items = dls.cache.items
    rng = np.random.default_rng(0)
    sample = items.iloc[rng.choice(len(items), min(args.naive_requests, len(items)), replace=False)]
    t = time.perf_counter()
    for f,k in zip(sample.file, sample.frame): naive_volume_slice(f, int(k))
    naive = len(sample) / (time.perf_counter() - t)
    print(f'naive slicing (nibabel get_fdata() per slice request, {len(sample)} random requests): {naive:.1f} slices/s')
    out = subprocess.run([sys.executable, __file__, '--nifti-memory', str(tmp/'nii'), str(tmp/'nmem')], capture_output=True,
                         text=True, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nratio first epoch / naive slicing (NIfTI): {statistics.median(first) / naive:.1f}x  (target >= 5x)")
    print(f"peak memory of a cache build in one process ({mem['slices']} slices): resident +{mem['increase_mb']:.0f} MiB over "
          f"{mem['base_mb']:.0f} MiB after imports, traced allocations {mem['traced_mb']:.0f} MiB at their peak; largest volume "
          f"{mem['largest_volume_mb']:.0f} MiB as float32: {mem['increase_mb'] / mem['largest_volume_mb']:.1f}x (resident), "
          f"{mem['traced_mb'] / mem['largest_volume_mb']:.1f}x (traced) the largest volume")

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default=str(ROOT.parent/'shared'/'data'))
    ap.add_argument('--copies', type=int, default=6)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--only', choices=['dicom', 'nifti'], default=None, help='run one section (default: both)')
    ap.add_argument('--nifti-copies', type=int, default=3)
    ap.add_argument('--naive-requests', type=int, default=60, help='slice requests timed for the naive NIfTI rate')
    ap.add_argument('--nifti-memory', nargs=2, metavar=('FOLDER', 'CACHE'), help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.nifti_memory: return nifti_memory(*args.nifti_memory)
    torch.set_num_threads(2)
    if args.only == 'nifti':
        tmp = Path(tempfile.mkdtemp(prefix='medgan_bench_'))
        try: return nifti_section(args, tmp)
        finally: shutil.rmtree(tmp, ignore_errors=True)
    from medgan_fastai.data import gan_dls
    from medgan_fastai.slices import prepare
    from medgan_fastai.learner import gan_learner
    tmp = Path(tempfile.mkdtemp(prefix='medgan_bench_'))
    try:
        n_files = replicate(args.data, tmp/'src', args.copies)
        print(f'{n_files} DICOM files ({args.copies} copies of {args.data})')
        first, naive = [], []
        for r in range(args.repeats):
            t = time.perf_counter(); n = naive_loop(tmp/'src'); naive.append(n / (time.perf_counter() - t))
            cache = tmp/f'cache{r}'
            t = time.perf_counter()
            dls = gan_dls(tmp/'src', size=64, bs=64, cache_dir=cache, progress=False, verbose=False)
            m = sum(len(b[1]) for b in dls.train)
            first.append(m / (time.perf_counter() - t))
            print(f'repeat {r+1}: naive loop {naive[-1]:.0f} slices/s, first epoch (scan+decode+cache+epoch) {first[-1]:.0f} images/s')
        one = []
        for r in range(args.repeats):
            t = time.perf_counter()
            c = prepare(tmp/'src', size=64, cache_dir=tmp/f'one{r}', n_workers=0, progress=False)
            one.append(len(c) / (time.perf_counter() - t))
        print(f'cache build in one process (no workers): {statistics.median(one):.0f} slices/s')
        rates = {}
        for size in (64, 128):
            dls = gan_dls(tmp/'src', size=size, bs=64, cache_dir=tmp/'cache0', progress=False, verbose=False)
            rates[size] = statistics.median(loader_rate(dls) for _ in range(args.repeats))
            print(f'cached loader at {size} px: {rates[size]:.0f} images/s')
        dls = gan_dls(tmp/'src', size=64, bs=64, cache_dir=tmp/'cache0', progress=False, verbose=False)
        learn = gan_learner(dls, arch='dcgan', seed=0)
        with learn.no_bar(), learn.no_logging():
            learn.fit(1)  # warm-up
            t = time.perf_counter(); learn.fit(1); dt = time.perf_counter() - t
        consume = len(dls.train) * dls.train.bs / dt
        print(f'DCGAN training step consumes {consume:.0f} real images/s at 64 px (bs 64)')
        print(f'\nratio cached loader (64 px) / training consumption: {rates[64] / consume:.1f}x  (target >= 20x)')
        print(f'ratio cached loader (128 px) / training consumption at 64 px: {rates[128] / consume:.1f}x')
        print(f'ratio first epoch / naive loop: {statistics.median(first) / statistics.median(naive):.2f}x  (target >= 2x)')
        print(f'ratio one-process cache build / naive loop: {statistics.median(one) / statistics.median(naive):.2f}x')
        if args.only is None: nifti_section(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == '__main__':
    main()
