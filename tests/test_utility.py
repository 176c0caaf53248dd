"Utility, train on synthetic and test on real, on a real labelled set: MR (mr-t1-sag) vs CT (ct-head), held out by series."
import numpy as np, pytest, torch
import torch.nn as nn
from medgan_fastai.dicom import read_dicom
from medgan_fastai.series import scan
from medgan_fastai.slices import read_slice
from medgan_fastai.utility import (utility_scores, holdout_split, train_classifier, class_probabilities, classification_scores,
                                   synthetic_slices, label_rule, labelled_slices, LabelRuleError)

def _stack(files, **kw): return torch.from_numpy(np.stack([read_slice(f, size=64, **kw) for f in files])) * 2 - 1

@pytest.fixture(scope='module')
def mr_ct(mr_dir, ct_dir):
    "64 px slices in [-1, 1]: MR per head position (one series each), and the CT series in anatomical order"
    out = {p: _stack(sorted((mr_dir/p).glob('*.dcm'), key=lambda f: int(read_dicom(f, stop_before_pixels=True).InstanceNumber)))
           for p in ('HFS', 'HFDL', 'HFDR', 'HFP')}
    ct = scan(ct_dir, progress=False)
    out['CT'] = _stack(ct[ct.ok].file, window='brain')
    return out

@pytest.fixture(scope='module')
def labelled(mr_ct):
    "(train images, train classes, held-out images, held-out classes): MR HFP and the last 8 CT slices are never trained on"
    v = mr_ct
    xtr = torch.cat([v['HFS'], v['HFDL'], v['HFDR'], v['CT'][:20]])
    xte = torch.cat([v['HFP'], v['CT'][20:]])
    return xtr, ['MR'] * 105 + ['CT'] * 20, xte, ['MR'] * 35 + ['CT'] * 8

class SliceBank(nn.Module):
    "A conditional 'generator' that hands out stored slices: class `k` draws from `banks[k]`, picked by the noise"
    def __init__(self, banks:list, vocab:list):
        super().__init__()
        self.n_classes, self.z_dim, self.size, self.n_channels, self.vocab = len(banks), 8, 64, 1, vocab
        self.banks = nn.ParameterList([nn.Parameter(b, requires_grad=False) for b in banks])
    def forward(self, z, labels):
        pick = (z[:, 0].abs() * 1e4).long()
        return torch.stack([self.banks[int(l)][int(p) % len(self.banks[int(l)])] for p,l in zip(pick, labels)])

VOCAB = ['CT', 'MR']

def test_right_class_generator_scores_well_wrong_class_near_chance(labelled, mr_ct):
    xtr, ytr, xte, yte = labelled
    mr, ct = xtr[:105], xtr[105:]
    good = SliceBank([ct, mr], VOCAB)  # held-in real slices of the right class
    wrong = SliceBank([mr, ct], VOCAB)  # asked for CT it draws MR, and the other way round
    g = utility_scores(good, xtr, ytr, holdout=xte, holdout_labels=yte, n_boot=100)
    w = utility_scores(wrong, xtr, ytr, holdout=xte, holdout_labels=yte, n_boot=100)
    for r in (g, w):  # the three classifiers are reported, each with an interval that holds the value
        for s in ('real', 'synthetic', 'mixed'):
            for m in ('accuracy', 'balanced_accuracy', 'auc'):
                k = f'utility_{s}_{m}'
                assert 0 <= r[k] <= 1 and r[f'{k}_lo'] <= r[k] <= r[f'{k}_hi'], k
        assert r['utility_n_train'] == 125 and r['utility_n_holdout'] == 43 and r['utility_split'] == 'explicit holdout set'
    assert g['utility_real_balanced_accuracy'] >= 0.9  # the task is learnable from real slices (TRTR)
    assert g['utility_synthetic_balanced_accuracy'] >= 0.9 and g['tstr_trtr'] >= 0.9 and g['utility_synthetic_auc'] >= 0.9
    assert w['utility_synthetic_balanced_accuracy'] <= 0.6 and w['utility_synthetic_auc'] <= 0.5  # at or below chance
    assert w['tstr_trtr'] <= 0.6 and w['utility_synthetic_balanced_accuracy_hi'] < g['utility_synthetic_balanced_accuracy_lo']
    assert w['utility_real_balanced_accuracy'] == g['utility_real_balanced_accuracy']  # the real classifier is the same: seeded

def test_default_holdout_is_by_series(mr_ct):
    v = mr_ct
    x = torch.cat([v['HFS'], v['HFDL'], v['HFDR'], v['HFP'], v['CT']])
    labels = ['MR'] * 140 + ['CT'] * 28
    groups = [p for p in ('HFS', 'HFDL', 'HFDR', 'HFP') for _ in range(35)] + ['ct'] * 28
    held, note = holdout_split(labels, groups, frac=0.25, seed=0)
    held_mr = {groups[i] for i in np.flatnonzero(held[:140])}
    assert len(held_mr) == 1 and held[:140].sum() == 35  # one whole MR series, none of its slices in training
    assert held[140:].tolist() == [False] * 21 + [True] * 7 and 'block' in note  # the single CT series: its last slices
    good = SliceBank([v['CT'][:21], torch.cat([v[p] for p in ('HFS', 'HFDL', 'HFDR', 'HFP') if p not in held_mr])], VOCAB)
    r = utility_scores(good, x, labels, groups=groups, n_boot=0)
    # the held-out CT block is the top of the head (small skull sections), harder than a whole MR scan: real and synthetic alike
    assert r['utility_n_holdout'] == 42 and r['utility_real_balanced_accuracy'] >= 0.8 and r['tstr_trtr'] >= 0.9
    assert not any(k.endswith('_lo') for k in r)  # n_boot=0: no intervals

def test_classifier_deterministic_and_scores(labelled):
    xtr, ytr, xte, yte = labelled
    y = np.array([VOCAB.index(c) for c in ytr])
    p1 = class_probabilities(train_classifier(xtr, y, 2, epochs=2, seed=3), xte)
    p2 = class_probabilities(train_classifier(xtr, y, 2, epochs=2, seed=3), xte)
    assert torch.equal(p1, p2) and p1.shape == (43, 2)
    s = classification_scores(np.eye(2)[[1] * 35 + [0] * 8], [1] * 35 + [0] * 8)
    assert s == dict(accuracy=1.0, balanced_accuracy=1.0, auc=1.0)
    s = classification_scores(np.eye(2)[[1] * 43], [1] * 35 + [0] * 8)  # always 'MR': accurate, but only chance balanced
    assert s['accuracy'] == pytest.approx(35 / 43) and s['balanced_accuracy'] == 0.5 and s['auc'] == 0.5

def test_unconditional_and_unrecorded_rule_refused(tmp_path):
    from medgan_fastai.persist import load_generator
    g = load_generator('demo', device='cpu')
    with pytest.raises(ValueError, match='unconditional'): synthetic_slices(g, [0])
    with pytest.raises(LabelRuleError, match='unconditional'): label_rule(g, 'demo')
    bank = SliceBank([torch.zeros(2, 1, 64, 64)] * 2, VOCAB)
    bank.info = {}
    with pytest.raises(LabelRuleError, match='does not record its label rule'): label_rule(bank, tmp_path)
    (tmp_path/'config.json').write_text('{"label": "Modality", "label_map": null}')
    assert label_rule(bank, tmp_path) == ('Modality', None) and label_rule(bank, tmp_path, 'folder')[0] == 'folder'

def test_labelled_slices_by_dicom_tag(mr_dir, ct_dir, tmp_path):
    "The CLI's path: a folder labelled by the model's rule (the Modality tag), with series ids for the split"
    files = sorted((mr_dir/'HFS').glob('*.dcm'))[:12] + sorted(ct_dir.glob('*.dcm'))[:10]
    bank = SliceBank([torch.zeros(2, 1, 64, 64)] * 2, VOCAB)
    bank.info = dict(window='auto', skip_blank=False)
    x, y, groups = labelled_slices(files, bank, 'Modality', cache_dir=tmp_path)
    assert x.shape == (22, 1, 64, 64) and -1 <= x.min() and x.max() <= 1
    assert sorted(y.tolist()) == [0] * 10 + [1] * 12 and len(set(groups)) == 2
    # two MR scans of one volunteer: split by series, so one scan can be held out whole
    x, y, groups = labelled_slices(files + sorted((mr_dir/'HFP').glob('*.dcm'))[:12], bank, 'Modality', cache_dir=tmp_path)
    assert len(y) == 34 and len({g for g, c in zip(groups, y) if c == 1}) == 2 and len(set(groups)) == 3
