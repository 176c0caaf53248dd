"The generators shipped with the library: they load safely, reproduce the documented images, and `medgan serve demo` serves one."
import os, subprocess, sys, time, urllib.request
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from medgan_fastai.persist import PRETRAINED, PRETRAINED_DIR, load_generator, model_file
from medgan_fastai.latent import generate
from medgan_fastai.models import image_grid

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = {'demo': (ROOT/'nbs'/'images'/'pretrained_style.png', 0.7), 'demo-dcgan': (ROOT/'nbs'/'images'/'pretrained_dcgan.png', 1.0)}

@pytest.mark.parametrize('name', sorted(set(PRETRAINED.values())))
def test_shipped_files_are_plain_weights(name):
    state = torch.load(PRETRAINED_DIR/name, weights_only=True)   # tensors and plain values only: no code runs
    assert state['format'] == 'medgan_fastai.generator' and (PRETRAINED_DIR/name).stat().st_size < 10 * 2**20

@pytest.mark.parametrize('name', sorted(DOCUMENTED))
def test_shipped_models_reproduce_the_documented_images(name):
    "The pictures in the docs are what `load_generator(name)` gives for seeds 0-15 on any machine (8-bit, within one grey level)"
    png, psi = DOCUMENTED[name]
    g = load_generator(name, device='cpu')
    got = np.asarray(image_grid(generate(g, list(range(16)), psi=psi), nrow=8), np.int16)
    want = np.asarray(Image.open(png), np.int16)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1
    assert model_file(name).parent == PRETRAINED_DIR and g.size == 64

def test_the_shipped_models_are_trained():
    "Their average image is the demo slices' average head (fresh weights give noise around no head), and each seed differs"
    from medgan_fastai.data import gan_dls
    from medgan_fastai.models import DCGANGenerator
    from medgan_fastai.style import StyleGenerator
    dls = gan_dls(size=64, bs=32, progress=False, verbose=False)
    real_mean = (dls.cache.gather(list(dls.train_ds.items)) * 2 - 1).mean(0).flatten().numpy()
    corr = lambda x: float(np.corrcoef(x.mean(0).flatten().numpy(), real_mean)[0, 1])
    for name, fresh in (('demo', StyleGenerator), ('demo-dcgan', DCGANGenerator)):
        x = generate(load_generator(name, device='cpu'), list(range(32)))
        torch.manual_seed(0)
        y = generate(fresh(64).eval(), list(range(32)))
        assert corr(x) > 0.9 and corr(y) < 0.6, (name, corr(x), corr(y))
        assert x.std(0).mean() > 0.1, name

def test_medgan_serve_demo_serves_the_shipped_model(tmp_path):
    "On a fresh clone `medgan serve demo` starts and its page shows the shipped generator's image for seed 0"
    sync_api = pytest.importorskip('playwright.sync_api')
    sock = __import__('socket').socket(); sock.bind(('127.0.0.1', 0)); port = sock.getsockname()[1]; sock.close()
    log = open(tmp_path/'log.txt', 'w')
    p = subprocess.Popen([str(Path(sys.executable).parent/'medgan'), 'serve', 'demo', '--port', str(port), '--device', 'cpu'],
                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, 'MEDGAN_CACHE': str(tmp_path/'cache')})
    url = f'http://127.0.0.1:{port}/'
    try:
        start = time.monotonic()
        while True:
            try: urllib.request.urlopen(url, timeout=2).close(); break
            except OSError:
                assert p.poll() is None and time.monotonic() - start < 300, (tmp_path/'log.txt').read_text()[-3000:]
                time.sleep(0.5)
        pw = sync_api.sync_playwright().start()
        b = pw.chromium.launch(executable_path='/usr/bin/chromium', headless=True,
                               args=['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
                                     '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1'])
        try:
            page = b.new_page(viewport={'width': 1280, 'height': 900})
            page.goto(url)
            img = page.locator('#image img')
            img.wait_for(timeout=120_000)
            shown = np.asarray(Image.open(__import__('io').BytesIO(page.request.get(img.get_attribute('src')).body())).convert('L'), np.int16)
            page.screenshot(path=str(tmp_path/'serve_demo.png'), full_page=True)
        finally: b.close(); pw.stop()
        g = load_generator('demo', device='cpu')
        want = np.round(((generate(g, [0], psi=0.7)[0, 0].clamp(-1, 1) + 1) / 2).numpy() * 255).astype(np.int16)
        assert shown.shape == want.shape and np.abs(shown - want).max() <= 1
    finally:
        p.terminate(); p.wait(timeout=60)
