"""Offline docs build, for machines without Quarto (`nbdev-docs` stays the standard where Quarto exists).

1. stage a copy of `nbs/` in `_build/nbs` and run `nbdev-test --save` on it: this is the project's notebook test
   run, and it leaves the executed notebooks (outputs, pictures) in the copy, never in `nbs/`;
2. process those with nbdev's own doc processors (`proc_nbs`, what `nbdev-proc-nbs` does before Quarto runs):
   `show_doc` rendered, directives applied, hidden cells dropped -> `_proc/`;
3. render every processed page to static HTML with nbconvert, with a sidebar linking every page -> `_docs/`;
4. check that README.md is what `nbs/index.ipynb` generates (`--readme` rewrites it instead).

Fails (exit 1) when a notebook fails, a page does not render, or a page is missing.
usage: python tools/build_docs.py [--readme] [--no-test]
"""
import html, json, os, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, BUILD, PROC, SITE = ROOT/'nbs', ROOT/'_build', ROOT/'_proc', ROOT/'_docs'

def _bin(name):
    p = Path(sys.executable).parent/name
    return str(p) if p.exists() else name

def doc_notebooks(path=NBS):
    "Notebooks that become pages: every .ipynb below `path` except those in `_`/`.` folders or files"
    return sorted(p.relative_to(path) for p in path.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(path).parts))

# ---------- README from index.ipynb ----------
def _directives(src):
    return {m.group(1) for m in re.finditer(r'^#\|\s*([\w-]+)', src, re.M)}

def readme_text(nb_path=NBS/'index.ipynb'):
    "README.md as generated from the index notebook: markdown as is, visible code cells fenced, images re-rooted"
    nb = json.loads(Path(nb_path).read_text())
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown':
            # relative links in the notebook are relative to nbs/; README sits one level up
            src = re.sub(r'(!?\[[^\]]*\]\()(?!https?:|#|/)([^)]+\))', r'\1nbs/\2', src)
            parts.append(src.strip())
        elif c['cell_type'] == 'code':
            d = _directives(src)
            if d & {'hide', 'export', 'exporti'} or 'include: false' in src: continue
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
            if code: parts.append(f'```python\n{code}\n```')
    return '\n\n'.join(parts) + '\n'

# ---------- HTML rendering ----------
def _frontmatter(nb):
    "Front matter (title, description, output-file) from the processed notebook's first raw cell"
    import yaml
    for c in nb.cells:
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'):
            return yaml.safe_load(c.source.strip().strip('-')) or {}
    return {}

def _page(rel, fm):
    "Where Quarto would put the page: `output-file` (numbers stripped by nbdev), in the notebook's folder"
    return rel.parent/fm.get('output-file', rel.with_suffix('.html').name)

def _cell_options(src):
    return dict(re.findall(r'^#\|\s*([\w-]+):\s*(\S+)', src, re.M))

def _offline(nb, doc_url, up):
    """Apply Quarto's cell options (echo/output/include) as nbconvert tags, drop Quarto-only markup, and point
    absolute links into the published site at the local pages"""
    link = re.compile(re.escape(doc_url.rstrip('/')) + '/') if doc_url else None
    def fix(text):
        text = re.sub(r'\{target="_blank"[^}]*\}', '', text)
        return link.sub(up, text) if link else text
    for c in nb.cells:
        c.metadata.pop('execution', None)  # execnb's per-cell timings are numbers, which nbformat's schema rejects
        tags = set(c.metadata.get('tags', []))
        if c.cell_type == 'code':
            o = _cell_options(c.source)
            if o.get('include') == 'false': tags.add('remove_cell')
            if o.get('echo') == 'false': tags.add('remove_input')
            if o.get('output') == 'false': tags.add('remove_output')
            c.source = '\n'.join(l for l in c.source.splitlines() if not l.startswith('#|'))
            for out in c.get('outputs', []):
                data = out.get('data', {})
                if 'image/gif' in data and 'text/html' not in data:  # nbconvert shows no GIF: embed it so it animates
                    gif = ''.join(data['image/gif']) if isinstance(data['image/gif'], list) else data['image/gif']
                    data['text/html'] = f'<img src="data:image/gif;base64,{gif.strip()}" alt="animation">'
                    data.pop('text/plain', None)
                for k in ('text/markdown', 'text/html'):
                    if k in out.get('data', {}):
                        v = out['data'][k]
                        out['data'][k] = fix(''.join(v) if isinstance(v, list) else v)
        elif c.cell_type == 'markdown': c.source = fix(c.source)
        elif c.cell_type == 'raw': tags.add('remove_cell')  # front matter: shown as the page's title instead
        c.metadata['tags'] = sorted(tags)
    return nb

_CSS = """
body{margin:0;font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif}
#mg-nav{position:fixed;top:0;left:0;bottom:0;width:250px;overflow:auto;background:#f6f8fa;border-right:1px solid #ddd;
  padding:16px;box-sizing:border-box;font-size:14px}
#mg-nav h2{font-size:18px;margin:0 0 12px}#mg-nav a{display:block;padding:4px 6px;color:#0b5394;text-decoration:none;border-radius:4px}
#mg-nav a.current{background:#dbe9f7;font-weight:600}#mg-nav .sec{margin:12px 0 4px;color:#666;font-size:12px;text-transform:uppercase}
#mg-main{margin-left:250px;padding:8px 32px;max-width:1100px}
#mg-main h1.mg-title{margin-bottom:4px}#mg-main p.mg-desc{color:#555;margin-top:0;font-size:17px}
"""

def _nav(pages, current):
    "Sidebar: Home first, then the library pages, then each sub-folder (tutorials) as its own section"
    out, sec = ['<nav id="mg-nav"><h2><a href="{}index.html">medgan_fastai</a></h2>'.format(
        '../' * (len(current.parts) - 1))], None
    up = '../' * (len(current.parts) - 1)
    for rel, title in pages:
        s = rel.parts[0] if len(rel.parts) > 1 else ''
        if s != sec:
            sec = s
            if s: out.append(f'<div class="sec">{html.escape(s)}</div>')
        href = up + rel.as_posix()
        cls = ' class="current"' if rel == current else ''
        out.append(f'<a href="{href}"{cls}>{html.escape(title)}</a>')
    out.append('</nav>')
    return '\n'.join(out)

def render_site(proc=PROC, site=SITE, names=None):
    "Render every processed notebook in `proc` to `site`; return the list of pages written"
    import nbformat
    from nbconvert import HTMLExporter
    names = names or doc_notebooks(proc)
    from nbconvert.preprocessors import TagRemovePreprocessor
    from nbdev.config import get_config
    doc_url = get_config(ROOT).doc_url
    nbs = {rel: nbformat.read(proc/rel, as_version=4) for rel in names}
    fms = {rel: _frontmatter(nb) for rel, nb in nbs.items()}
    titles = {rel: fms[rel].get('title') or rel.stem for rel in names}
    order = sorted(names, key=lambda r: (len(r.parts) > 1, r.name != 'index.ipynb', r.as_posix()))
    pages = [(_page(r, fms[r]), titles[r]) for r in order]
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    exp = HTMLExporter(template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True)
    exp.register_preprocessor(TagRemovePreprocessor(remove_cell_tags={'remove_cell'}, remove_input_tags={'remove_input'},
                                                    remove_all_outputs_tags={'remove_output'}), enabled=True)
    written = []
    for rel in order:
        page, fm = _page(rel, fms[rel]), fms[rel]
        nb = _offline(nbs[rel], doc_url, '../' * (len(page.parts) - 1))
        body, _ = exp.from_notebook_node(nb, resources={'metadata': {'name': titles[rel]}})
        head = f'<h1 class="mg-title">{html.escape(titles[rel])}</h1>'
        if fm.get('description'): head += f'<p class="mg-desc">{html.escape(fm["description"])}</p>'
        body = body.replace('</head>', f'<style>{_CSS}</style></head>', 1)
        body = re.sub(r'(<body[^>]*>)', lambda m: m.group(1) + _nav(pages, page) + '<div id="mg-main">' + head, body, 1)
        body = body.replace('</body>', '</div></body>', 1)
        out = site/page
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(body)
        written.append(out)
    # pictures that markdown cells link to (nbs/images/...)
    for d in ('images',):
        if (NBS/d).exists(): shutil.copytree(NBS/d, site/d, dirs_exist_ok=True)
    return written

_UNTRAINED = re.compile(r'\b(StyleGenerator|DCGANGenerator)\(')

def untrained_tutorial_cells(folder=NBS/'tutorials')->list:
    "(notebook, cell source) of tutorial cells the docs run that build a new, untrained generator to show"
    import json
    out = []
    for nb in sorted(Path(folder).glob('*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            src = ''.join(c['source'])
            if c['cell_type'] == 'code' and not re.search(r'^#\|\s*slow', src, re.M) and _UNTRAINED.search(src):
                out.append((nb.name, src.splitlines()[0]))
    return out

_OBJECT_TEXT = re.compile(r'&lt;[A-Za-z_][\w.]* object(?: at 0x[0-9a-f]+)?&gt;')

def unrendered_outputs(pages)->list:
    "(page, text) for every `<... object>` repr a page shows where a picture or a value should be"
    return [(p, m.group(0)) for p in pages for m in _OBJECT_TEXT.finditer(p.read_text())]

def main(argv):
    readme = NBS/'index.ipynb'
    if '--readme' in argv:
        (ROOT/'README.md').write_text(readme_text(readme))
        print('README.md written from nbs/index.ipynb')
        return 0
    if (ROOT/'README.md').read_text() != readme_text(readme):
        print('README.md does not match nbs/index.ipynb: edit the notebook, then run `python tools/build_docs.py --readme`')
        return 1
    untrained = untrained_tutorial_cells()
    if untrained:
        print('tutorials must show a trained model (load_generator(\'demo\'), or a run trained in a slow cell), not a new one:')
        for nb, line in untrained: print(f'  {nb}: {line}')
        return 1
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.serve import proc_nbs
    refresh_quarto_yml()  # keeps nbs/_quarto.yml and nbs/nbdev.yml (what Quarto reads) in step with pyproject.toml
    names = doc_notebooks()
    if '--no-test' not in argv:
        shutil.rmtree(BUILD, ignore_errors=True)
        shutil.copytree(NBS, BUILD/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
        # nbdev-test proper, on the staged copy; --save keeps the outputs there for the pages
        r = subprocess.run([_bin('nbdev-test'), str(BUILD/'nbs'), '--save', '--timing'], cwd=ROOT)
        if r.returncode:
            print('nbdev-test failed: see the notebook errors above')
            return 1
    src = BUILD/'nbs' if (BUILD/'nbs').exists() else NBS
    shutil.rmtree(PROC, ignore_errors=True)
    proc_nbs(str(src), n_workers=0, force=True)
    missing = [n for n in names if not (PROC/n).exists()]
    if missing:
        print('nbdev processing produced no page for:', ', '.join(map(str, missing)))
        return 1
    written = render_site(PROC, SITE, names)
    index = SITE/'index.html'
    links = set(re.findall(r'href="([^"]+\.html)"', index.read_text()))
    unlinked = [p.relative_to(SITE).as_posix() for p in written if p.relative_to(SITE).as_posix() not in links]
    if len(written) != len(names) or unlinked:
        print('docs incomplete: pages not linked from index.html:', unlinked)
        return 1
    unrendered = unrendered_outputs(written)
    if unrendered:
        print('docs show objects as text instead of rendering them (display an image, a figure or a GIF instead):')
        for page, text in unrendered: print(f'  {page.relative_to(SITE)}: {text}')
        return 1
    print(f'docs: {len(written)} pages in {SITE.relative_to(ROOT)}/ (open {index.relative_to(ROOT)})')
    return 0

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
