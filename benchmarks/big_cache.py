"""Decode-once cache at scale: scan + cache of a large DICOM set (the shared MR and CT slices replicated through symlinks
under /tmp), reporting slices/second and peak memory against a small reference built the same way in the same run.

Usage: .venv/bin/python benchmarks/big_cache.py [--n 20000] [--ref 2000] [--size 64] [--workers N]
       .venv/bin/python benchmarks/big_cache.py --n 100000        # the [scale] issue's figure (a few minutes on 2 cores)
Each size runs in its own process, so its peak resident memory (`ru_maxrss`, its own and its decoding workers') is its own.
The symlinks and caches are removed afterwards.
"""
import argparse, json, os, resource, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/'shared'/'data'

def _replicate(n:int, dst:Path)->int:
    "Symlinks to the shared DICOM files, `n` in all, in folders of one copy each (`copy_00001/...`)"
    files = sorted(SHARED.glob('mr-t1-sag/*/*.dcm')) + sorted(SHARED.glob('ct-head/*.dcm'))
    k = 0
    while k < n:
        d = dst/f'copy_{k // len(files):05d}'
        d.mkdir(parents=True)
        for f in files[:n - k]:
            os.symlink(f, d/f'{f.parent.name}_{f.name}')
            k += 1
    return k

def _run_one(n:int, size:int, workers:int|None, tmp:Path)->dict:
    "Worker mode: build (timed), reopen (timed) and blank-test (timed) a cache of `n` slices; print JSON"
    from medgan_fastai.slices import prepare, blank_mask
    src,cache_dir = tmp/'src', tmp/'cache'
    t = time.perf_counter(); _replicate(n, src); t_link = time.perf_counter() - t
    t = time.perf_counter(); cache = prepare(src, size=size, cache_dir=cache_dir, n_workers=workers, progress=False)
    t_build = time.perf_counter() - t
    t = time.perf_counter(); cache2 = prepare(src, size=size, cache_dir=cache_dir, n_workers=workers, progress=False)
    t_open = time.perf_counter() - t
    t = time.perf_counter(); blank = blank_mask(cache2, progress=False); t_blank = time.perf_counter() - t
    kb = lambda who: resource.getrusage(who).ru_maxrss  # KiB on Linux
    return dict(n=n, slices=len(cache), skipped=len(cache.skipped), blank=int(blank.sum()), link_s=t_link, build_s=t_build,
                open_s=t_open, blank_s=t_blank, cache_mb=(cache.folder/'slices.u16').stat().st_size / 2**20,
                rss_mb=kb(resource.RUSAGE_SELF) / 1024, child_rss_mb=kb(resource.RUSAGE_CHILDREN) / 1024)

def _measure(n:int, size:int, workers)->dict:
    "Run `_run_one` in a fresh process in a fresh /tmp folder, removed afterwards"
    tmp = Path(tempfile.mkdtemp(prefix='medgan_bigcache_'))
    try:
        cmd = [sys.executable, __file__, '--worker', str(tmp), '--n', str(n), '--size', str(size)] + (['--workers', str(workers)] if workers is not None else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally: shutil.rmtree(tmp, ignore_errors=True)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=20000, help='slices in the big cache (100000 for the issue figure)')
    p.add_argument('--ref', type=int, default=2000, help='slices in the reference cache')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--workers', type=int, default=None, help='decoding processes (default: all cores)')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker: return print(json.dumps(_run_one(a.n, a.size, a.workers, Path(a.worker))))
    if not (SHARED/'mr-t1-sag').is_dir(): sys.exit(f'needs the shared DICOM sets at {SHARED}')
    print(f'cache at {a.size} px of the shared MR+CT slices replicated by symlinks; {os.cpu_count()} cores, workers={a.workers or "all"}')
    rows = [_measure(a.ref, a.size, a.workers), _measure(a.n, a.size, a.workers)]
    print(f"{'slices':>8} {'scan+build s':>12} {'slices/s':>9} {'reopen s':>9} {'blank s':>8} {'cache MB':>9} {'peak RSS MB':>12} {'workers MB':>11}")
    for r in rows:
        print(f"{r['slices']:8d} {r['build_s']:12.1f} {r['slices'] / r['build_s']:9.0f} {r['open_s']:9.2f} {r['blank_s']:8.2f} "
              f"{r['cache_mb']:9.1f} {r['rss_mb']:12.0f} {r['child_rss_mb']:11.0f}")
    ref,big = rows
    print(f"\nratios big/reference: slices x{big['slices'] / ref['slices']:.1f}, throughput x{(big['slices'] / big['build_s']) / (ref['slices'] / ref['build_s']):.2f}, "
          f"peak RSS x{big['rss_mb'] / ref['rss_mb']:.2f} (cache file x{big['cache_mb'] / ref['cache_mb']:.1f}); "
          f"peak RSS is {big['rss_mb'] / big['cache_mb']:.2f}x the big cache's size")

if __name__ == '__main__': main()
