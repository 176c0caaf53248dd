"A training run as a library object: `train_run` and `medgan train` give the same run; resume is exact; config.json is resolved."
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from medgan_fastai.run import Recipe, train_run, RunFolderError
from medgan_fastai.learner import gan_defaults

MEDGAN = str(Path(sys.executable).parent/'medgan')
TINY = dict(size=32, bs=16, seed=7, samples=16)

@pytest.fixture(scope='module')
def cache_env(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('cache'))
    old = os.environ.get('MEDGAN_CACHE')
    os.environ['MEDGAN_CACHE'] = d  # the library call and the subprocess share one decode-once cache
    yield {**os.environ, 'PYTHONUNBUFFERED': '1'}
    if old is None: os.environ.pop('MEDGAN_CACHE', None)
    else: os.environ['MEDGAN_CACHE'] = old

def _weights(run, epoch):
    return torch.load(Path(run)/'checkpoints'/f'epoch_{epoch:03d}.pth', weights_only=True)

def _assert_same_weights(a, b):
    for net in ('generator', 'critic', 'ema'):
        for k in a[net]:
            x, y = a[net][k], b[net][k]
            assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), (net, k)

@pytest.fixture(scope='module')
def shell_run(mr_dir, cache_env, tmp_path_factory):
    out = tmp_path_factory.mktemp('shell')/'run'
    args = [MEDGAN, 'train', str(mr_dir/'HFS'), '--out', str(out), '--epochs', '2'] + [f'--{k}={v}' for k,v in TINY.items()]
    r = subprocess.run(args, env=cache_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out

def test_notebook_call_equals_medgan_train(shell_run, mr_dir, tmp_path):
    "The same recipe from a notebook cell and from the shell: same files, same config, same weights after 2 epochs"
    out = tmp_path/'run'
    train_run(mr_dir/'HFS', out=out, recipe=TINY, epochs=2)
    files = lambda d: sorted(str(p.relative_to(d)) for p in Path(d).rglob('*') if p.is_file())
    assert files(out) == files(shell_run)
    a, b = json.loads((out/'config.json').read_text()), json.loads((shell_run/'config.json').read_text())
    assert a == b
    _assert_same_weights(_weights(out, 2), _weights(shell_run, 2))

def test_resumed_library_run_equals_uninterrupted(shell_run, mr_dir, tmp_path):
    out = tmp_path/'run'
    train_run(mr_dir/'HFS', out=out, recipe=TINY, epochs=1)
    learn = train_run(out=out, epochs=2, resume=True)
    assert learn.epoch == 1
    _assert_same_weights(_weights(out, 2), _weights(shell_run, 2))

def test_config_holds_resolved_values(shell_run):
    cfg = json.loads((shell_run/'config.json').read_text())
    d = gan_defaults('dcgan')
    assert cfg['loss'] == 'hinge' and cfg['lr_g'] == d['lr_g'] and cfg['z_dim'] == d['z_dim']
    assert cfg['betas_g'] == list(d['betas_g']) and cfg['n_crit'] == 1 and cfg['precision'] == 'fp32'
    assert all(cfg[k] is not None for k in ('loss', 'lr_g', 'lr_c', 'n_crit', 'r1_gamma', 'z_dim', 'betas_g', 'betas_c'))
    assert Recipe.from_json(shell_run/'config.json') == Recipe(**cfg)

def test_resume_keeps_the_stored_recipe_when_a_default_changes(shell_run, tmp_path, monkeypatch):
    "config.json is what a resumed run trains with, whatever today's defaults are"
    import medgan_fastai.run as run_mod
    changed = lambda arch='dcgan', loss=None, **kw: {**gan_defaults(arch, loss, **kw), 'lr_g': 1.0, 'z_dim': 7}
    monkeypatch.setattr(run_mod, 'gan_defaults', changed)
    assert Recipe().resolved().lr_g == 1.0                     # a new run would take the new default
    r = run_mod.prepare_run_folder(shell_run, Recipe(), resume=True)
    assert (r.lr_g, r.z_dim) == (gan_defaults('dcgan')['lr_g'], 100)

def test_resume_with_another_source_is_refused(shell_run, mr_dir):
    with pytest.raises(RunFolderError, match='own source'):
        train_run(mr_dir/'HFP', out=shell_run, epochs=3, resume=True)

def test_train_help_states_the_real_defaults(cache_env):
    "`medgan train --help` said the DCGAN default loss was bce while training used hinge"
    r = subprocess.run([MEDGAN, 'train', '--help'], env=cache_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    text = ' '.join(r.stdout.split())
    assert f"{gan_defaults('dcgan')['loss']} for dcgan" in text and f"{gan_defaults('style')['loss']} for style" in text
    assert 'bce for dcgan' not in text

def test_existing_folder_gives_one_line(shell_run, mr_dir, cache_env):
    r = subprocess.run([MEDGAN, 'train', str(mr_dir), '--out', str(shell_run), '--epochs', '1'], env=cache_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(shell_run) in r.stderr and '--resume' in r.stderr

def test_resume_skips_a_truncated_newest_checkpoint_and_removes_stale_temporaries(shell_run, tmp_path, capsys):
    "A cut-short newest checkpoint stopped --resume; a kill during a write left `.epoch_NNN.*.pth` files forever"
    import shutil
    run = tmp_path/'run'
    shutil.copytree(shell_run, run)
    ck2 = run/'checkpoints'/'epoch_002.pth'
    ck2.write_bytes(ck2.read_bytes()[:5000])                      # cut short, as by a full disk
    stale = run/'checkpoints'/'.epoch_003.a1b2c3d4.pth'
    stale.write_bytes(b'half a checkpoint')
    learn = train_run(out=run, epochs=2, resume=True)
    out = capsys.readouterr().out
    assert 'skipped epoch_002.pth' in out and 'resuming' in out and 'after epoch 1' in out
    assert not stale.exists() and 'removed checkpoints/.epoch_003.a1b2c3d4.pth' in out
    _assert_same_weights(_weights(run, 2), _weights(shell_run, 2))  # epoch 2 trained again from epoch 1, exactly

def test_model_card_of_a_run(shell_run, mr_dir):
    "Written when training ends: data, resolved recipe, training length in kimg, pictures, intended use, licence as stated"
    text = (shell_run/'model_card.md').read_text()
    tr = json.loads((shell_run/'training.json').read_text())
    assert tr['epochs'] == 2 and tr['kimg'] > 0 and 25 < tr['slices'] <= 35 and tr['wall_time_s'] > 0  # 35 files, blank ones left out
    for part in ('## Data', '## Recipe', '## Training', 'not for diagnosis', 'loss.png', 'samples/epoch_002.png',
                 '| kimg |', 'not stated (`--data-licence`)', '| HFS |'):
        assert part in text, part
    assert str(mr_dir) not in text                      # the data's folder by name, not its path
    assert (shell_run/'model_card.html').read_text().count('<img') == 2

def test_data_licence_goes_into_the_card(tmp_path, mr_dir):
    from medgan_fastai.card import model_card_text
    from medgan_fastai.run import prepare_run_folder
    r = prepare_run_folder(tmp_path/'run', Recipe(source=str(mr_dir), data_licence='BSD-2-Clause (dcm_qa test data)'))
    (tmp_path/'run').mkdir()
    r.to_json(tmp_path/'run'/'config.json')
    assert 'BSD-2-Clause (dcm_qa test data)' in model_card_text(tmp_path/'run')

def test_nifti_run_records_how_volumes_were_sliced(shared_data, cache_env, tmp_path):
    "A run on a NIfTI volume cut sagittally: config.json and the exported generator keep the plane and the label rule"
    from medgan_fastai.persist import load_generator
    out = tmp_path/'run'
    train_run(shared_data/'nifti'/'mr-t1-sag_HFS.nii.gz', out=out, recipe=dict(TINY, axis='sagittal', central_fraction=0.8), epochs=1)
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['axis'], cfg['central_fraction']) == ('sagittal', 0.8)
    info = load_generator(out).info
    assert info['volume']['axis'] == 'sagittal' and info['volume']['central_fraction'] == 0.8 and 'label' in info

@pytest.mark.parametrize('flag,value', [('--arch', 'foo'), ('--loss', 'l2'), ('--axis', 'oblique'), ('--percentiles', '99'),
                                        ('--seg-labels', 'tumour'), ('--window', 'brian')])
def test_bad_recipe_option_gives_one_line_naming_it(flag, value, cache_env, tmp_path):
    r = subprocess.run([MEDGAN, 'train', '--out', str(tmp_path/'run'), flag, value], env=cache_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().startswith(f'medgan train: {flag}') and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path/'run'/'config.json').exists()

def test_a_style_run_recorded_before_the_small_data_option_resumes_with_its_own_nets(mr_dir, cache_env, tmp_path, monkeypatch):
    "A style run whose config.json predates `small_data_style` was trained with the generator's own defaults (4 mapping "
    "layers, style mixing): resuming it rebuilds those nets, so its checkpoint loads, and a new run takes the small-data ones"
    import medgan_fastai.learner as learner_mod
    out = tmp_path/'old'
    with monkeypatch.context() as m:  # the recipe as it was: nothing in g_kwargs, the generator's defaults
        m.setattr(learner_mod, 'SMALL_DATA_STYLE', {})
        train_run(mr_dir/'HFS', out=out, recipe=dict(TINY, arch='style'), epochs=1)
    cfg = json.loads((out/'config.json').read_text()); del cfg['small_data_style']
    (out/'config.json').write_text(json.dumps(cfg))  # as an older version wrote it
    learn = train_run(out=out, epochs=2, resume=True)
    assert learn.epoch == 1 and (out/'checkpoints'/'epoch_002.pth').exists()
    G = learn.model.generator
    assert (G.config['n_mapping'], G.config['mixing_prob']) == (4, 0.9)
    new = train_run(mr_dir/'HFS', out=tmp_path/'new', recipe=dict(TINY, arch='style'), epochs=1)
    assert (new.model.generator.config['n_mapping'], new.model.generator.config['mixing_prob']) == (2, 0.)
