"""What the tasks after each epoch cost a training run: `medgan train`'s sample grids, collapse watch and checkpoints run
after every epoch (`--overhead 0`) or paced to at most a 3% share of the time each (`--overhead 0.03`, the default;
`callbacks.Pace`), measured in the same run on the same data, one training at a time.

Each run trains in its own process through `run.train_run(..., minutes=M)` with the recipe's defaults (64 px, seed 0),
on the sets of `benchmarks/quality.py` (`ct`: 28 head CT slices, four batches an epoch; `mr`: 134 MR slices;
`mixed`: four classes, 479 slices, conditional). Prints thousands of real images shown per minute of training for both
settings and their ratio (paced / every epoch): the share of a run the tasks took, given back to training.

usage: python benchmarks/bookkeeping.py [--minutes 1.5] [--sets ct,mr] [--archs dcgan,style] [--threads 2]
"""
import argparse, json, subprocess, sys, tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

def child(args):
    import torch
    torch.set_num_threads(args.threads)
    import quality
    from medgan_fastai.run import train_run
    out = Path(args.out)/f'{args.set}_{args.arch}_{args.overhead:g}'
    opts = {**quality.set_source(args.set, Path(args.out)), 'arch': args.arch}
    source = opts.pop('source')
    train_run(source, out=out, force=True, minutes=args.minutes, size=quality.SIZE, seed=0, samples=16, overhead=args.overhead, **opts)
    tr = json.loads((out/'training.json').read_text())
    files = lambda d: len(list((out/d).glob('epoch_*')))
    print(json.dumps(dict(kimg=tr['kimg'], epochs=tr['epochs'], grids=files('samples'))))

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--minutes', type=float, default=1.5)
    ap.add_argument('--sets', default='ct,mr')
    ap.add_argument('--archs', default='dcgan,style')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', default=None, help='work folder (default: a temporary one)')
    ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--set', help=argparse.SUPPRESS); ap.add_argument('--arch', help=argparse.SUPPRESS)
    ap.add_argument('--overhead', type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child: return child(args)
    out = Path(args.out or tempfile.mkdtemp(prefix='bookkeeping_'))
    print(f'{args.minutes:g} minutes of training per run, {args.threads} threads, 64 px, one run at a time; work folder {out}')
    print(f'{"set":6s} {"arch":6s} {"every epoch":>22s} {"paced (3%)":>22s} {"ratio":>6s}')
    for s in args.sets.split(','):
        for a in args.archs.split(','):
            res = {}
            for o in (0., 0.03):
                cmd = [sys.executable, __file__, '--child', '--set', s, '--arch', a, '--overhead', str(o), '--minutes', str(args.minutes),
                       '--threads', str(args.threads), '--out', str(out)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode: sys.exit(f'{s} {a} overhead {o} failed:\n{r.stderr[-3000:]}')
                res[o] = json.loads(r.stdout.strip().splitlines()[-1])
            rate = {o: d['kimg'] / args.minutes for o, d in res.items()}
            cell = lambda o: f'{rate[o]:5.2f} kimg/min ({res[o]["grids"]:3d} grids)'
            print(f'{s:6s} {a:6s} {cell(0.):>22s} {cell(0.03):>22s} {rate[0.03] / rate[0.]:6.2f}', flush=True)

if __name__ == '__main__':
    main()
