"""Sample quality against training length: SWD (x1e3) of the EMA generator every `--every` kimg for the default `dcgan` and
`style` recipes on one real set ([quality], issue 15: "report the curve SWD vs kimg for both on one set").

Each recipe trains once through `run.train_run(..., kimg=N)` (auto-configuration, ADA, EMA: exactly `medgan train`); a callback
scores the sampling (EMA) generator every `--every` thousand real images: `--n` samples against the set's training slices,
with the time spent training so far (scoring time left out) and the samples' pair SSIM next to the real slices' (the
worst class of a conditional set: a late collapse shows there). For a conditional set (`mixed`) the samples come in the
classes' shares of the real slices. Writes `curve.json` and `curve.png` (SWD against kimg, and against training seconds) to `--out`.

`--snapshot K1,K2..` scores the sampling generator once more when it passes each K kimg, as the quality table does (`--n`
samples: SWD, pair SSIM, copy rate of `metrics.memorisation_audit` on 256), and saves 32 of its samples
(`RUN/snapshot_K.png`): the rows runs stopped at K1, K2.. would give, with the curve going on past them.
`--cpu-recipe T` configures each recipe as `medgan train` does on a CPU with T threads (batch, widths, R1 gamma, EMA
half-life, ADA speed from `run.auto_config(..., device='cpu')`, fp32), so that a GPU trains the CPU recipe image for image,
only faster: the curve in kimg then reads as the CPU run's.

usage: python benchmarks/quality_curve.py [--set mr] [--kimg 20] [--every 2] [--recipes dcgan,style] [--snapshot K] [--cpu-recipe 2]
       python benchmarks/quality_curve.py --source FOLDER [--label folder] ...   (any folder `medgan train` takes)
On a GPU the runs use the recipe's GPU choices (bf16, larger batches); the curve is in kimg, so it reads the same anywhere.
"""
import argparse, json, os, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # the sets, real slices and sampling of the quality table

def snapshot_row(G, real, classes, n:int, path:Path)->dict:
    "The quality table's scores of generator `G` (SWD, pair SSIM next to the real slices', copy rate), and 32 samples saved to `path`"
    from medgan_fastai.models import image_grid
    row, shown = quality.generator_scores(G, real, classes, n)
    image_grid(shown[:32], nrow=8).save(path)
    return row

def curve_callback(every:float, real, classes, n:int, rows:list, snapshots=(), snaps:list|None=None, folder:Path|None=None):
    "A callback scoring the sampling generator every `every` kimg into `rows` (and into `snaps` at each of `snapshots` kimg)"
    from fastai.callback.core import Callback
    from medgan_fastai.callbacks import gan_state, sampling_generator
    from medgan_fastai.metrics import swd
    from medgan_fastai.diversity import diversity_pairs
    pairs = diversity_pairs(64, 1000, 0)
    class SWDCurve(Callback):
        order = 96
        def before_fit(self): self.next,self.t0,self.scoring = every * 1000, time.perf_counter(), 0.
        def after_batch(self):
            st = gan_state(self.learn)
            due = [k for k in snapshots if st.n_img >= k * 1000 and k not in [s['at'] for s in snaps]]
            if self.training and due:
                t = time.perf_counter()
                row = snapshot_row(sampling_generator(self.learn), real, classes, n, folder/f'snapshot_{due[0]:g}.png')
                snaps.append(dict(at=due[0], kimg=round(st.n_img / 1000, 3), **row))
                self.scoring += time.perf_counter() - t
                print(f'\nsnapshot: {json.dumps(snaps[-1])}', flush=True)
            if not self.training or st.n_img < self.next: return
            self.next += every * 1000
            t = time.perf_counter()
            fake, fake_classes = quality.samples(sampling_generator(self.learn), n, classes)
            s = swd(real, fake, seed=0)['swd']
            div = quality.diversity(fake, fake_classes, real, classes, pairs)  # (samples', real slices') pair SSIM, worst class
            rows.append(dict(kimg=round(st.n_img / 1000, 3), swd=round(s, 2), train_s=round(t - self.t0 - self.scoring, 1),
                             pair_ssim=round(div[0], 3), real_pair_ssim=round(div[1], 3)))
            self.scoring += time.perf_counter() - t
            print(f'\ncurve: {json.dumps(rows[-1])}', flush=True)  # a line of its own, after any progress bar
    return SWDCurve()

def cpu_choices(options:dict, n_slices:int, threads:int)->dict:
    "The options `run.auto_config` chooses for `options` on a CPU with `threads` threads, and fp32: the CPU recipe, to run anywhere"
    import torch
    from medgan_fastai.run import Recipe, auto_config
    keep = torch.get_num_threads()
    torch.set_num_threads(threads)
    try: r, _ = auto_config(Recipe(size=quality.SIZE, **options).resolved(), n_slices, device='cpu')
    finally: torch.set_num_threads(keep)
    d = r.as_dict()
    return {**{k: d[k] for k in ('bs', 'width', 'r1_gamma', 'ema_kimg', 'ada_target', 'ada_kimg')}, 'precision': 'fp32'}

def plot(curves:dict, floor:float, path:Path, title:str):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in curves.items():
        for ax, x in zip(axs, ('kimg', 'train_s')): ax.plot([r[x] for r in rows], [r['swd'] for r in rows], marker='.', label=name)
    for ax, xl in zip(axs, ('thousand real images shown (kimg)', 'training seconds')):
        ax.axhline(floor, color='grey', ls='--', lw=1, label='real vs real')
        ax.set_xlabel(xl); ax.set_ylabel('SWD x1e3 (lower is better)'); ax.set_yscale('log'); ax.legend()
    fig.suptitle(title); fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--set', default='mr', help='a set of benchmarks/quality.py (mr, ct, mni, png, nifti, mixed)')
    ap.add_argument('--source', help='a folder instead of a named set'); ap.add_argument('--label', help="'folder' for class folders")
    ap.add_argument('--kimg', type=float, default=20.); ap.add_argument('--every', type=float, default=2.)
    ap.add_argument('--recipes', default='dcgan,style'); ap.add_argument('--n', type=int, default=500)
    ap.add_argument('--threads', type=int, default=2); ap.add_argument('--out', default=str(quality.ROOT/'_build'/'curve'))
    ap.add_argument('--snapshot', default='', help='K1,K2..: score the generator as the quality table does when it passes each')
    ap.add_argument('--cpu-recipe', type=int, metavar='T', help="train each recipe as configured on a CPU with T threads (fp32)")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from medgan_fastai.run import train_run
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    if a.source: opts, name = dict(source=a.source, **({'label': a.label} if a.label else {})), Path(a.source).name
    else: opts, name = quality.set_source(a.set, out), a.set
    real, classes = quality.slices_of(opts)
    floor = quality.real_floor(real)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f'CPU, {a.threads} threads'
    if a.cpu_recipe: dev += f', the recipes as on a CPU with {a.cpu_recipe} threads (fp32)'
    curves, snaps = {}, {}
    snapshots = sorted(float(k) for k in a.snapshot.split(',') if k)
    for r in a.recipes.split(','):
        print(f'{name}/{r}: {a.kimg:g} kimg on {dev}', flush=True)
        rows, snap, src = [], [], opts.get('source')
        ro = {**{k: v for k, v in opts.items() if k != 'source'}, **quality.RECIPES[r]}
        if a.cpu_recipe: ro.update(cpu_choices(ro, len(real), a.cpu_recipe))
        learn = train_run(src, out=out/name/r, force=True, kimg=a.kimg, size=quality.SIZE, seed=0, samples=16,
                          cbs=[curve_callback(a.every, real, classes, a.n, rows, snapshots, snap, out/name/r)], **ro)
        curves[r] = rows
        if snap: snaps[r] = snap
    print(f'\nSWD x1e3 of {a.n} EMA samples against the {len(real)} training slices of {name} (real vs real: {floor:.1f}); {dev}')
    print(f"{'kimg':>6} " + ' '.join(f'{r + " SWD (s) pairSSIM/real":>26}' for r in curves))
    for i in range(max(len(v) for v in curves.values())):
        cells = [f"{v[i]['swd']:8.1f} ({v[i]['train_s']:5.0f}s) {v[i]['pair_ssim']:.2f}/{v[i]['real_pair_ssim']:.2f}"
                 if i < len(v) else ' ' * 26 for v in curves.values()]
        print(f"{list(curves.values())[0][min(i, len(list(curves.values())[0]) - 1)]['kimg']:6.1f} " + ' '.join(cells))
    (out/'curve.json').write_text(json.dumps(dict(set=name, device=dev, floor=floor, n=a.n, curves=curves, snapshots=snaps), indent=1))
    plot(curves, floor, out/'curve.png', f'{name}, 64 px, {dev}: SWD of EMA samples against training length')
    print(f'wrote {out}/curve.json and {out}/curve.png')

if __name__ == '__main__':
    main()
