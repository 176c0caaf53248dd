"The layering of DESIGN.md: each module imports only modules before it (notebook order), and no module imports another's private name."
import ast, json
from pathlib import Path
import medgan_fastai

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT/'medgan_fastai'

def _notebook_order()->list:
    "Module names in the order of their notebooks' names (00_dicom, 00b_series, 01a_models, ...)"
    mods = []
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            src = ''.join(c['source'])
            if c['cell_type'] == 'code' and src.startswith('#| default_exp '):
                mods.append(src.split()[2]); break
    return mods

def _imports(path):
    "(module imported, names) for every import of our package in `path`, at any depth (lazy imports count)"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: yield (mod.split('.')[0] if mod else None), [a.name for a in node.names]
            elif mod.startswith('medgan_fastai.'): yield mod.split('.')[1], [a.name for a in node.names]
            elif mod == 'medgan_fastai': yield None, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith('medgan_fastai.'): yield a.name.split('.')[1], []

def test_notebook_order_is_the_import_order():
    order = _notebook_order()
    assert order[:len(medgan_fastai._MODULES)] == list(medgan_fastai._MODULES), order
    assert set(order) - set(medgan_fastai._MODULES) == {'app', 'cli'}

def test_modules_import_only_earlier_modules_and_no_private_names():
    order = _notebook_order()
    problems = []
    for m in order:
        for target, names in _imports(PKG/f'{m}.py'):
            if target is None:  # `from . import NAME` / `from medgan_fastai import NAME`: submodules or the version
                targets = [n for n in names if n != '__version__']
                problems += [f'{m} imports {n} from the package' for n in targets if n in order and order.index(n) >= order.index(m)]
                continue
            if m not in ('app', 'cli') and (target not in order or order.index(target) >= order.index(m)):
                problems.append(f'{m} imports {target}, which comes after it')
            problems += [f'{m} imports the private name {target}.{n}' for n in names if n.startswith('_') and not n.startswith('__')]
    assert not problems, '\n'.join(problems)
