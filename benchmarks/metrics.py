"""Seconds for the weight-free metrics on N vs N images (default 1,000 vs 1,000 at 64 px; target: each under 60 s on
2 cores), with ratios against references measured in the same run, so that noisy or different machines still compare:

- `cdist`: one N x N pairwise-distance matrix of the flattened images (torch.cdist), the basic cost of any k-NN metric;
- `naive SWD` (with `--naive`, slow: about 75 s here): the same SWD computed with torch's sort on (patches,
  directions) columns, as a straight port of the ProGAN code would do it (our `swd` sorts with numpy on contiguous
  rows); it also checks that both give the same value.

Copy detection (`copy_similarity`, `memorisation_audit`) is timed for `--n` samples against `--n-train` (10,000)
training slices built from the real slices in ../shared/data (MR HFS/HFDL/HFDR and CT slices 0-20, each copy shifted
up to size/16 px, mirrored, re-contrasted and noised); the samples are made the same way from slices never trained on
(MR HFP, CT 21-27). Its reference is the plain RMS nearest neighbour (the audit it replaced: one torch.cdist of
samples x training slices and a min), measured in the same run. Target: the whole audit under 60 s on 2 cores.

Utility (`utility.utility_scores`: three classifier trainings, real / synthetic / both, tested on held-out real slices,
with 200 bootstrap resamples) is timed on MR vs CT built from ../shared/data: `--utility-n` training slices (default
1,000: the real slices of MR HFS/HFDL/HFDR and CT 0-20, each copy shifted, mirrored, re-contrasted and noised as above)
and the unseen MR HFP and CT 21-27 slices as the test set, at 64 px; the "generator" hands out other such copies of
its class. Its reference is the same CNN trained by a plain PyTorch loop (same epochs, batch size and optimiser
steps) on the real training slices once: the ratio says what three trainings through fastai, the synthetic draws and
the bootstrap cost on top. Target: under 10 minutes on 2 cores.

Usage: .venv/bin/python benchmarks/metrics.py [--n 1000] [--size 64] [--repeats 3] [--naive] [--n-train 10000] [--copies-only]
       [--utility-only] [--utility-n 1000]
FID/KID/IS are not timed: they need the Inception weights (about 100 MB) and, at 10,000 images, a GPU.
"""
import argparse, statistics, time
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from medgan_fastai.metrics import (swd, msssim_diversity, precision_recall, _pyramid_patches, _normalised, copy_similarity,
                                   memorisation_audit)

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

DATA = Path(__file__).resolve().parents[1].parent/'shared'/'data'

def real_volumes(size):
    "The real slices at `size` px in [-1, 1]: {name: (n, 1, size, size)} for the MR positions and the CT series, in slice order"
    from medgan_fastai.dicom import read_dicom
    from medgan_fastai.series import scan
    from medgan_fastai.slices import read_slice
    def stack(files, **kw): return torch.from_numpy(np.stack([read_slice(f, size=size, **kw) for f in files])) * 2 - 1
    out = {p: stack(sorted((DATA/'mr-t1-sag'/p).glob('*.dcm'), key=lambda f: int(read_dicom(f, stop_before_pixels=True).InstanceNumber)))
           for p in ('HFS', 'HFDL', 'HFDR', 'HFP')}
    ct = scan(DATA/'ct-head', progress=False)
    ct = stack(ct[ct.ok].file, window='brain')
    out['CT'], out['CT held'] = ct[:21], ct[21:]
    return out

def augmented(x, n, seed):
    "`n` images drawn from `x`, each shifted up to size/16 px, maybe mirrored, contrast x0.9..1.1 and noised; and their source index"
    g = torch.Generator().manual_seed(seed)
    size = x.shape[-1]
    m = max(1, size // 16)
    src = torch.randint(0, len(x), (n,), generator=g)
    pad = F.pad(x, (m, m, m, m), mode='replicate')
    dy, dx = (torch.randint(0, 2 * m + 1, (n,), generator=g) for _ in range(2))
    rows = (dy[:, None] + torch.arange(size))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(size))[:, None, None, :]
    y = pad[src[:, None, None, None], torch.zeros(1, 1, 1, 1, dtype=torch.long), rows, cols]
    flip = torch.rand(n, 2, generator=g) < 0.5
    y = torch.where(flip[:, 0, None, None, None], y.flip(-1), y)
    y = torch.where(flip[:, 1, None, None, None], y.flip(-2), y)
    c = 0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=g)
    return y * c + 0.05 * torch.randn(y.shape, generator=g), src

def copy_rows(n, n_train, size, repeats):
    "Time copy detection of `n` samples against `n_train` training slices, against the RMS nearest neighbour"
    if not (DATA/'mr-t1-sag').is_dir(): return print(f'copy detection: real slices not found at {DATA}, skipped')
    v = real_volumes(size)
    names = ['HFS', 'HFDL', 'HFDR', 'CT']
    base = torch.cat([v[k] for k in names])
    volume = torch.cat([torch.full((len(v[k]),), i) for i, k in enumerate(names)])
    train, src = augmented(base, n_train, 0)
    groups = volume[src].tolist()  # the volume each training slice came from: the audit holds out whole volumes
    held = torch.cat([v['HFP'], v['CT held']])
    samples, _ = augmented(held, n, 1)
    print(f'\ncopy detection: {n} samples (from unseen MR HFP and CT 21-27) against {n_train} training slices at {size} px '
          f'(from {len(base)} real slices)')
    fs, ft = samples.flatten(1), train.flatten(1)
    rms = lambda: torch.cdist(fs, ft).min(1)
    rms(); ref, _ = seconds(rms, max(repeats, 3))
    print(f'reference RMS nearest neighbour (cdist {n}x{n_train} + min): {ref:.3f} s')
    print(f"{'step':42s} {'seconds':>8s} {'x RMS NN':>9s}  value (target: audit < 60 s)")
    t, (sim, _) = seconds(lambda: copy_similarity(samples, train), 1)
    print(f"{'copy_similarity (top_k=16)':42s} {t:8.2f} {t / ref:9.0f}  median similarity {sim.median():.3f}")
    t, a = seconds(lambda: memorisation_audit(samples, train, groups=groups), 1)
    print(f"{'memorisation_audit (groups, 1000 held out)':42s} {t:8.2f} {t / ref:9.0f}  copy rate {a.copy_rate:.3f}, "
          f"threshold {a.threshold:.3f}, Z_U {a.copying_test['z']:.1f}  {'ok' if t < 60 else 'OVER'}")

class _CopyBank(torch.nn.Module):
    "A conditional stand-in generator: class k hands out augmented copies of its real slices, picked by the noise"
    def __init__(self, banks, vocab):
        super().__init__()
        self.n_classes, self.z_dim, self.size, self.n_channels, self.vocab = len(banks), 8, banks[0].shape[-1], 1, vocab
        self.banks = torch.nn.ParameterList([torch.nn.Parameter(b, requires_grad=False) for b in banks])
    def forward(self, z, labels):
        pick = (z[:, 0].abs() * 1e4).long()
        return torch.stack([self.banks[int(l)][int(p) % len(self.banks[int(l)])] for p, l in zip(pick, labels)])

def utility_rows(n_train, size=64):
    "Time `utility_scores` on MR vs CT at `size` px, against a plain PyTorch training of the same CNN"
    from medgan_fastai.utility import utility_scores, slice_classifier
    if not (DATA/'mr-t1-sag').is_dir(): return print(f'utility: real slices not found at {DATA}, skipped')
    v = real_volumes(size)
    mr, ct = torch.cat([v['HFS'], v['HFDL'], v['HFDR']]), v['CT']
    n_ct = max(2, round(n_train * len(ct) / (len(mr) + len(ct))))
    xr, _ = augmented(mr, n_train - n_ct, 2); xc, _ = augmented(ct, n_ct, 3)
    real, labels = torch.cat([xr, xc]), ['MR'] * (n_train - n_ct) + ['CT'] * n_ct
    hold = torch.cat([v['HFP'], v['CT held']]); hold_labels = ['MR'] * len(v['HFP']) + ['CT'] * len(v['CT held'])
    bank = _CopyBank([augmented(ct, 500, 4)[0], augmented(mr, 500, 5)[0]], ['CT', 'MR'])
    epochs, bs = 8, 32
    def plain():  # the reference: the same network, epochs and batch size in a bare loop, no fastai, no schedule
        torch.manual_seed(0)
        m = slice_classifier(2); opt = torch.optim.Adam(m.parameters(), 3e-3)
        y = torch.tensor([int(l == 'MR') for l in labels])
        for _ in range(epochs):
            for i in torch.randperm(len(real)).split(bs):
                opt.zero_grad(); F.cross_entropy(m(real[i]), y[i]).backward(); opt.step()
    ref, _ = seconds(plain, 1)
    print(f'\nutility: {len(real)} real training slices (MR {n_train - n_ct}, CT {n_ct}) and as many synthetic, '
          f'{len(hold)} unseen real test slices, {size} px, {epochs} epochs, torch {torch.get_num_threads()} threads')
    print(f'reference: the CNN trained once in a plain PyTorch loop on the real slices: {ref:.2f} s')
    t, r = seconds(lambda: utility_scores(bank, real, labels, holdout=hold, holdout_labels=hold_labels, epochs=epochs, n_boot=200), 1)
    print(f"{'step':42s} {'seconds':>8s} {'x plain':>8s}  value (target: < 600 s)")
    print(f"{'utility_scores (3 trainings, 200 resamples)':42s} {t:8.2f} {t / ref:8.1f}  balanced accuracy real "
          f"{r['utility_real_balanced_accuracy']:.3f}, synthetic {r['utility_synthetic_balanced_accuracy']:.3f}, "
          f"mixed {r['utility_mixed_balanced_accuracy']:.3f}, TSTR/TRTR {r['tstr_trtr']:.3f}  {'ok' if t < 600 else 'OVER'}")

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=1000); p.add_argument('--size', type=int, default=64)
    p.add_argument('--repeats', type=int, default=3); p.add_argument('--naive', action='store_true')
    p.add_argument('--n-train', type=int, default=10000); p.add_argument('--copies-only', action='store_true')
    p.add_argument('--utility-only', action='store_true'); p.add_argument('--utility-n', type=int, default=1000)
    a = p.parse_args()
    if a.copies_only: return copy_rows(a.n, a.n_train, a.size, a.repeats)
    if a.utility_only: return utility_rows(a.utility_n, a.size)
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
    copy_rows(a.n, a.n_train, a.size, a.repeats)
    utility_rows(a.utility_n, a.size)

if __name__ == '__main__': main()
