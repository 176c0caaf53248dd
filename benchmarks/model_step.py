"""Time of one GAN training step (one critic + one generator update, non-saturating loss, Adam) per architecture.

The reference is the seed's DCGAN (64 px, ngf=ndf=64) measured in the same run, interleaved, so ratios hold on a
noisy shared machine. Usage: python benchmarks/model_step.py [--size 64] [--bs 32] [--repeats 3] [--steps 5]
"""
import argparse, time
import torch
import torch.nn.functional as F
from medgan_fastai.models import DCGANGenerator, DCGANCritic
from medgan_fastai.style import StyleGenerator, StyleCritic

def make(name, size):
    if name == 'dcgan (seed)': return DCGANGenerator(size), DCGANCritic(size)
    if name == 'style (default)': return StyleGenerator(size), StyleCritic(size)
    if name == 'style (base 2048, max 256)': return StyleGenerator(size, channel_base=2048, channel_max=256), StyleCritic(size, channel_base=2048, channel_max=256)
    if name == 'style (base 512, max 128)': return StyleGenerator(size, channel_base=512, channel_max=128), StyleCritic(size, channel_base=512, channel_max=128)
    raise ValueError(name)

def step(g, d, og, od, real):
    bs = real.shape[0]
    with torch.no_grad(): fake = g(torch.randn(bs, g.z_dim))
    od.zero_grad(set_to_none=True)
    (F.softplus(-d(real)).mean() + F.softplus(d(fake)).mean()).backward(); od.step()
    og.zero_grad(set_to_none=True)
    for p in d.parameters(): p.requires_grad_(False)
    F.softplus(-d(g(torch.randn(bs, g.z_dim)))).mean().backward(); og.step()
    for p in d.parameters(): p.requires_grad_(True)

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--bs', type=int, default=32)
    ap.add_argument('--repeats', type=int, default=3); ap.add_argument('--steps', type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    names = ['dcgan (seed)', 'style (default)', 'style (base 2048, max 256)', 'style (base 512, max 128)']
    nets = {n: make(n, a.size) for n in names}
    opts = {n: (torch.optim.Adam(g.parameters(), 2e-3, betas=(0., 0.99)), torch.optim.Adam(d.parameters(), 2e-3, betas=(0., 0.99))) for n,(g,d) in nets.items()}
    real = torch.rand(a.bs, 1, a.size, a.size) * 2 - 1
    best = {n: float('inf') for n in names}
    for n in names: step(*nets[n], *opts[n], real)  # warm-up
    for _ in range(a.repeats):
        for n in names:
            t = time.perf_counter()
            for _ in range(a.steps): step(*nets[n], *opts[n], real)
            best[n] = min(best[n], (time.perf_counter() - t) / a.steps)
    print(f'{a.size} px, batch {a.bs}, {torch.get_num_threads()} threads; best of {a.repeats} x {a.steps} steps (one critic + one generator update)')
    ref = best[names[0]]
    for n in names:
        g,d = nets[n]
        print(f'{n:28} {best[n]*1000:8.0f} ms/step  {ref/best[n]:5.2f}x the seed DCGAN  '
              f'G {sum(p.numel() for p in g.parameters())/1e6:5.2f}M  D {sum(p.numel() for p in d.parameters())/1e6:5.2f}M params')
