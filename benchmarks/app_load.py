"""Load on the web app: N concurrent `/generate` requests through the API against a real `serve` process.

Starts `medgan_fastai.app.serve` in a child process on 127.0.0.1 (a style generator at the default widths, untrained:
the cost of a forward pass does not depend on the weights), sends `--n` requests at once with `gradio_client`, twice,
and checks that every one succeeds with the model's own image for its seed. Prints latency percentiles and the
server's resident memory (sampled every 20 ms, plus the kernel's high-water mark). References measured in the same run:
the model alone (one `GeneratorApp.image` call in this process) and one request at a time through the API, so the
ratios hold on a busy machine. Memory is bounded when the second burst does not raise the peak of the first.
Usage: python benchmarks/app_load.py [--n 50] [--size 64] [--arch style|dcgan]
"""
import argparse, os, socket, subprocess, sys, tempfile, threading, time
from pathlib import Path
import numpy as np, torch
from PIL import Image

os.environ.update(GRADIO_ANALYTICS_ENABLED='False', HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1')
from medgan_fastai.style import StyleGenerator
from medgan_fastai.models import DCGANGenerator
from medgan_fastai.persist import save_generator
from medgan_fastai.app import GeneratorApp

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def rss_mib(pid, field='VmRSS'):
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith(field): return int(line.split()[1]) / 1024
    return float('nan')

class RSSMonitor(threading.Thread):
    "Samples a process's resident memory until stopped; `peak` is the largest sample since `reset`"
    def __init__(self, pid, every=0.02):
        super().__init__(daemon=True); self.pid, self.every, self.peak, self.running = pid, every, 0., True
    def reset(self): self.peak = rss_mib(self.pid)
    def run(self):
        while self.running:
            try: self.peak = max(self.peak, rss_mib(self.pid))
            except (FileNotFoundError, ProcessLookupError): return
            time.sleep(self.every)

def percentiles(xs):
    xs = np.asarray(xs) * 1000
    return dict(p50=np.percentile(xs, 50), p90=np.percentile(xs, 90), p99=np.percentile(xs, 99), max=xs.max())

def fmt(d): return '  '.join(f'{k} {v:7.0f} ms' for k, v in d.items())

def burst(client, seeds):
    "Submit one request per seed at once; (latencies in s, results), in seed order"
    t0 = time.perf_counter()
    done = {}
    def finished(i):
        return lambda job: done.__setitem__(i, time.perf_counter() - t0)
    jobs = []
    for i, s in enumerate(seeds):
        job = client.submit(int(s), 0.7, api_name='/generate')
        job.add_done_callback(finished(i))
        jobs.append(job)
    results = []
    for j in jobs:
        try: results.append(j.result(timeout=600))
        except Exception as e: results.append(e)
    while len(done) < len(jobs): time.sleep(0.01)  # callbacks run just after `result` returns
    return [done[i] for i in range(len(jobs))], results

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=50); ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--arch', default='style', choices=['style', 'dcgan'])
    a = ap.parse_args()
    torch.manual_seed(0)
    G = StyleGenerator(a.size) if a.arch == 'style' else DCGANGenerator(a.size)
    tmp = Path(tempfile.mkdtemp(prefix='medgan_app_load_'))
    model = save_generator(G, tmp/'generator.pth')
    port = free_port()
    code = f"from medgan_fastai.app import serve; serve({str(model)!r}, port={port}, device='cpu', quiet=True)"
    server = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL, stderr=open(tmp/'server.log', 'w'))
    try:
        from gradio_client import Client
        url, t0 = f'http://127.0.0.1:{port}/', time.time()
        while True:
            try: client = Client(url, verbose=False, max_workers=max(64, a.n), analytics_enabled=False, download_files=str(tmp/'dl')); break
            except Exception:
                if server.poll() is not None or time.time() - t0 > 120: sys.exit(f'server did not start: see {tmp/"server.log"}')
                time.sleep(0.5)
        print(f'server up in {time.time() - t0:.1f} s; {a.arch} generator {a.size} px; torch threads here {torch.get_num_threads()}')
        mon = RSSMonitor(server.pid); mon.start()

        app = GeneratorApp(model, 'cpu', n_directions=0)
        expected = {s: np.asarray(app.image(s, 0.7)) for s in range(2 * a.n)}
        direct, single = [], []
        for s in range(12):  # interleaved, so both references see the same load from the rest of the machine
            t = time.perf_counter(); app.image(s, 0.7); direct.append(time.perf_counter() - t)
            t = time.perf_counter(); client.predict(s, 0.7, api_name='/generate'); single.append(time.perf_counter() - t)
        direct, single = direct[2:], single[2:]  # warm-up
        idle = rss_mib(server.pid)

        rounds, failures = [], 0
        for r in range(2):
            mon.reset()
            seeds = list(range(r * a.n, (r + 1) * a.n))
            t = time.perf_counter()
            lat, res = burst(client, seeds)
            wall = time.perf_counter() - t
            bad = [(s, x) for s, x in zip(seeds, res) if isinstance(x, Exception) or not np.array_equal(np.asarray(Image.open(x)), expected[s])]
            failures += len(bad)
            rounds.append((lat, wall, mon.peak, bad))

        ref_direct, ref_single = np.median(direct), np.median(single)
        print(f'\nreference: model alone (GeneratorApp.image)  median {ref_direct * 1000:7.1f} ms')
        print(f'reference: one request at a time via API   median {ref_single * 1000:7.1f} ms  ({ref_single / ref_direct:.1f}x the model alone)')
        print(f'server RSS when idle after warm-up: {idle:.0f} MiB')
        for r, (lat, wall, peak, bad) in enumerate(rounds):
            p = percentiles(lat)
            print(f'\nburst {r + 1}: {a.n} concurrent /generate: {a.n - len(bad)}/{a.n} succeeded with the right image, '
                  f'{wall:.2f} s wall, {a.n / wall:.1f} req/s')
            print(f'  latency  {fmt(p)}')
            print(f'  ratios   p50/one-at-a-time {p["p50"] / 1000 / ref_single:5.1f}x   max/(n x model alone) {p["max"] / 1000 / (a.n * ref_direct):5.2f}x')
            print(f'  server peak RSS {peak:.0f} MiB ({peak - idle:+.0f} MiB over idle)')
            for s, x in bad[:5]: print(f'  FAILED seed {s}: {x!r}'[:300])
        hwm = rss_mib(server.pid, 'VmHWM')
        print(f'\nserver peak RSS (kernel high-water mark) {hwm:.0f} MiB; burst 2 peak / burst 1 peak = {rounds[1][2] / rounds[0][2]:.3f}')
        mon.running = False
        if failures: sys.exit(f'{failures} requests failed')
    finally:
        server.terminate()
        try: server.wait(10)
        except subprocess.TimeoutExpired: server.kill()
