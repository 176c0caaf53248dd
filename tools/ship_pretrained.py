"""Ship the demo generators: copy the generators of two finished `medgan train` runs on the demo series into
`medgan_fastai/pretrained/` (weights stored as float16, computed in float32), with their model cards, a README that says the
exact commands, seeds, training time and metrics, and the reference pictures the docs show (`nbs/images/pretrained_*.png`).

The runs (each a plain `medgan train` on the bundled demo series, 64 px, on this project's 2-core CPU machine):
    medgan train --arch style --out runs/demo_style --epochs 60 --seed 42 --data-licence "..."
    medgan train --out runs/demo_dcgan --epochs 150 --seed 42 --data-licence "..."
    medgan evaluate runs/demo_style demo -n 500 ; medgan evaluate runs/demo_dcgan demo -n 500
usage: python tools/ship_pretrained.py RUN_STYLE RUN_DCGAN
"""
import json, shutil, sys
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
DST, IMAGES = ROOT/'medgan_fastai'/'pretrained', ROOT/'nbs'/'images'
SHIPPED = (('style.pth', 'demo', 0.7, 'pretrained_style.png'), ('dcgan.pth', 'demo-dcgan', 1.0, 'pretrained_dcgan.png'))

def half(src, dst):
    "The generator file at `src` with its floating weights stored as float16 (load_generator computes in float32)"
    state = torch.load(src, map_location='cpu', weights_only=True)
    state['state_dict'] = {k: v.half() if v.is_floating_point() else v for k,v in state['state_dict'].items()}
    state['info'] = {**state.get('info', {}), 'weights_stored_as': 'float16', 'source': 'demo: MNI152 2009a T1'}
    torch.save(state, dst)

def main(runs):
    from medgan_fastai.persist import load_generator
    from medgan_fastai.latent import generate
    from medgan_fastai.models import image_grid
    DST.mkdir(exist_ok=True)
    lines = ['# Generators trained on the demo series', '',
             'Both were trained by the project\'s own command on the bundled demo series (the MNI ICBM152 2009a T1 template '
             'written as an axial DICOM series, see the `data` page), 64 px, on a 2-core CPU machine, and scored by '
             '`medgan evaluate RUN demo -n 500` against the same slices. `load_generator(NAME)` loads them; `medgan serve demo` '
             'serves the style one. Weights are stored as float16 and computed in float32.', '']
    for run,(fname, name, psi, png) in zip(map(Path, runs), SHIPPED):
        cfg,tr = (json.loads((run/f).read_text()) for f in ('config.json', 'training.json'))
        met = json.loads((run/'metrics.json').read_text())['metrics'] if (run/'metrics.json').exists() else {}
        half(run/'generator.pth', DST/fname)
        stem = Path(fname).stem
        last = max(run.glob('samples/epoch_*.png'), key=lambda p: int(p.stem.split('_')[1]))
        shutil.copy(run/'loss.png', DST/f'{stem}_loss.png'); shutil.copy(last, DST/f'{stem}_samples.png')
        card = (run/'model_card.md').read_text().replace('](loss.png)', f']({stem}_loss.png)')
        card = card.replace(f']({last.relative_to(run).as_posix()})', f']({stem}_samples.png)')
        (DST/f'{stem}_model_card.md').write_text(card)
        g = load_generator(name, device='cpu')
        image_grid(generate(g, list(range(16)), psi=psi), nrow=8).save(IMAGES/png)
        cmd = f"medgan train{' --arch style' if cfg['arch'] == 'style' else ''} --out runs/demo_{cfg['arch']} --epochs {tr['epochs']} --seed {cfg['seed']}"
        lines += [f"## `{name}`: {cfg['arch']} ({fname}, {(DST/fname).stat().st_size / 2**20:.1f} MB)", '', f'    {cmd}', '',
                  f"{tr['epochs']} epochs, {tr['kimg']} kimg, {tr['wall_time_s'] / 60:.1f} minutes on {tr['hardware']}; seed {cfg['seed']}; "
                  f"{tr['slices']} slices. Resolved recipe: loss {cfg['loss']}, lr {cfg['lr_g']}, batch {cfg['bs']}, augment {cfg['augment']}, "
                  f"EMA {cfg['ema']}, R1 gamma {cfg['r1_gamma']}.", '',
                  'Metrics: ' + (', '.join(f'{k} {v:.4g}' for k,v in met.items()) or 'not evaluated'), '',
                  f'Seeds 0-15 (psi {psi}): `nbs/images/{png}`; model card: `{Path(fname).stem}_model_card.md`.', '']
    (DST/'README.md').write_text('\n'.join(lines))
    print('\n'.join(lines))

if __name__ == '__main__': main(sys.argv[1:3])
