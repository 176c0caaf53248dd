"Exports for deployment: ONNX Runtime and TorchScript give PyTorch's images for fixed seeds, without this library."
import json, subprocess, sys, textwrap
from pathlib import Path
import numpy as np, pytest, torch
from medgan_fastai.models import DCGANGenerator
from medgan_fastai.style import StyleGenerator
from medgan_fastai.persist import save_generator, load_generator
from medgan_fastai.latent import generate, seed_latents
from medgan_fastai.deploy import export_onnx, export_torchscript, exported_images, EXPORT_TOLERANCE

MEDGAN = str(Path(sys.executable).parent/'medgan')
NETS = dict(dcgan=lambda: DCGANGenerator(32, z_dim=16, ngf=8),
            style=lambda: StyleGenerator(size=32, z_dim=16, w_dim=16, channel_base=64, channel_max=16),
            dcgan_conditional=lambda: DCGANGenerator(32, z_dim=16, ngf=8, n_classes=3),
            style_conditional=lambda: StyleGenerator(size=32, z_dim=16, w_dim=16, channel_base=64, channel_max=16, n_classes=3))

@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('models')
    out = {}
    for name, make in NETS.items():
        torch.manual_seed(0)
        g = make()
        for p in g.parameters(): p.data.add_(torch.randn_like(p) * 0.05)  # not the initial weights: every layer matters
        out[name] = save_generator(g, d/f'{name}.pth')
    return out

@pytest.mark.parametrize('name', list(NETS))
@pytest.mark.parametrize('fmt', ['onnx', 'torchscript'])
def test_exports_match_pytorch_for_fixed_seeds(model_files, name, fmt, tmp_path):
    g = load_generator(model_files[name], device='cpu')
    seeds = list(range(5))
    k = getattr(g, 'n_classes', 0)
    labels = [s % k for s in seeds] if k else None
    ref = generate(g, seeds, labels=labels).numpy()
    f = (export_onnx if fmt == 'onnx' else export_torchscript)(g, tmp_path/('g.onnx' if fmt == 'onnx' else 'g.pt'))
    got = exported_images(f, seed_latents(g, seeds).numpy(), None if labels is None else np.array(labels))
    diff = float(np.abs(got - ref).max())
    print(f'{name} {fmt}: max abs difference {diff:.2e}')
    assert got.shape == ref.shape and diff < EXPORT_TOLERANCE

def test_exported_files_run_without_the_library(model_files, tmp_path):
    "The command writes both formats; a fresh interpreter runs them with only onnxruntime / torch imported"
    for fmt, name in (('onnx', 'g.onnx'), ('torchscript', 'g.pt')):
        r = subprocess.run([MEDGAN, 'export', str(model_files['style']), '--format', fmt, '--out', str(tmp_path/name)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        contract = json.loads((tmp_path/f'{name}.json').read_text())
        assert contract['inputs'][0]['shape'] == ['n', 16] and contract['outputs'][0]['range'] == [-1, 1]
    code = textwrap.dedent(f'''
        import sys, numpy as np, onnxruntime as ort, torch
        z = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
        a = ort.InferenceSession({str(tmp_path/"g.onnx")!r}).run(None, {{'z': z}})[0]
        b = torch.jit.load({str(tmp_path/"g.pt")!r})(torch.from_numpy(z)).detach().numpy()
        print(a.shape, float(np.abs(a - b).max()) < 1e-4, any(m.startswith('medgan_fastai') for m in sys.modules))
    ''')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == '(3, 1, 32, 32) True False'

def test_export_refuses_to_overwrite(model_files, tmp_path):
    (tmp_path/'g.onnx').write_text('a file of the user')
    r = subprocess.run([MEDGAN, 'export', str(model_files['dcgan']), '--out', str(tmp_path/'g.onnx')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'exists' in r.stderr and (tmp_path/'g.onnx').read_text() == 'a file of the user'
