"""Sample quality for the same wall-clock budget, on several real data sets, three recipes ([quality], issue 15):

  tutorial: the DCGAN-tutorial recipe (BCE, BatchNorm critic, batch 128 capped to the data, no augmentation, no EMA);
  dcgan:    `medgan train --arch dcgan` defaults (hinge, spectral norm, ADA, EMA; the rest chosen by `run.auto_config`);
  style:    `medgan train --arch style` defaults (StyleGAN-style nets, non-saturating loss, R1, ADA, EMA; auto-config).

Sets (64 px): `mr` the shared sagittal MR (../shared/data/mr-t1-sag), `ct` the shared head CT in the brain window,
`mni` the MNI152 demo series (axial), `png` a PNG folder that `medgan convert` makes from the MR, `nifti` the dcm2niix
volume of the MR's HFS series cut coronally (reformatted slices, anisotropic voxels: a plane nothing was tuned on), and
`mixed` a varied labelled set for conditional training (`--label folder`): four classes from four sources, scanners,
modalities and planes (MR sagittal, CT axial in the brain window, the MNI template axial, the MR volume coronal), written
as PNG class folders by `medgan convert` as a user with a multi-source JPG/PNG set would have it. On `mixed` the
samples come in the classes' shares of the real slices (the distribution SWD compares them with), and the diversity is
measured per class (samples of class k against real slices of class k; the table shows the worst class).

Each run trains in its own process through `run.train_run(..., minutes=M)` (the budget covers training, not data
loading), one after the other, never two at once. Then `--n` samples of each exported generator are scored against the
set's training slices:
  SWD      sliced Wasserstein distance (`metrics.swd`, x1e3), and the real-vs-real floor (two random halves of the set);
  pairSSIM mean SSIM between pairs of 64 samples (`diversity.pair_ssim`), next to the same among 64 real slices:
           samples more alike than real slices mean collapse;
  copies   `metrics.memorisation_audit` copy rate of 256 samples;
  steps, kimg  critic updates and thousands of real images shown in the budget (`training.json`).
Prints one table, writes `quality.json` and, per set, the three sample grids side by side (`grids_SET.png`, and a
smaller `grids_SET.jpg` for the docs) to `--out`.

usage: python benchmarks/quality.py [--minutes 5 | --long] [--sets mr,ct,mni,png,nifti,mixed] [--recipes tutorial,dcgan,style]
smoke test: python benchmarks/quality.py --minutes 0.3 --sets mr,ct --n 200
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/'shared'/'data'
RECIPES = dict(tutorial=dict(arch='dcgan', loss='bce', augment='none', ema=False, bs=128),
               dcgan=dict(arch='dcgan'), style=dict(arch='style'))
SIZE = 64

def set_source(name, out:Path)->dict:
    "The `train_run` options that name set `name` (making the PNG folder when needed)"
    if name == 'mr': return dict(source=str(SHARED/'mr-t1-sag'))
    if name == 'ct': return dict(source=str(SHARED/'ct-head'), window='brain')
    if name == 'mni': return dict(source=None)  # the demo series every install has
    if name == 'nifti': return dict(source=str(SHARED/'nifti'/'mr-t1-sag_HFS.nii.gz'), axis='coronal', central_fraction=0.7)
    if name == 'mixed': return dict(source=str(mixed_folder(out)), label='folder')
    if name == 'png':
        dst = out/'png_from_mr'
        if not (dst/'report.csv').exists():
            medgan = str(Path(sys.executable).parent/'medgan')
            r = subprocess.run([medgan, 'convert', str(SHARED/'mr-t1-sag'), str(dst)], capture_output=True, text=True)
            if r.returncode: sys.exit(f'medgan convert failed:\n{r.stderr[-2000:]}')
        return dict(source=str(dst))
    raise SystemExit(f'unknown set {name!r}: use mr, ct, mni or png')

def mixed_folder(out:Path)->Path:
    "The four-class PNG folder of the `mixed` set, made once with `medgan convert` (one class per source)"
    dst = out/'mixed_classes'
    medgan = str(Path(sys.executable).parent/'medgan')
    from medgan_fastai.data import demo_series
    parts = dict(mr_sagittal=[str(SHARED/'mr-t1-sag')], ct_axial=[str(SHARED/'ct-head'), '--window', 'brain'],
                 mni_axial=[str(demo_series())], mr_coronal=[str(SHARED/'nifti'/'mr-t1-sag_HFS.nii.gz'), '--axis', 'coronal',
                                                             '--central-fraction', '0.7'])
    for k, args in parts.items():
        if (dst/k/'report.csv').exists(): continue
        r = subprocess.run([medgan, 'convert', args[0], str(dst/k), '--size', str(SIZE), '--skip-blank', *args[1:]],
                           capture_output=True, text=True)
        if r.returncode: sys.exit(f'medgan convert {k} failed:\n{r.stderr[-2000:]}')
    return dst

def child(args):
    import torch
    torch.set_num_threads(args.threads)
    from medgan_fastai.run import train_run
    out = Path(args.out)/args.set/args.child
    opts = {**set_source(args.set, Path(args.out)), **RECIPES[args.child]}
    source = opts.pop('source')
    learn = train_run(source, out=out, force=True, minutes=args.minutes, size=SIZE, seed=0, samples=16, **opts)
    tr = json.loads((out/'training.json').read_text())
    print(json.dumps(dict(steps=tr['critic_steps'], kimg=tr['kimg'], epochs=tr['epochs'], bs=learn.recipe.bs,
                          slices=tr['train_slices'])))

def real_slices(set_name, out:Path):
    "The set's training slices as the runs saw them (same window, size, blank slices left out), in [-1, 1], and their classes"
    return slices_of(set_source(set_name, out))

def slices_of(o:dict):
    "The training slices of the `train_run` options `o` (`source`, and `window`, `axis`, `label`... when given), and their classes"
    from medgan_fastai.data import gan_dls
    from medgan_fastai.dicom import parse_window
    dls = gan_dls(o['source'], size=SIZE, bs=8, window=parse_window(o.get('window', 'auto')), progress=False, verbose=False,
                  volume=dict(axis=o.get('axis', 'axial'), central_fraction=o.get('central_fraction', 1.)))
    idx = list(dls.train_ds.items)
    classes = [Path(f).parent.name for f in dls.cache.items.loc[idx, 'file']] if o.get('label') == 'folder' else None
    return dls.cache.gather(idx) * 2 - 1, classes

def real_floor(real)->float:
    "SWD x1e3 between two random halves of the real slices: what a perfect generator scores on a set this small"
    import torch
    from medgan_fastai.metrics import swd
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    return swd(real[perm[:len(real) // 2]], real[perm[len(real) // 2:]], seed=0)['swd']

def samples(G, n:int, classes):
    """`n` samples of `G`; for a conditional generator, each class in its share of the real slices' `classes` (the
    distribution SWD compares them with), with the class of each"""
    from collections import Counter
    from medgan_fastai.latent import generate
    if not getattr(G, 'n_classes', 0): return generate(G, list(range(n))), None
    import torch
    count = Counter(classes)
    per = {str(k): round(n * count[str(k)] / len(classes)) for k in G.vocab}
    seeds = iter(range(sum(per.values())))  # every sample its own noise seed, class after class
    return (torch.cat([generate(G, [next(seeds) for _ in range(m)], labels=k) for k, m in per.items() if m]),
            [k for k, m in per.items() for _ in range(m)])

def diversity(fake, fake_classes, real, real_classes, pairs, seed=0)->tuple:
    "(samples' pair SSIM, real slices' pair SSIM): overall, or for the class whose samples are most alike relative to its real slices"
    import torch
    from medgan_fastai.diversity import pair_ssim, diversity_pairs
    g = torch.Generator().manual_seed(seed)
    if real_classes is None:
        perm = torch.randperm(len(real), generator=g)
        return pair_ssim(fake[:64], pairs), pair_ssim(real[perm[:64]], diversity_pairs(min(64, len(real)), 1000, seed))
    worst = None
    for k in sorted(set(real_classes)):
        r = real[[i for i, c in enumerate(real_classes) if c == k]][:64]
        f = fake[[i for i, c in enumerate(fake_classes) if c == k]][:64]
        d = (pair_ssim(f, diversity_pairs(len(f), 1000, seed)), pair_ssim(r, diversity_pairs(len(r), 1000, seed)))
        if worst is None or d[0] - d[1] > worst[0] - worst[1]: worst = d
    return worst

def generator_scores(G, real, real_classes, n:int)->tuple:
    "(SWD, samples' and real slices' pair SSIM, copy rate of `n` samples of `G`; the samples, classes shuffled together for a grid)"
    import torch
    from medgan_fastai.metrics import swd, memorisation_audit
    from medgan_fastai.diversity import diversity_pairs
    fake, fake_classes = samples(G, n, real_classes)
    shuffled = fake[torch.randperm(len(fake), generator=torch.Generator().manual_seed(1))] if fake_classes else fake
    fake_ssim, real_ssim = diversity(fake, fake_classes, real, real_classes, diversity_pairs(64, 1000, 0))
    row = dict(swd=swd(real, fake, seed=0)['swd'], pair_ssim=fake_ssim, real_pair_ssim=real_ssim,
               copy_rate=memorisation_audit(shuffled[:256], real).copy_rate)  # every class audited, not the first two
    return row, shuffled

def score(set_name, recipes, args, info):
    from medgan_fastai.persist import load_generator
    out = Path(args.out)
    real, real_classes = real_slices(set_name, out)
    floor = real_floor(real)
    rows, fakes = [], {}
    for name in recipes:
        G = load_generator(out/set_name/name/'generator.pth', device='cpu')
        row, fakes[name] = generator_scores(G, real, real_classes, args.n)
        rows.append(dict(set=set_name, recipe=name, **row, floor=floor, **info[name]))
    return rows, fakes

def grids(set_name, fakes, out:Path):
    "The recipes' sample grids side by side: 64 samples each (`grids_SET.png`) and 32 each as a small JPEG for the docs"
    from PIL import Image
    from medgan_fastai.models import image_grid
    for n, name in ((64, f'grids_{set_name}.png'), (32, f'grids_{set_name}.jpg')):
        gs = [image_grid(f[:n], nrow=8) for f in fakes.values()]
        w, h = gs[0].size
        both = Image.new('L', (len(gs) * (w + 16) - 16, h), 255)
        for i, im in enumerate(gs): both.paste(im, (i * (w + 16), 0))
        both.save(out/name, **(dict(quality=88) if name.endswith('.jpg') else {}))

def table(rows)->str:
    ref = {r['set']: r['swd'] for r in rows if r['recipe'] == 'tutorial'}
    head = f"{'set':5} {'recipe':9} {'SWD':>7} {'floor':>6} {'/tutorial':>9} {'pairSSIM':>8} {'real':>6} {'copies':>6} {'steps':>6} {'kimg':>7}"
    lines = [head, '-' * len(head)]
    for r in rows:
        rel = f"{r['swd'] / ref[r['set']]:.2f}" if r['set'] in ref else '-'
        lines.append(f"{r['set']:5} {r['recipe']:9} {r['swd']:7.1f} {r['floor']:6.1f} {rel:>9} {r['pair_ssim']:8.3f} "
                     f"{r['real_pair_ssim']:6.3f} {r['copy_rate']:6.3f} {r['steps']:6d} {r['kimg']:7.2f}")
    return '\n'.join(lines)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--minutes', type=float, default=5., help='training budget of each run (default 5)')
    ap.add_argument('--long', action='store_true', help='20-minute runs')
    ap.add_argument('--sets', default='mr,ct,mni,png,nifti,mixed')
    ap.add_argument('--recipes', default='tutorial,dcgan,style')
    ap.add_argument('--n', type=int, default=1000, help='samples scored per generator')
    ap.add_argument('--threads', type=int, default=2, help='torch threads of each training process')
    ap.add_argument('--out', default=str(ROOT/'_build'/'quality'))
    ap.add_argument('--child'); ap.add_argument('--set')
    args = ap.parse_args()
    if args.long: args.minutes = 20.
    if args.child: return child(args)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault('MEDGAN_CACHE', str(ROOT/'_build'/'bench_cache'))
    import torch
    torch.set_num_threads(args.threads)
    sets, recipes = args.sets.split(','), args.recipes.split(',')
    rows = []
    for s in sets:
        info = {}
        for name in recipes:  # one training at a time: each gets the machine to itself for its budget
            t = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, '--child', name, '--set', s, '--minutes', str(args.minutes),
                                '--threads', str(args.threads), '--out', args.out], capture_output=True, text=True)
            if r.returncode: sys.exit(f'{s}/{name} run failed:\n{r.stderr[-3000:]}')
            info[name] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f'{s}/{name}: {args.minutes:g} min budget ({time.perf_counter() - t:.0f} s with loading and export): '
                  f'{info[name]["steps"]} steps, {info[name]["kimg"]:.2f} kimg, bs {info[name]["bs"]}', flush=True)
        set_rows, fakes = score(s, recipes, args, info)
        rows += set_rows
        grids(s, fakes, out)
        save(out, args, rows)  # after every set: a run stopped later keeps the sets it finished
    print(f'\n{args.minutes:g} minutes per run, {SIZE} px, {args.threads} threads; SWD x1e3 of {args.n} samples against the '
          f'training slices (floor: real half vs half); pairSSIM of 64 samples vs 64 real slices (real)\n')
    print(table(rows))
    print(f'\ngrids (left to right: {", ".join(recipes)}): {out}/grids_SET.png')

def save(out:Path, args, rows):
    "Write the rows so far to `quality.json`, atomically"
    from medgan_fastai.persist import write_atomic
    text = json.dumps(dict(minutes=args.minutes, size=SIZE, threads=args.threads, rows=rows), indent=1)
    write_atomic(out/'quality.json', lambda p: Path(p).write_text(text), overwrite=True)

if __name__ == '__main__':
    main()
