"Project plumbing: the library is generated from the notebooks, README from index.ipynb, the CLI answers."
import json, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import check_nbs, build_docs

def _copy_project(tmp):
    for f in ('pyproject.toml', 'README.md', 'LICENSE'): shutil.copy2(ROOT/f, tmp/f)
    for d in ('nbs', 'medgan_fastai'):
        shutil.copytree(ROOT/d, tmp/d, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
    return tmp

def test_committed_tree_is_in_step():
    assert check_nbs.check(ROOT) == []

def test_check_fails_when_notebook_and_module_disagree(tmp_path):
    root = _copy_project(tmp_path)
    nb_path = root/'nbs'/'00_dicom.ipynb'
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb['cells'] if c['cell_type'] == 'code' and 'WINDOWS = dict(' in ''.join(c['source']))
    cell['source'] = [l.replace('brain=(40, 80)', 'brain=(41, 80)') for l in cell['source']]
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    problems = check_nbs.check(root)
    assert any('dicom.py' in p and 'brain=(41, 80)' in p for p in problems), problems

def test_check_fails_on_a_module_edited_by_hand(tmp_path):
    root = _copy_project(tmp_path)
    mod = root/'medgan_fastai'/'dicom.py'
    mod.write_text(mod.read_text() + '\nHAND_EDIT = 1\n')
    assert any('dicom.py' in p for p in check_nbs.check(root))

def test_check_fails_on_committed_outputs(tmp_path):
    root = _copy_project(tmp_path)
    nb_path = root/'nbs'/'00_dicom.ipynb'
    nb = json.loads(nb_path.read_text())
    code = next(c for c in nb['cells'] if c['cell_type'] == 'code')
    code['outputs'] = [{'output_type': 'stream', 'name': 'stdout', 'text': ['noise\n']}]
    code['execution_count'] = 3
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    assert any('00_dicom.ipynb' in p and 'nbdev-clean' in p for p in check_nbs.check(root))

def test_readme_is_generated_from_index():
    assert (ROOT/'README.md').read_text() == build_docs.readme_text(ROOT/'nbs'/'index.ipynb')

def test_readme_quick_start_has_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT/'README.md').read_text()
    block = readme.split('## Quick start', 1)[1].split('```sh', 1)[1].split('```', 1)[0]
    cmds = [l.split('#')[0].strip() for l in block.strip().splitlines()]
    assert cmds == ['make demo', 'make test']
    ci = [l.strip() for l in (ROOT/'.ci'/'run').read_text().splitlines() if l.strip() and not l.startswith('#')]
    assert ci[-1] == 'make test'

def test_console_script_help():
    medgan = Path(sys.executable).parent/'medgan'
    r = subprocess.run([str(medgan), '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'usage: medgan' in r.stdout

def test_star_import():
    ns = {}
    exec('from medgan_fastai import *', ns)
    assert {'load_dicom', 'window_image', 'WINDOWS', 'DicomError'} <= ns.keys()

def test_docs_build_refuses_object_reprs(tmp_path):
    "A page that shows `<IPython.core.display.Image object>` instead of the picture fails the docs build"
    page = tmp_path/'page.html'
    page.write_text('<pre>&lt;IPython.core.display.Image object&gt;</pre><p>a &lt;b&gt; tag</p>')
    ok = tmp_path/'ok.html'
    ok.write_text('<img src="data:image/gif;base64,R0lGOD"><pre>&lt;Figure size 640x480 with 1 Axes&gt;</pre>')
    assert [t for _, t in build_docs.unrendered_outputs([page, ok])] == ['&lt;IPython.core.display.Image object&gt;']

def test_docs_build_refuses_tutorials_that_show_an_untrained_generator(tmp_path):
    nb = dict(cells=[dict(cell_type='code', source=['G = StyleGenerator(32)\n', 'image_grid(generate(G, range(4)))']),
                     dict(cell_type='code', source=['#| slow\n', 'g = DCGANGenerator(64)']),
                     dict(cell_type='code', source=["G = load_generator('demo')"])], metadata={}, nbformat=4, nbformat_minor=5)
    (tmp_path/'t.ipynb').write_text(json.dumps(nb))
    assert build_docs.untrained_tutorial_cells(tmp_path) == [('t.ipynb', 'G = StyleGenerator(32)')]
    assert build_docs.untrained_tutorial_cells() == []   # the project's own tutorials show trained models
