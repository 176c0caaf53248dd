"The web app in three layers: its pure functions, its API through `gradio_client`, and the page in headless Chromium."
import io, json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.error, urllib.request, warnings
from types import SimpleNamespace
from pathlib import Path
import numpy as np, pydicom, pytest, torch
from PIL import Image
from medgan_fastai.style import StyleGenerator
from medgan_fastai.models import DCGANGenerator
from medgan_fastai.persist import save_generator, load_generator
from medgan_fastai.latent import generate, style_mix, interpolate, move
from medgan_fastai.app import *

SCREENSHOT_COPY = Path('/tmp/app_screenshot.png')

@pytest.fixture(scope='module')
def style_file(tmp_path_factory):
    torch.manual_seed(0)
    G = StyleGenerator(size=32, channel_base=64, channel_max=32, z_dim=32, w_dim=32, n_mapping=2)
    return save_generator(G, tmp_path_factory.mktemp('style')/'generator.pth', window='brain')  # no data recorded: filter off

@pytest.fixture(scope='module')
def dcgan_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_generator(DCGANGenerator(size=32, z_dim=16, ngf=8), tmp_path_factory.mktemp('dcgan')/'generator.pth')

@pytest.fixture(scope='module')
def style_app(style_file, tmp_path_factory): return GeneratorApp(style_file, 'cpu', out_dir=tmp_path_factory.mktemp('exports'))

@pytest.fixture(scope='module')
def reference(style_file): return load_generator(style_file, 'cpu')

def pixels(img) -> np.ndarray:
    "The 8-bit grayscale pixels of a PIL image, a PNG path or PNG bytes"
    if isinstance(img, (bytes, bytearray)): img = io.BytesIO(img)
    if not isinstance(img, Image.Image): img = Image.open(img)
    return np.asarray(img.convert('L') if img.mode != 'L' else img)

def as_8bit(images) -> np.ndarray:
    "The model's own output `(1, 1, h, w)` in [-1, 1] as the 8-bit image a viewer should show"
    return ((images.clamp(-1, 1) + 1) / 2 * 255).round().byte()[0, 0].numpy()

# --- the pure functions --------------------------------------------------------------------------------------

def test_image_is_the_models_output_for_the_seed(style_app, reference):
    for seed in (0, 1, MAX_SEED):
        np.testing.assert_array_equal(pixels(style_app.image(seed, 0.7)), as_8bit(generate(reference, [seed], psi=0.7)))
    assert not np.array_equal(pixels(style_app.image(1, 0.7)), pixels(style_app.image(2, 0.7)))
    assert not np.array_equal(pixels(style_app.image(1, 0.7)), pixels(style_app.image(1, 1.0)))

def test_controls_are_bounded(style_app):
    for bad in (-1, MAX_SEED + 1, 1.5, 'x', float('inf')):
        with pytest.raises(ValueError, match='seed'): style_app.image(bad)
    with pytest.raises(ValueError, match='psi'): style_app.image(0, 2.5)
    with pytest.raises(ValueError, match='grid size'): style_app.grid(0, MAX_GRID + 1)
    with pytest.raises(ValueError, match='steps'): style_app.interpolation(0, 1, MAX_STEPS + 1)
    with pytest.raises(ValueError, match='crossover'): style_app.mix(0, 1, style_app.num_ws + 1)
    with pytest.raises(ValueError, match='window width'): style_app.image(0, 0.7, 0.5, 0)
    with pytest.raises(ValueError, match='directions'): style_app.images(0, 0.7, [1.] * (style_app.n_directions + 1))

def test_window_level_changes_contrast(style_app):
    full, narrow = pixels(style_app.image(3, 0.7)).astype(int), pixels(style_app.image(3, 0.7, 0.5, 0.5)).astype(int)
    assert narrow.std() > full.std()
    # inside the narrow window every grey level is stretched twice as far from the middle
    inside = (full > 64) & (full < 191)
    np.testing.assert_allclose(narrow[inside] - 127.5, 2 * (full[inside] - 127.5), atol=2)

def test_directions_move_the_image_as_move_does(style_app, reference):
    amounts = [0.] * style_app.n_directions
    amounts[0] = 2.
    torch.testing.assert_close(style_app.images(5, 0.7, amounts), move(reference, 5, style_app.directions, 0, [2.], psi=0.7),
                               atol=1e-5, rtol=0)
    two = amounts[:]; two[1] = -1.5
    assert not torch.equal(style_app.images(5, 0.7, two), style_app.images(5, 0.7, amounts))

def test_grid_mix_and_interpolation(style_app, reference):
    g = pixels(style_app.grid(10, 4, 0.7))
    assert g.shape == (2 + 2 * 34, 2 + 2 * 34)
    np.testing.assert_array_equal(g[36:68, 2:34], as_8bit(generate(reference, [12], psi=0.7)))  # row 2, column 1
    np.testing.assert_array_equal(pixels(style_app.mix(3, 4, 2, 0.7)), as_8bit(style_mix(reference, 3, 4, 2, psi=0.7)))
    strip = pixels(style_app.interpolation(3, 4, 5, 'w', 0.7))
    np.testing.assert_array_equal(strip[2:34, 2 + 4 * 34:34 + 4 * 34], as_8bit(interpolate(reference, 3, 4, 5, 'w', 0.7)[-1:]))
    gif = Image.open(style_app.animation(3, 4, 5))
    assert gif.format == 'GIF' and gif.n_frames == 8 and gif.size == (256, 256)

def test_export_writes_png_and_synthetic_dicom(style_app, reference):
    png, dcm = map(Path, style_app.export(9, 0.7, 0.4, 0.8))
    assert png.suffix == '.png' and dcm.suffix == '.dcm' and png.parent == dcm.parent
    with Image.open(png) as im: assert im.mode.startswith('I;16') and im.size == (32, 32)
    ds = pydicom.dcmread(dcm)
    assert ds.PatientName == 'SYNTHETIC^MEDGAN' and ds.PatientIdentityRemoved == 'YES' and 'SYNTHETIC' in ds.SeriesDescription
    assert 'seed 9' in ds.SeriesDescription and 'not from a patient' in ds.ImageComments
    raw = ((generate(reference, [9], psi=0.7)[0, 0] + 1) / 2).numpy()
    np.testing.assert_allclose(ds.pixel_array / 65535, raw, atol=1e-4)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == pytest.approx((0.4 * 65535, 0.8 * 65535), abs=1)

def test_exports_are_pruned(style_file, tmp_path):
    app = GeneratorApp(style_file, 'cpu', n_directions=0, out_dir=tmp_path, keep_exports=3)
    for seed in range(6): app.export(seed)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3

def test_dcgan_has_no_style_controls(dcgan_file):
    app = GeneratorApp(dcgan_file, 'cpu')
    assert not app.styled and app.directions is None and app.n_directions == 0
    np.testing.assert_array_equal(pixels(app.image(4, 0.2)), as_8bit(generate(load_generator(dcgan_file, 'cpu'), [4])))
    with pytest.raises(ValueError, match='style-based'): app.mix(1, 2, 1)
    assert pixels(app.interpolation(1, 2, 3, 'w')).shape == (36, 2 + 3 * 34)  # DCGAN walks in z
    demo = build_app(app)
    hidden = {b.elem_id for b in demo.blocks.values() if getattr(b, 'elem_id', None) and b.visible is False}
    assert 'psi' in hidden
    assert not [b for b in demo.blocks.values() if getattr(b, 'elem_id', '') and str(b.elem_id).startswith('direction-')]

def test_exposure_warning():
    assert exposure_warning('127.0.0.1', 7860) is None and exposure_warning('localhost', 1) is None
    assert exposure_warning('::1', 1) is None
    assert '0.0.0.0' in exposure_warning('0.0.0.0', 7860) and exposure_warning('10.1.2.3', 80)

def test_app_does_not_import_the_training_stack():
    "The app serves a generator file: it must not pay for, or depend on, fastai's Learner and our training callbacks"
    code = ("import sys, medgan_fastai.app; "
            "print([m for m in ('fastai.learner', 'medgan_fastai.learner', 'medgan_fastai.callbacks') if m in sys.modules])")
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip() == '[]'

def test_bad_model_file_names_it(tmp_path):
    from medgan_fastai.persist import CheckpointError
    bad = tmp_path/'generator.pth'
    bad.write_bytes(b'not a model')
    with pytest.raises(CheckpointError, match='generator.pth'): GeneratorApp(bad)

def app_process(code: str, tmp: Path) -> subprocess.CompletedProcess:
    "Run `code` in a new Python process whose temporary folder is `tmp`, as a script or `medgan serve` would run"
    return subprocess.run([sys.executable, '-c', code], env={**os.environ, 'TMPDIR': str(tmp)}, capture_output=True, text=True,
                          timeout=300)

def app_folders(root: Path) -> list: return sorted(Path(root).glob('medgan_app_*'))

def test_app_folder_is_removed_at_exit(style_file, tmp_path):
    "A script that makes an app (and a download) and ends leaves no temporary folder behind"
    r = app_process(f"from medgan_fastai.app import GeneratorApp; a = GeneratorApp({str(style_file)!r}, 'cpu', n_directions=0); "
                    "a.export(0); print(a.out_dir)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == tmp_path and not app_folders(tmp_path)

def test_stale_app_folders_are_removed_on_start(style_file, tmp_path, monkeypatch):
    "On start the app removes the folders of app processes that ended without cleaning up, and only those"
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    mine = GeneratorApp(style_file, 'cpu', n_directions=0)  # its owner, this process, still runs
    foreign = tmp_path/'medgan_app_not_ours'
    foreign.mkdir(); (foreign/'notes.txt').write_text('not made by the app')
    killed = app_process("import os, signal; from medgan_fastai.app import GeneratorApp; "
                         f"a = GeneratorApp({str(style_file)!r}, 'cpu', n_directions=0); a.export(0); print(a.out_dir, flush=True); "
                         "os.kill(os.getpid(), signal.SIGKILL)", tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stale = Path(killed.stdout.strip())
    assert stale.parent == tmp_path and any(stale.rglob('*.dcm'))  # left behind: a killed process cannot clean up
    started = GeneratorApp(style_file, 'cpu', n_directions=0)
    assert not stale.exists()
    assert mine.out_dir.is_dir() and (foreign/'notes.txt').read_text() == 'not made by the app'
    assert set(app_folders(tmp_path)) == {mine.out_dir, started.out_dir, foreign}

def test_page_shows_the_data_folder_name_only(dcgan_file, tmp_path):
    "The training data's server-side path stays in the run folder: the page shows the folder's name"
    model = save_generator(load_generator(dcgan_file, 'cpu'), tmp_path/'generator.pth', source='/some/secret/dir/scans')
    app = GeneratorApp(model, 'cpu', out_dir=tmp_path/'exports', privacy_filter=False)  # the data is not there
    assert '/some/secret/dir' not in app.describe() and 'scans' in app.describe()
    config = json.dumps(build_app(app).get_config_file())
    assert '/some/secret/dir' not in config and 'scans' in config

TEXT_VRS = {'AE', 'AS', 'CS', 'DA', 'DS', 'DT', 'IS', 'LO', 'LT', 'PN', 'SH', 'ST', 'TM', 'UC', 'UI', 'UR', 'UT'}

def dicom_text(ds) -> str:
    "Every text value in `ds` and its file meta, nested sequences included"
    out = []
    for d in (ds.file_meta, ds): d.walk(lambda _, el: out.append(str(el.value)) if el.VR in TEXT_VRS else None)
    return ' | '.join(out)

@pytest.fixture(scope='module')
def conditional(tmp_path_factory):
    torch.manual_seed(0)
    return StyleGenerator(size=32, channel_base=64, channel_max=32, z_dim=32, w_dim=32, n_mapping=2, n_classes=2)

def test_dicom_export_writes_class_index_not_name(conditional, tmp_path):
    "Class names read from a tag (here PatientName) can be a patient's name: downloads carry the class index"
    model = save_generator(conditional, tmp_path/'generator.pth', vocab=['DOE^JOHN', 'SMITH^JANE'])
    app = GeneratorApp(model, 'cpu', n_directions=0, out_dir=tmp_path/'exports')
    for label, k in (('DOE^JOHN', 0), ('SMITH^JANE', 1), (1, 1)):
        png, dcm = map(Path, app.export(3, 0.7, label=label))
        ds = pydicom.dcmread(dcm)
        text = dicom_text(ds) + png.name + dcm.name
        assert not [w for w in ('DOE', 'JOHN', 'SMITH', 'JANE') if w in text], text
        assert f'class {k}' in ds.SeriesDescription and f'class{k}' in dcm.name

def test_dicom_export_writes_class_names_from_a_users_map(conditional, tmp_path):
    "Names the user wrote in a label map are theirs to export; the raw values they map from stay off the page"
    model = save_generator(conditional, tmp_path/'generator.pth', vocab=['normal', 'tumour'],
                           label_map={'DOE^JOHN': 'normal', 'SMITH^JANE': 'tumour'})
    app = GeneratorApp(model, 'cpu', n_directions=0, out_dir=tmp_path/'exports')
    png, dcm = map(Path, app.export(3, 0.7, label='tumour'))
    assert 'class tumour' in pydicom.dcmread(dcm).SeriesDescription and 'tumour' in dcm.name
    assert 'tumour' in app.describe() and 'DOE' not in app.describe() and 'SMITH' not in app.describe()

# --- the API, through gradio_client ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def listening_addresses(port: int) -> set:
    "Local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)"
    out = set()
    for f in ('/proc/net/tcp', '/proc/net/tcp6'):
        if not Path(f).exists(): continue
        for line in Path(f).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(':')
            if state == '0A' and int(p, 16) == port: out.add(addr)
    return out

@pytest.fixture(scope='module')
def server(style_file):
    demo = serve(style_file, port=free_port(), device='cpu', block=False, quiet=True)
    yield demo
    demo.close()

@pytest.fixture(scope='module')
def client(server):
    from gradio_client import Client
    return Client(server.local_url, verbose=False, analytics_enabled=False)

def test_server_listens_on_loopback_only(server):
    port = int(server.local_url.rstrip('/').rsplit(':', 1)[1])
    assert server.local_url.startswith('http://127.0.0.1:') and server.share_url is None
    assert listening_addresses(port) == {'0100007F'}  # 127.0.0.1, nothing else

def test_api_generate_is_the_models_output(client, reference):
    for seed in (0, 77, MAX_SEED):
        np.testing.assert_array_equal(pixels(client.predict(seed, 0.7, api_name='/generate')), as_8bit(generate(reference, [seed], psi=0.7)))
    moved = client.predict(5, 0.7, 0.5, 1.0, 2.0, api_name='/generate')
    assert not np.array_equal(pixels(moved), pixels(client.predict(5, 0.7, api_name='/generate')))

def test_api_endpoints(client, reference):
    names = set(client.view_api(print_info=False, return_format='dict')['named_endpoints'])
    assert names == {'/generate', '/export', '/grid', '/mix', '/interpolate', '/animate'}
    assert pixels(client.predict(0, 9, api_name='/grid')).shape == (2 + 3 * 34, 2 + 3 * 34)
    np.testing.assert_array_equal(pixels(client.predict(3, 4, 2, 0.7, api_name='/mix')), as_8bit(style_mix(reference, 3, 4, 2, psi=0.7)))
    assert pixels(client.predict(3, 4, 6, 'w', api_name='/interpolate')).shape == (36, 2 + 6 * 34)
    assert Image.open(client.predict(3, 4, 4, 'z', api_name='/animate')).n_frames == 6
    png, dcm = client.predict(11, 0.7, api_name='/export')
    ds = pydicom.dcmread(dcm)
    assert ds.PatientName == 'SYNTHETIC^MEDGAN' and 'seed 11' in ds.SeriesDescription and Path(png).suffix == '.png'

def test_api_refuses_out_of_range_inputs(client):
    from gradio_client.exceptions import AppError
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for args, name in [((MAX_SEED + 1, 0.7), '/generate'), ((-1, 0.7), '/generate'), ((0, 3.0), '/generate'),
                           ((0, MAX_GRID + 1), '/grid'), ((0, 1, 999), '/mix'), ((0, 1, MAX_STEPS + 1), '/interpolate')]:
            with pytest.raises(AppError): client.predict(*args, api_name=name)
    assert pixels(client.predict(1, 0.7, api_name='/generate')).shape == (32, 32)  # still serving

def test_dcgan_api_has_no_mixing(dcgan_file):
    from gradio_client import Client
    demo = serve(dcgan_file, port=free_port(), device='cpu', block=False, quiet=True)
    try:
        c = Client(demo.local_url, verbose=False, analytics_enabled=False)
        assert '/mix' not in c.view_api(print_info=False, return_format='dict')['named_endpoints']
        np.testing.assert_array_equal(pixels(c.predict(4, api_name='/generate')), as_8bit(generate(load_generator(dcgan_file, 'cpu'), [4])))
    finally: demo.close()

# --- `serve` in its own process, as `medgan serve` runs it ------------------------------------------------------

@pytest.fixture(scope='module')
def served(tmp_path_factory):
    "A `serve` process over a model whose info names its data by a full path, with its own temporary folder and log"
    root = tmp_path_factory.mktemp('served')
    torch.manual_seed(0)
    G = StyleGenerator(size=32, channel_base=64, channel_max=32, z_dim=32, w_dim=32, n_mapping=2)
    model = save_generator(G, root/'generator.pth', window='brain', source='/some/secret/dir/scans')
    (tmp := root/'tmp').mkdir()
    port, log = free_port(), root/'log.txt'
    with open(log, 'w') as f:
        p = subprocess.Popen([sys.executable, '-c', f"from medgan_fastai.app import serve; serve({str(model)!r}, port={port}, device='cpu', quiet=True, privacy_filter=False)"],
                             env={**os.environ, 'TMPDIR': str(tmp)}, stdout=f, stderr=subprocess.STDOUT)
    url, start = f'http://127.0.0.1:{port}/', time.monotonic()
    while True:
        try: urllib.request.urlopen(url, timeout=2).close(); break
        except OSError:
            if p.poll() is not None or time.monotonic() - start > 240:
                p.kill(); pytest.fail(f'serve did not start: {log.read_text()[-3000:]}')
            time.sleep(0.5)
    yield SimpleNamespace(process=p, url=url, log=log, tmp=tmp)
    if p.poll() is None: p.kill(); p.wait()

def test_rejected_requests_log_one_line_each(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    c = Client(served.url, verbose=False, analytics_enabled=False)
    before = len(served.log.read_text().splitlines())
    bad = [((MAX_SEED + 1, 0.7), '/generate'), ((-1, 0.7), '/generate'), ((1.5, 0.7), '/generate'), (('x', 0.7), '/generate'),
           ((0, 3.0), '/generate'), ((0, MAX_GRID + 1), '/grid'), ((0, 1, 999), '/mix'), ((0, 1, MAX_STEPS + 1), '/interpolate'),
           ((0, 1, 4, 'q'), '/animate'), ((0, 0.7, 0.5, 9.0), '/export')]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for args, name in bad:
            with pytest.raises(AppError): c.predict(*args, api_name=name)
    for path in ('gradio_api/file=/etc/passwd', 'gradio_api/file=../../etc/passwd'):
        with pytest.raises(urllib.error.HTTPError): urllib.request.urlopen(served.url + path)
    assert pixels(c.predict(1, 0.7, api_name='/generate')).shape == (32, 32)  # still serving
    new = served.log.read_text().splitlines()[before:]
    assert 'Traceback' not in '\n'.join(new), '\n'.join(new[:40])
    assert len(new) == len(bad) and all('rejected' in l for l in new), '\n'.join(new)

def test_served_page_shows_the_data_folder_name_only(served):
    for path in ('', 'config'):
        text = urllib.request.urlopen(served.url + path).read().decode()
        assert '/some/secret/dir' not in text
    assert 'scans' in text

def test_sigterm_leaves_no_app_folder(served):
    "Stopped as a service manager stops it, the app removes its downloads folder (this test runs last: it ends the process)"
    from gradio_client import Client
    Client(served.url, verbose=False, analytics_enabled=False).predict(2, 0.7, api_name='/export')
    assert len(app_folders(served.tmp)) == 1 and any(app_folders(served.tmp)[0].rglob('*.dcm'))
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == -signal.SIGTERM
    assert not app_folders(served.tmp)

# --- the page, in headless Chromium ----------------------------------------------------------------------------

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-default-apps',
                 '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1']  # nothing leaves this machine

@pytest.fixture(scope='module')
def browser():
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install -e ".[dev]")')
    if not Path(CHROMIUM).exists(): pytest.skip(f'{CHROMIUM} is missing: `make browser` installs Debian\'s chromium (needs root)')
    pw = sync_api.sync_playwright().start()
    try: b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    except Exception as e:
        pw.stop()
        pytest.skip(f'{CHROMIUM} does not start here: {str(e).splitlines()[0]}')
    yield b
    b.close(); pw.stop()

def test_browser_seed_change_shows_the_models_image(browser, server, reference, tmp_path):
    urls = []
    page = browser.new_page(viewport={'width': 1280, 'height': 900})
    page.on('request', lambda r: urls.append(r.url))
    page.goto(server.local_url)
    img = page.locator('#image img')
    img.wait_for(timeout=60_000)
    first = img.get_attribute('src')
    np.testing.assert_array_equal(pixels(page.request.get(first).body()), as_8bit(generate(reference, [0], psi=0.7)))
    seed = page.locator('#seed input')
    seed.fill('31337'); seed.press('Enter')
    page.wait_for_function("s => { const i = document.querySelector('#image img'); return i && i.src !== s && i.complete; }",
                           arg=first, timeout=60_000)
    shown = pixels(page.request.get(img.get_attribute('src')).body())
    np.testing.assert_array_equal(shown, as_8bit(generate(reference, [31337], psi=0.7)))
    assert page.locator('#seed-slider input[type=number]').input_value() == '31337'  # the slider follows the number
    page.wait_for_function("() => (document.querySelector('#privacy') || {}).innerText?.includes('privacy filter off')", timeout=60_000)
    shot = tmp_path/'app.png'
    page.screenshot(path=str(shot), full_page=True)
    shutil.copy(shot, SCREENSHOT_COPY)
    print(f'screenshot: {shot} (copy: {SCREENSHOT_COPY})')
    page.close()
    assert Image.open(shot).size[0] == 1280
    outside = sorted({u for u in urls if not u.startswith(server.local_url) and not u.startswith(('data:', 'blob:'))})
    assert not outside, f'the page asked for {outside}'
