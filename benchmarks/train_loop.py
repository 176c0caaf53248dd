"""Training-loop overhead: the same DCGAN (64 px, bs 64, BCE, Adam 2e-4 beta1 0.5) trained for the same number of
critic and generator updates on the same cached real slices through

  (a) `gan_learner` (our fastai GANLearner),
  (b) the seed's hand-written PyTorch loop (the PyTorch DCGAN tutorial loop),
  (c) fastai's stock `GANLearner` (alternating batches, one optimiser; for reference),

each in its own process (so peak memory is its own), interleaved, several repeats. Prints updates (critic+generator
pairs) per second, the ratios a/b and c/b, and peak RSS.

usage: python benchmarks/train_loop.py [--repeats 3] [--pairs 24] [--data ../shared/data/mr-t1-sag]
"""
import argparse, json, resource, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _data(args):
    from medgan_fastai.data import gan_dls
    dls = gan_dls(args.data, size=64, bs=64, cache_dir=args.cache, progress=False, verbose=False)
    return dls

def run_ours(args):
    from medgan_fastai.learner import gan_learner
    dls = _data(args)
    learn = gan_learner(dls, arch='dcgan', loss='bce', augment=None, ema=False, seed=0)
    n_b = len(dls.train)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)  # warm-up epoch
    epochs = max(1, args.pairs // n_b)
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs)
    dt = time.perf_counter() - t
    return epochs * n_b, dt

def run_stock(args):
    import torch
    from fastai.vision.gan import GANLearner, FixedGANSwitcher
    from fastai.optimizer import Adam
    from medgan_fastai.models import DCGANGenerator, DCGANCritic
    from medgan_fastai.learner import bce_gen_loss, bce_crit_loss
    dls = _data(args)
    torch.manual_seed(0)
    g, c = DCGANGenerator(size=64, z_dim=100), DCGANCritic(size=64)
    learn = GANLearner(dls, g, c, bce_gen_loss, bce_crit_loss, switcher=FixedGANSwitcher(), switch_eval=False,
                       opt_func=lambda p, lr: Adam(p, lr, mom=0.5, sqr_mom=0.999, eps=1e-8, wd=0.), lr=2e-4)
    n_b = len(dls.train)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    epochs = max(1, 2 * args.pairs // n_b)  # one batch trains one net: two batches per pair
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs)
    dt = time.perf_counter() - t
    return epochs * n_b // 2, dt

def run_loop(args):
    "The seed's loop: netD on real (label 1) and fake.detach() (label 0), then netG through netD(fake) (label 1)"
    import torch
    from torch import nn
    from medgan_fastai.models import DCGANGenerator, DCGANCritic
    dls = _data(args)
    real_all = dls.cache.gather(list(dls.train_ds.items)) * 2 - 1   # the same slices, already in [-1, 1]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(real_all), batch_size=64, shuffle=True, drop_last=True)
    torch.manual_seed(0)
    netG, netD = DCGANGenerator(size=64, z_dim=100), DCGANCritic(size=64)
    crit = nn.BCEWithLogitsLoss()
    optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    def epoch():
        n = 0
        for (real,) in loader:
            b = real.size(0)
            netD.zero_grad()
            errD_real = crit(netD(real), torch.ones(b))
            errD_real.backward()
            noise = torch.randn(b, 100)
            fake = netG(noise)
            errD_fake = crit(netD(fake.detach()), torch.zeros(b))
            errD_fake.backward()
            optD.step()
            netG.zero_grad()
            errG = crit(netD(fake), torch.ones(b))
            errG.backward()
            optG.step()
            n += 1
        return n
    epoch()
    epochs = max(1, args.pairs // len(loader))
    t = time.perf_counter()
    n = sum(epoch() for _ in range(epochs))
    return n, time.perf_counter() - t

RUNS = {'ours': run_ours, 'loop': run_loop, 'stock': run_stock}

def child(args):
    import torch
    torch.set_num_threads(args.threads)
    pairs, dt = RUNS[args.child](args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB
    print(json.dumps(dict(pairs=pairs, seconds=dt, rate=pairs / dt, peak_rss_mb=rss)))

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default=str(ROOT.parent/'shared'/'data'/'mr-t1-sag'))
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--pairs', type=int, default=24, help='critic+generator update pairs timed per run')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--cache', default=str(ROOT/'_build'/'bench_cache'))
    ap.add_argument('--child', choices=list(RUNS))
    ap.add_argument('--only', default='ours,loop,stock')
    args = ap.parse_args()
    if args.child: return child(args)
    names = args.only.split(',')
    res = {n: [] for n in names}
    base = [sys.executable, __file__, '--data', args.data, '--pairs', str(args.pairs), '--threads', str(args.threads), '--cache', args.cache]
    subprocess.run(base + ['--child', 'loop', '--pairs', '2'], check=True, capture_output=True)  # build the cache once
    for r in range(args.repeats):
        for n in (names if r % 2 == 0 else names[::-1]):  # interleaved, order alternating
            out = subprocess.run(base + ['--child', n], check=True, capture_output=True, text=True).stdout
            d = json.loads(out.strip().splitlines()[-1])
            res[n].append(d)
            print(f'repeat {r+1} {n:6}: {d["rate"]:.3f} pairs/s ({d["pairs"]} pairs in {d["seconds"]:.1f} s), peak RSS {d["peak_rss_mb"]:.0f} MB', flush=True)
    med = {n: statistics.median(d['rate'] for d in v) for n, v in res.items()}
    print('\nmedian pairs/s: ' + ', '.join(f'{n} {v:.3f}' for n, v in med.items()))
    if 'loop' in med:
        for n in names:
            if n != 'loop': print(f'ratio {n}/loop: {med[n] / med["loop"]:.3f}x')
    print('peak RSS (MB): ' + ', '.join(f'{n} {max(d["peak_rss_mb"] for d in v):.0f}' for n, v in res.items()))

if __name__ == '__main__':
    main()
