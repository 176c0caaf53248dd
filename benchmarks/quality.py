"""Sample quality for the same wall-clock budget on real MR (../shared/data/mr-t1-sag, 64 px):

  (a) the seed's recipe: DCGAN, BCE, no augmentation, no EMA, batch 128 capped to the data;
  (b) our default recipe: `gan_learner(arch='style')` (StyleGAN-style nets, non-saturating loss, lazy R1, EMA)
      with ADA (`augment='ada'`), batch 32.

Each trains in its own process for `--minutes`; then 1,000 samples of each are scored with the sliced Wasserstein
distance (`metrics.swd`, Laplacian pyramid, x1e3) against the real slices. Prints both figures, the ratio b/a
(target <= 0.5), seconds per 1,000 generated images for each generator, and writes the two sample grids side by side
to `--out` (default `_build/quality/`).

usage: python benchmarks/quality.py [--minutes 10] [--out DIR]
"""
import argparse, json, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def child(args):
    import torch
    from fastai.callback.core import Callback, CancelFitException
    from medgan_fastai.data import gan_dls
    from medgan_fastai.learner import gan_learner, export_generator
    torch.set_num_threads(2)
    class TimeBudget(Callback):
        "Stop training once the wall-clock budget is spent (checked after every batch)"
        order = 99
        def __init__(self, seconds): self.seconds = seconds
        def before_fit(self): self.t0 = time.perf_counter()
        def after_batch(self):
            if time.perf_counter() - self.t0 > self.seconds: raise CancelFitException()
    seed_recipe = args.child == 'seed'
    n = len(list(Path(args.data).rglob('*.dcm')))
    bs = min(128, n) if seed_recipe else 32
    dls = gan_dls(args.data, size=64, bs=bs, cache_dir=args.cache, progress=False, verbose=False)
    if seed_recipe: learn = gan_learner(dls, arch='dcgan', loss='bce', augment=None, ema=False, seed=0)
    else: learn = gan_learner(dls, arch='style', augment='ada', seed=0)
    budget = TimeBudget(args.minutes * 60)
    with learn.no_bar(), learn.no_logging(): learn.fit(100000, cbs=budget)
    out = Path(args.out)/f'{args.child}.pth'
    export_generator(learn, out)
    print(json.dumps(dict(steps=learn.gan_state.crit_steps, epochs=learn.epoch + 1, images=learn.gan_state.crit_steps * dls.train.bs)))

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default=str(ROOT.parent/'shared'/'data'/'mr-t1-sag'))
    ap.add_argument('--minutes', type=float, default=10.)
    ap.add_argument('--n', type=int, default=1000)
    ap.add_argument('--out', default=str(ROOT/'_build'/'quality'))
    ap.add_argument('--cache', default=str(ROOT/'_build'/'bench_cache'))
    ap.add_argument('--child', choices=['seed', 'ours'])
    args = ap.parse_args()
    if args.child: return child(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    info = {}
    for name in ('seed', 'ours'):
        r = subprocess.run([sys.executable, __file__, '--child', name, '--data', args.data, '--minutes', str(args.minutes),
                            '--out', args.out, '--cache', args.cache], capture_output=True, text=True)
        if r.returncode: sys.exit(f'{name} run failed:\n{r.stderr[-3000:]}')
        info[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f'{name}: trained {args.minutes:g} min: {info[name]["steps"]} critic steps, {info[name]["images"]} real images seen', flush=True)
    import torch
    from PIL import Image
    from medgan_fastai.data import gan_dls
    from medgan_fastai.persist import load_generator
    from medgan_fastai.latent import generate
    from medgan_fastai.models import image_grid
    from medgan_fastai.metrics import swd
    torch.set_num_threads(2)
    dls = gan_dls(args.data, size=64, bs=16, cache_dir=args.cache, progress=False, verbose=False)
    real = dls.cache.gather(list(dls.train_ds.items)) * 2 - 1
    res, grids = {}, []
    for name in ('seed', 'ours'):
        g = load_generator(Path(args.out)/f'{name}.pth', device='cpu')
        generate(g, [0, 1])  # warm-up
        t = time.perf_counter(); fake = generate(g, list(range(args.n))); dt = time.perf_counter() - t
        res[name] = dict(swd=swd(real, fake, seed=0)['swd'], sec_per_1000=dt * 1000 / args.n)
        grids.append(image_grid(fake[:64], nrow=8))
        print(f'{name}: SWD {res[name]["swd"]:.1f} (x1e3, {args.n} samples vs {len(real)} real slices); '
              f'{res[name]["sec_per_1000"]:.2f} s per 1,000 images', flush=True)
    w, h = grids[0].size
    both = Image.new('L', (2 * w + 16, h))
    both.paste(grids[0], (0, 0)); both.paste(grids[1], (w + 16, 0))
    both.save(Path(args.out)/'seed_vs_ours.png')
    print(f'\nratio SWD ours/seed: {res["ours"]["swd"] / res["seed"]["swd"]:.3f}  (target <= 0.5)')
    print(f'grids (left: seed recipe, right: ours): {Path(args.out)/"seed_vs_ours.png"}')
    (Path(args.out)/'quality.json').write_text(json.dumps(dict(minutes=args.minutes, train=info, scores=res), indent=1))

if __name__ == '__main__':
    main()
