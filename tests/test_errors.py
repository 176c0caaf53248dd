"Every `medgan` command answers bad input with exit code 1 and one line naming the file and the reason: no traceback, no file of the user's changed."
import hashlib, os, subprocess, sys
from pathlib import Path
import pytest, torch

MEDGAN = str(Path(sys.executable).parent/'medgan')

def _tree(root):
    "Every file under `root` with a hash of its content: what the user has"
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in Path(root).rglob('*') if p.is_file()}

@pytest.fixture(scope='module')
def user(tmp_path_factory, mr_dir):
    "A user's folder: an empty scan folder, a corrupt and a hostile model file, a good model, a file where a folder should be"
    from medgan_fastai.models import DCGANGenerator
    from medgan_fastai.persist import save_generator
    d = tmp_path_factory.mktemp('user')
    (d/'empty').mkdir()
    (d/'corrupt.pth').write_bytes(b'\x80\x04 this is not a model')
    good = save_generator(DCGANGenerator(32, z_dim=8, ngf=4), d/'good.pth', window='auto')
    state = torch.load(good, weights_only=True)
    state['config']['ngf'] = 100000          # 1 KB asking for billions of weights
    torch.save(state, d/'hostile.pth')
    (d/'a_file').write_text('not a folder')
    (d/'scans').mkdir()
    for f in sorted((mr_dir/'HFS').glob('*.dcm'))[:20]: (d/'scans'/f.name).write_bytes(f.read_bytes())
    return d

def _cases(d):
    return {
        'convert: empty folder':        (['convert', d/'empty', d/'out_c1'], 'empty'),
        'convert: missing folder':      (['convert', d/'missing', d/'out_c2'], 'missing'),
        'convert: output under a file': (['convert', d/'scans', d/'a_file'/'out'], 'a_file'),
        'train: missing source':        (['train', d/'missing', '--out', d/'run1', '--epochs', '1'], 'missing'),
        'train: empty source':          (['train', d/'empty', '--out', d/'run2', '--epochs', '1'], 'empty'),
        'train: run inside its source': (['train', d/'scans', '--out', d/'scans'/'run', '--epochs', '1'], 'inside the source'),
        'train: nothing to resume':     (['train', '--out', d/'empty', '--resume'], 'nothing to resume'),
        'train: identifying label':     (['train', d/'scans', '--out', d/'run3', '--label', 'PatientName'], 'identifies patients'),
        'generate: corrupt model':      (['generate', d/'corrupt.pth', '--out', d/'gen1'], 'corrupt.pth'),
        'generate: hostile config':     (['generate', d/'hostile.pth', '--out', d/'gen2'], 'does not match its weights'),
        'generate: missing model':      (['generate', d/'missing.pth', '--out', d/'gen3'], 'missing.pth'),
        'generate: output under a file': (['generate', d/'good.pth', '-n', '1', '--out', d/'a_file'/'gen'], 'a_file'),
        'evaluate: corrupt model':      (['evaluate', d/'corrupt.pth', d/'scans'], 'corrupt.pth'),
        'evaluate: missing source':     (['evaluate', d/'good.pth', d/'missing'], 'missing'),
        'serve: corrupt model':         (['serve', d/'corrupt.pth'], 'corrupt.pth'),
    }

@pytest.mark.parametrize('case', list(_cases(Path('.'))))
def test_bad_input_gives_one_line_and_exit_1(case, user, tmp_path):
    args, names = _cases(user)[case]
    before = _tree(user)
    env = {**os.environ, 'MEDGAN_CACHE': str(tmp_path/'cache'), 'TORCH_HOME': str(tmp_path/'torch')}
    r = subprocess.run([MEDGAN] + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1, (case, r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr + r.stdout, (case, r.stderr[-2000:])
    assert len(err) == 1 and err[0].startswith(f'medgan {args[0]}: ') and names in err[0], (case, err)
    assert _tree(user) == before, case   # nothing the user had was changed (outputs that failed leave nothing)

def test_evaluate_without_inception_weights_reports_what_it_could(user, tmp_path):
    "FID needs weights that cannot be downloaded here: the weight-free metrics are still printed, and one line says what is missing"
    env = {**os.environ, 'MEDGAN_CACHE': str(tmp_path/'cache'), 'TORCH_HOME': str(tmp_path/'torch')}
    r = subprocess.run([MEDGAN, 'evaluate', str(user/'good.pth'), str(user/'scans'), '-n', '16', '--metrics', 'swd,fid',
                        '--inception-weights', str(tmp_path/'no_weights.pth')], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert 'swd' in r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and 'fid not computed' in err[0] and 'no_weights.pth' in err[0]

def test_a_full_disk_while_decoding_leaves_no_half_built_cache(user, tmp_path):
    "Writing the decoded slices fails (a file size limit stands in for a full disk): one line naming the cache, nothing half-built left"
    import resource, signal
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then fails the write (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**10, 64 * 2**10))  # 20 slices of 64x64 at 16 bits are 160 KB
    env = {**os.environ, 'MEDGAN_CACHE': str(tmp_path/'cache'), 'TORCH_HOME': str(tmp_path/'torch')}
    r = subprocess.run([MEDGAN, 'train', str(user/'scans'), '--out', str(tmp_path/'run'), '--epochs', '1', '--size', '64'],
                       capture_output=True, text=True, timeout=300, env=env, preexec_fn=limit)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert len(err) == 1 and str(tmp_path/'cache') in err[0] and 'could not be written' in err[0] and 'MB free there' in err[0], err
    assert [p.name for p in (tmp_path/'cache').rglob('*') if p.name.endswith('.tmp')] == []

def test_a_cache_build_killed_outright_is_cleaned_up_by_the_next_build(user, tmp_path):
    "`medgan train` killed by the kernel while it decodes (a file size limit, SIGXFSZ's default action: no handler runs, as for kill -9) leaves its stage; a later build removes it"
    import resource, time
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**10, 64 * 2**10))
    env = {**os.environ, 'MEDGAN_CACHE': str(tmp_path/'cache'), 'TORCH_HOME': str(tmp_path/'torch')}
    args = ['train', str(user/'scans'), '--out', str(tmp_path/'run'), '--epochs', '1', '--size', '64']
    killable = ['-c', 'import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); from medgan_fastai.cli import main; sys.exit(main())']
    r = subprocess.run([sys.executable, *killable, *args], capture_output=True, text=True, timeout=300, env=env, preexec_fn=limit)
    assert r.returncode < 0                                                    # killed by the signal, not ended by Python
    left = [p for p in (tmp_path/'cache').rglob('*.tmp') if p.is_dir()]
    assert len(left) == 1 and any(left[0].iterdir())                           # its half-written stage
    for p in [left[0], *left[0].iterdir()]: os.utime(p, (time.time() - 3600,) * 2)   # an hour later
    r = subprocess.run([MEDGAN, *args], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [p for p in (tmp_path/'cache').rglob('*') if p.name.endswith('.tmp')] == [] and (tmp_path/'run'/'generator.pth').exists()
