"""Data pipeline throughput, all measured in the same run on this machine:

- the cached loader (`gan_dls` batches after the cache exists) at 64 px and 128 px, images/s;
- the first, uncached epoch (scan + decode + window + resize into the cache, then one epoch), images/s, against a naive
  per-file loop (pydicom `dcmread` + `pixel_array` + min-max + PIL resize to 64 px); also the cache
  build alone in this one process (`n_workers=0`), to show what the per-file work costs without the second core;
- what training consumes: real images/s of the DCGAN step at 64 px, bs 64 (`gan_learner`).

Targets ([data] issue): cached loader >= 20x the training step's consumption; first epoch >= 2x the naive loop.
usage: python benchmarks/data.py [--copies 6] [--data ../shared/data]
"""
import argparse, os, shutil, statistics, tempfile, time
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

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default=str(ROOT.parent/'shared'/'data'))
    ap.add_argument('--copies', type=int, default=6)
    ap.add_argument('--repeats', type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == '__main__':
    main()
