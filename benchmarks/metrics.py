"""Seconds for the weight-free metrics on N vs N images (default 1,000 vs 1,000 at 64 px; target: each under 60 s on
2 cores), with ratios against references measured in the same run, so that noisy or different machines still compare:

- `cdist`: one N x N pairwise-distance matrix of the flattened images (torch.cdist), the basic cost of any k-NN metric;
- `naive SWD` (with `--naive`, slow: about 75 s here): the same SWD computed with torch's sort on (patches,
  directions) columns, as a straight port of the ProGAN code would do it (our `swd` sorts with numpy on contiguous
  rows); it also checks that both give the same value.

Usage: .venv/bin/python benchmarks/metrics.py [--n 1000] [--size 64] [--repeats 3] [--naive]
FID/KID/IS are not timed: they need the Inception weights (about 100 MB) and, at 10,000 images, a GPU.
"""
import argparse, statistics, time
import numpy as np
import torch
import torch.nn.functional as F
from medgan_fastai.metrics import swd, msssim_diversity, precision_recall, _pyramid_patches, _normalised

def blobs(n, size, seed):
    "Smooth random images in [-1, 1] with slice-like structure at several scales"
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, 1, 8, 8, generator=g), size=size, mode='bicubic', align_corners=False)
    return torch.tanh(coarse + 0.1 * torch.randn(n, 1, size, size, generator=g))

def seconds(f, repeats):
    "Median wall time of `repeats` calls of `f`, and its last result"
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); r = f(); times.append(time.perf_counter() - t)
    return statistics.median(times), r

def naive_swd(real, fake, seed=0, n_projections=512):
    "Reference: ProGAN's SWD with torch.sort along the patch axis (same patches and directions count)"
    h = real.shape[-1]
    n_levels = int(np.log2(h / 16)) + 1
    pr, pf = _pyramid_patches(real, n_levels, 7, 128, seed), _pyramid_patches(fake, n_levels, 7, 128, seed)
    g, out = torch.Generator().manual_seed(seed + 1), []
    for a, b in zip(pr, pf):
        a, b = _normalised(a, 1), _normalised(b, 1)
        dirs = torch.randn(a.shape[1], n_projections, generator=g)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        tot = 0.
        for j in range(0, n_projections, 128):
            d = dirs[:, j:j + 128]
            tot += ((a @ d).sort(0).values - (b @ d).sort(0).values).abs().mean(0).sum().item()
        out.append(1e3 * tot / n_projections)
    return float(np.mean(out))

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=1000); p.add_argument('--size', type=int, default=64)
    p.add_argument('--repeats', type=int, default=3); p.add_argument('--naive', action='store_true')
    a = p.parse_args()
    real, fake = blobs(a.n, a.size, 0), blobs(a.n, a.size, 1)
    print(f'{a.n} vs {a.n} images at {a.size} px, torch {torch.__version__}, {torch.get_num_threads()} threads')
    torch.cdist(real.flatten(1), fake.flatten(1))  # warm-up: the first call pays for thread pools and allocations
    ref, _ = seconds(lambda: torch.cdist(real.flatten(1), fake.flatten(1)), max(a.repeats, 5))
    pr = lambda **kw: ' '.join(f'{k}={v:.3f}' for k, v in precision_recall(real, fake, **kw).items())
    rows = [('swd', lambda: f"swd={swd(real, fake)['swd']:.4f}"),
            ('msssim_diversity (1000 pairs, fake)', lambda: f'msssim={msssim_diversity(fake):.4f}'),
            ('precision_recall (k=3, random features)', pr),
            ('precision_recall (k=3, pixels)', lambda: pr(features='pixels'))]
    print(f'reference cdist {a.n}x{a.n} on {a.size * a.size}-d pixels (median of 5): {ref:.3f} s')
    if a.naive:
        naive, naive_val = seconds(lambda: naive_swd(real, fake), 1)
        print(f'reference naive SWD (torch sort): {naive:.2f} s = {naive / ref:.0f} x cdist (swd={naive_val:.4f})')
    print(f"{'metric':42s} {'seconds':>8s} {'x cdist':>8s}" + (f" {'x naive SWD':>12s}" if a.naive else '') + '  value (target < 60 s)')
    for name, f in rows:
        t, v = seconds(f, a.repeats)
        print(f'{name:42s} {t:8.2f} {t / ref:8.0f}' + (f' {t / naive:12.3f}' if a.naive else '') + f'  {v}  {"ok" if t < 60 else "OVER"}')

if __name__ == '__main__': main()
