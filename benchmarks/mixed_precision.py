"""Mixed precision on a GPU: training images/second of the style GAN (StyleGAN2's widths) at 256 px in fp32 and bf16 (and
channels_last), and the whole default recipe (ADA, lazy R1, EMA) in bf16, measured in the same run: seconds per kimg (thousand
real images shown to the critic, the unit of NVlabs' StyleGAN2-ADA table: 21.6-24.2 s/kimg at 256 px on one V100), peak GPU
memory, and the fraction of the GPU's bf16 matmul rate (measured here on a large matmul) the bf16 step reaches.

Usage: .venv/bin/python benchmarks/mixed_precision.py [--size 256] [--bs 32] [--batches 40]
On a machine without a GPU it says so and exits 0 (`--cpu-check` runs the same code on a tiny model on CPU, to test the script).
"""
import argparse, sys, time
import torch

def _dls(size:int, bs:int, n_batches:int, z_dim:int, device):
    "DataLoaders of random (noise, image) batches: the data's content does not change the time of a step"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.vision.gan import InvisibleTensor
    class Toy(torch.utils.data.Dataset):
        def __len__(self): return bs * n_batches
        def __getitem__(self, i): return InvisibleTensor(torch.randn(z_dim)), torch.rand(1, size, size) * 2 - 1
    dls = DataLoaders(DataLoader(Toy(), bs=bs, shuffle=True, drop_last=True, num_workers=0), device=device)
    dls.z_dim = z_dim
    return dls

def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()

def train_rate(precision:str, size:int, bs:int, n_batches:int, device, channels_last=False, g_kwargs=None, c_kwargs=None,
               cpu_autocast=None, recipe=False):
    """Images/second of `fit(1)` (one critic and one generator update per batch) after a warm-up epoch, the FLOPs of one batch
    and the peak memory of the timed epoch; `recipe`: the whole default recipe (ADA, EMA) rather than the bare nets"""
    from torch.utils.flop_counter import FlopCounterMode
    from medgan_fastai.learner import gan_learner, GANMixedPrecision
    g_kwargs = dict(g_kwargs or {})
    z_dim = g_kwargs.pop('z_dim', 128)  # the noise length comes from the data
    dls = _dls(size, bs, n_batches, z_dim, device)
    cbs = [GANMixedPrecision(cpu_autocast, device_type='cpu')] if cpu_autocast else []
    learn = gan_learner(dls, arch='style', seed=0, precision=precision, channels_last=channels_last,
                        augment='ada' if recipe else None, ema=recipe, g_kwargs=g_kwargs, c_kwargs=c_kwargs, cbs=cbs)
    learn.remove_cb(learn.progress) if hasattr(learn, 'progress') else None
    learn.logger = lambda *args: None  # no epoch table
    learn.fit(1)  # warm-up: kernels chosen, memory allocated
    _sync(device)
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter(); learn.fit(1); _sync(device); dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if device.type == 'cuda' else 0
    # FLOPs of one training batch (both updates, forward and backward), as torch counts them; without the lazy R1 term
    # (every 16th critic step; torch's FLOP counter cannot follow its double backward)
    b = dls.one_batch()
    learn.r1_gamma = 0.
    with FlopCounterMode(display=False) as fc:
        learn.xb,learn.yb = (b[0],),(b[1],)
        learn.training = True
        for cb in learn.cbs:
            if isinstance(cb, GANMixedPrecision): cb.before_fit(); cb.before_batch()
        learn._do_one_batch()
        for cb in learn.cbs:
            if isinstance(cb, GANMixedPrecision): cb.after_batch()
    return bs * n_batches / dt, fc.get_total_flops(), learn.precision, peak

def matmul_rate(device, dtype=torch.bfloat16, n:int=8192, reps:int=20)->float:
    "FLOP/s of a large square matmul in `dtype`: the GPU's practical peak for that dtype"
    a,b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3): a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps): a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', type=int, default=256)
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--batches', type=int, default=40)
    p.add_argument('--cpu-check', action='store_true', help='run the measurement code on a tiny model on CPU (to test this script)')
    a = p.parse_args()
    if not torch.cuda.is_available() and not a.cpu_check:
        print('benchmarks/mixed_precision.py needs a CUDA GPU (none here): nothing measured. '
              'On a GPU machine: .venv/bin/python benchmarks/mixed_precision.py')
        return 0
    if a.cpu_check:
        device,size,bs,nb = torch.device('cpu'),32,8,4
        kw = dict(g_kwargs=dict(channel_base=128, channel_max=16, w_dim=16, z_dim=16), c_kwargs=dict(channel_base=128, channel_max=16))
        runs = [('fp32', dict()), ('bf16 (CPU autocast)', dict(cpu_autocast='bf16')),
                ('recipe fp32', dict(recipe=True))]
        print('CPU check of the script (tiny model, 32 px); the figures mean nothing')
    else:
        device,size,bs,nb = torch.device('cuda'),a.size,a.bs,a.batches
        # the widths StyleGAN2 uses at this size (ours default to CPU-friendly ones)
        kw = dict(g_kwargs=dict(channel_base=16384, channel_max=512, w_dim=512, z_dim=512),
                  c_kwargs=dict(channel_base=16384, channel_max=512))
        runs = [('fp32', dict(precision='fp32')), ('bf16', dict(precision='bf16')),
                ('bf16 + channels_last', dict(precision='bf16', channels_last=True)),
                ('recipe bf16 (ADA+R1+EMA)', dict(precision='bf16', recipe=True))]
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        torch.backends.cudnn.allow_tf32 = False
        print(f'{torch.cuda.get_device_name(0)}, style GAN at {size} px, batch {bs}, {nb} batches per timed epoch')
    res = {}
    for name,opt in runs:
        rate,flops,prec,mem = train_rate(opt.get('precision', 'fp32'), size, bs, nb, device, opt.get('channels_last', False),
                                         cpu_autocast=opt.get('cpu_autocast'), recipe=opt.get('recipe', False), **kw)
        res[name] = (rate, flops)
        print(f'{name:26} {rate:8.1f} images/s = {1000 / rate:6.2f} s/kimg   peak memory {mem / 2**30:5.2f} GiB   '
              f'({flops / bs / 1e9:.2f} GFLOP per image per training step; ran as {prec})', flush=True)
    base = res[runs[0][0]][0]
    for name,(rate,_) in list(res.items())[1:]: print(f'{name} / fp32: x{rate / base:.2f}')
    peak = matmul_rate(device, torch.bfloat16, n=1024 if a.cpu_check else 8192, reps=2 if a.cpu_check else 20)
    best = max((r for n,r in res.items() if 'bf16' in n and 'recipe' not in n), key=lambda r: r[0])
    achieved = best[0] / bs * best[1]
    print(f'bf16 matmul rate measured: {peak / 1e12:.1f} TFLOP/s; best bf16 training step (nets alone): '
          f'{achieved / 1e12:.1f} TFLOP/s = {achieved / peak:.1%} of it')
    if not a.cpu_check:
        r = [v for n,v in res.items() if 'recipe' in n][0][0]
        print(f'whole recipe in bf16: {1000 / r:.2f} s/kimg at {size} px, batch {bs}; NVlabs StyleGAN2-ADA on one V100 at 256 px: '
              f'21.6-24.2 s/kimg (its own widths and regularisers, fp16 in its top layers)')
    return 0

if __name__ == '__main__': sys.exit(main())
