"""Check that the notebooks are the source of truth: `nbdev-export` leaves `medgan_fastai/` unchanged and
`nbdev-clean` leaves `nbs/` unchanged (no outputs, no metadata noise).

Works on a throw-away copy, so it never touches the working tree and needs no git.
Usage: python tools/check_nbs.py [PROJECT_ROOT]   (exit 1 and a diff on any mismatch)
"""
import difflib, filecmp, os, shutil, subprocess, sys, tempfile
from pathlib import Path

def _files(root):
    "Relative paths of the files under `root`, skipping caches"
    return {p.relative_to(root) for p in root.rglob('*') if p.is_file() and '__pycache__' not in p.parts
            and '.ipynb_checkpoints' not in p.parts}

def _diff_trees(a, b, label):
    "Human-readable differences between trees `a` (committed) and `b` (regenerated)"
    fa, fb, out = _files(a), _files(b), []
    for f in sorted(fa - fb): out.append(f'{label}/{f}: committed but not produced by the notebooks')
    for f in sorted(fb - fa): out.append(f'{label}/{f}: produced by the notebooks but not committed')
    for f in sorted(fa & fb):
        if filecmp.cmp(a/f, b/f, shallow=False): continue
        d = difflib.unified_diff((a/f).read_text().splitlines(), (b/f).read_text().splitlines(),
                                 f'committed/{label}/{f}', f'regenerated/{label}/{f}', lineterm='', n=1)
        out.append('\n'.join(list(d)[:40]))
    return out

def _bin(name):
    "The nbdev command next to the running Python (the project's venv)"
    p = Path(sys.executable).parent/name
    return str(p) if p.exists() else name

def check(root='.'):
    "Return a list of problems: library out of step with notebooks, or notebooks not clean"
    root = Path(root).resolve()
    problems = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for f in ('pyproject.toml', 'README.md', 'LICENSE'):
            if (root/f).exists(): shutil.copy2(root/f, tmp/f)
        shutil.copytree(root/'nbs', tmp/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
        shutil.copytree(root/'medgan_fastai', tmp/'medgan_fastai', ignore=shutil.ignore_patterns('__pycache__'))
        env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
        # regenerate every module from scratch (only the hand-written __init__.py stays), so that a module
        # whose notebook was removed shows up too
        for f in (tmp/'medgan_fastai').rglob('*.py'):
            if f.name != '__init__.py': f.unlink()
        for cmd in ('nbdev-export', 'nbdev-clean'):
            r = subprocess.run([_bin(cmd)], cwd=tmp, env=env, capture_output=True, text=True)
            if r.returncode: problems.append(f'{cmd} failed:\n{r.stdout}{r.stderr}')
        if problems: return problems
        problems += _diff_trees(root/'medgan_fastai', tmp/'medgan_fastai', 'medgan_fastai')
        problems += [p + '  (run nbdev-clean)' for p in _diff_trees(root/'nbs', tmp/'nbs', 'nbs')]
    return problems

if __name__ == '__main__':
    problems = check(sys.argv[1] if len(sys.argv) > 1 else '.')
    if problems:
        print('Notebooks and library are out of step (edit nbs/, then run nbdev-export and nbdev-clean):\n')
        print('\n\n'.join(problems))
        sys.exit(1)
    print('check_nbs: medgan_fastai/ matches nbs/ and the notebooks are clean')
