"Tests for `medgan_fastai.metrics` and `medgan_fastai.scoring` on real MR and CT slices (../shared/data) and fastai's own GAN pieces."
import copy, json, math, socket, threading, time
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from medgan_fastai.dicom import load_dicom, read_dicom
from medgan_fastai.slices import read_slice
from medgan_fastai.series import scan
import medgan_fastai.scoring as M
from medgan_fastai.metrics import (swd, msssim_diversity, msssim_setting, precision_recall, image_features, memorisation_audit,
                                   image_batch, copy_similarity, blobs)
from medgan_fastai.scoring import (inception_metrics, inception_weights_file, InceptionWeightsError, INCEPTION_URL, evaluate,
                                   metric_keys, MetricsCallback)

def _slice64(path):
    "A DICOM slice scaled to [-1, 1] by its 0.5/99.5 percentiles and resized to 64 px"
    x = load_dicom(path)
    lo, hi = np.percentile(x, [0.5, 99.5])
    x = torch.from_numpy(np.clip((x - lo) / (hi - lo), 0, 1) * 2 - 1)
    return F.interpolate(x[None, None], size=(64, 64), mode='bilinear', antialias=True, align_corners=False)[0]

@pytest.fixture(scope='module')
def mr_split(mr_dir):
    "The 140 MR slices at 64 px: each head position's series ordered by InstanceNumber and split alternately (train, held-out)"
    train, held = [], []
    for pos in sorted(p for p in mr_dir.iterdir() if p.is_dir()):
        files = sorted(pos.glob('*.dcm'), key=lambda f: int(read_dicom(f, stop_before_pixels=True).InstanceNumber))
        for i, f in enumerate(files): (train if i % 2 == 0 else held).append(_slice64(f))
    assert len(train) + len(held) == 140
    return torch.stack(train), torch.stack(held)

def _noise(shape, seed=0): return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

# --- inputs

def test_image_batch_forms():
    test = image_batch(np.array([[[0, 255]]], np.uint8))  # (n, h, w) uint8 -> (n, 1, h, w) in [-1, 1]
    assert test.shape == (1, 1, 1, 2) and test.tolist() == [[[[-1., 1.]]]]
    with pytest.raises(ValueError, match='fake: expected'): image_batch(torch.zeros(2, 4, 8, 8), 'fake')

# --- SWD

def test_swd_self_zero_and_monotonic_in_noise(mr_split):
    train, _ = mr_split
    assert swd(train, train)['swd'] == 0
    scores = [swd(train, train + s * _noise(train.shape))['swd'] for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] > 1

def test_swd_levels_deterministic_and_held_out_closer_than_noise(mr_split):
    train, held = mr_split
    r = swd(train, held)
    assert list(r) == ['swd_64', 'swd_32', 'swd_16', 'swd'] == metric_keys(['swd'], 64)
    assert r == swd(train, held)  # same seed, same numbers
    assert r != swd(train, held, seed=1)
    assert math.isclose(r['swd'], np.mean([r['swd_64'], r['swd_32'], r['swd_16']]))
    assert r['swd'] < swd(train, held + 0.1 * _noise(held.shape))['swd']

def test_swd_rgb_and_size_mismatch():
    x = torch.rand(20, 3, 32, 32) * 2 - 1
    assert list(swd(x, x.flip(-1))) == ['swd_32', 'swd_16', 'swd']
    with pytest.raises(ValueError, match='differ in size'): swd(x, x[..., :16, :16])

# --- MS-SSIM diversity

def test_msssim_identical_is_one_noise_low(mr_split):
    train, _ = mr_split
    assert math.isclose(msssim_diversity(train[[5] * 10], n_pairs=50), 1., abs_tol=1e-5)
    noise = torch.rand(50, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert msssim_diversity(noise, n_pairs=200) < 0.05
    real = msssim_diversity(train, n_pairs=200)
    assert 0.1 < real < 0.9  # slices of one head are alike, but not the same
    assert real == msssim_diversity(train, n_pairs=200)

@pytest.mark.parametrize('size,scales', [(32, 3), (64, 4), (128, 5), (256, 5)])
def test_msssim_small_images(size, scales):
    s = msssim_setting(size)
    assert len(s['betas']) == scales and math.isclose(sum(s['betas']), 1., abs_tol=1e-3)
    x = torch.rand(4, 1, size, size) * 2 - 1
    assert 0 <= msssim_diversity(x, n_pairs=4) < 0.2

# --- precision / recall

def test_precision_recall(mr_split):
    train, held = mr_split
    assert precision_recall(train, train) == dict(precision=1., recall=1.)
    pr = precision_recall(train, held)
    assert pr['precision'] > 0.8 and pr['recall'] > 0.8
    collapsed = precision_recall(train, train[[3] * 40])
    assert collapsed['precision'] == 1 and collapsed['recall'] < 0.2
    noise = precision_recall(train, torch.rand(70, 1, 64, 64) * 2 - 1)
    assert noise['precision'] == 0
    px = precision_recall(train, held, features='pixels')
    assert px['precision'] > 0.8

def test_random_embedding_fixed():
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    torch.manual_seed(123)  # the embedding ignores torch's global seed
    a = image_features(x)
    torch.manual_seed(7)
    assert torch.equal(a, image_features(x)) and a.shape == (4, 1024)

# --- memorisation audit: copies that a generator or augmentation changed, calibrated on held-out real slices

@pytest.fixture(scope='module')
def mr_positions(mr_dir):
    "The MR slices at 64 px in [-1, 1], per head position (one volunteer, four scans), each ordered by InstanceNumber"
    out = {}
    for pos in ('HFS', 'HFDL', 'HFDR', 'HFP'):
        files = sorted((mr_dir/pos).glob('*.dcm'), key=lambda f: int(read_dicom(f, stop_before_pixels=True).InstanceNumber))
        out[pos] = torch.from_numpy(np.stack([read_slice(f, size=64) for f in files])) * 2 - 1
    return out

@pytest.fixture(scope='module')
def ct_volume(ct_dir):
    "The 28 CT slices at 64 px in [-1, 1] (brain window), in anatomical order (position along the slice normal)"
    df = scan(ct_dir, progress=False)
    df = df[df.ok]
    assert len(df) == 28 and df.position.is_monotonic_increasing
    return torch.from_numpy(np.stack([read_slice(f, window='brain', size=64) for f in df.file])) * 2 - 1

def _near_copies(x, seed=0, max_shift=3, noise=0.05):
    "What a generator or augmentation may do to a memorised slice: shift (<= `max_shift` px), mirror, contrast x0.9..1.1, brightness, noise"
    g, out = torch.Generator().manual_seed(seed), []
    for im in x:
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=g).tolist()
        y = F.pad(im[None], (max_shift,) * 4, mode='replicate')[0, :, max_shift + dy:max_shift + dy + 64, max_shift + dx:max_shift + dx + 64]
        if torch.rand(1, generator=g) < 0.5: y = y.flip(-1)
        if torch.rand(1, generator=g) < 0.5: y = y.flip(-2)
        c, b = 0.9 + 0.2 * torch.rand(1, generator=g), 0.1 * torch.rand(1, generator=g) - 0.05
        out.append((y - y.mean()) * c + y.mean() + b + noise * torch.randn(y.shape, generator=g))
    return torch.stack(out)

def _blank_images(seed=0):
    "Near-blank images: constants, constants with noise below and above one grey level, faint smooth gradients"
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing='ij')
    const = torch.tensor([-1., -0.5, 0., 0.7])[:, None, None, None].expand(4, 1, 64, 64)
    noisy = torch.stack([v + s * torch.randn(1, 64, 64, generator=g) for s in (1e-3, 0.02) for v in (-1., 0.)])
    faint = torch.stack([-1 + a * f for a in (0.02, 0.05) for f in (xx, yy, torch.exp(-(xx ** 2 + yy ** 2) / 0.3))])[:, None]
    return torch.cat([const, noisy, faint])

def _mean_images(train, seed=0):
    "The mean training slice, and 19 means of random halves of the training slices"
    g = torch.Generator().manual_seed(seed)
    return torch.stack([train.mean(0)] + [train[torch.randperm(len(train), generator=g)[:len(train) // 2]].mean(0) for _ in range(19)])

def _old_rms_copy_rate(samples, train, quantile=0.01):
    "The audit this one replaces: RMS pixel distance to the nearest training slice under the 1% quantile of train-train distances"
    d = torch.cdist(samples.flatten(1), train.flatten(1)).min(1).values
    tt = torch.cdist(train.flatten(1), train.flatten(1)).fill_diagonal_(math.inf).min(1).values
    return (d < torch.quantile(tt, quantile)).float().mean().item()

def test_copy_similarity_sees_through_shifts_mirrors_contrast(mr_positions):
    train = mr_positions['HFS']
    shifted = F.pad(train, (4, 4, 4, 4), mode='replicate')[..., 1:65, 7:71]  # 3 px down, 3 px left: the largest shift at 64 px is 4
    for name, x in [('shift', shifted), ('mirror', train.flip(-1)), ('upside down', train.flip(-2)), ('both', train.flip(-2, -1)),
                    ('contrast', train * 0.5 - 0.3), ('noise', train + 0.05 * _noise(train.shape))]:
        sim, idx = copy_similarity(x, train)
        assert (sim > 0.95).all() and torch.equal(idx, torch.arange(len(train))), name
    assert copy_similarity(shifted, train, max_shift=1)[0].median() < 0.9  # beyond `max_shift` it is not searched
    assert copy_similarity(train.flip(-1), train, flips=False)[0].median() < 0.9
    # the coarse pass keeps the best candidate: the same values as scoring every pair exactly
    x = torch.cat([_near_copies(train), mr_positions['HFP']])
    fast, exact = copy_similarity(x, train)[0], copy_similarity(x, train, top_k=None)[0]
    assert (fast <= exact + 1e-5).all() and ((exact - fast).abs() < 1e-4).float().mean() >= 0.95
    # leave-one-out: with each slice's own id excluded, a slice finds a neighbour, not itself
    sim, idx = copy_similarity(train, train, exclude=(range(35), range(35)))
    assert (idx != torch.arange(35)).all() and sim.max() < 0.99
    sim, idx = copy_similarity(_blank_images(), train)
    assert (sim[:6] == 0).all() and (idx[:6] == -1).all() and sim.max() < 0.5  # blank and faint images match nothing well

def test_memorisation_mr_patient_level_split(mr_positions, tmp_path):
    "Train on three head positions, hold out the fourth (HFP); the threshold comes from each position against the other two"
    train = torch.cat([mr_positions[p] for p in ('HFS', 'HFDL', 'HFDR')])
    groups = [p for p in ('HFS', 'HFDL', 'HFDR') for _ in range(35)]
    copies = _near_copies(train)
    copier = memorisation_audit(copies, train, groups=groups)
    assert copier.calibration == 'groups' and copier.copy_rate >= 0.95
    assert (copier.nn_index == torch.arange(len(train))).float().mean() >= 0.95  # and it names the slice that was copied
    assert copier.summary()['data_copying_z'] < -3
    # the audit this one replaces misses most of these copies: a 1-3 px shift moves a slice further than its neighbours
    assert _old_rms_copy_rate(copies, train) < 0.5
    held = memorisation_audit(mr_positions['HFP'], train, groups=groups)  # real slices of a scan never trained on
    assert held.copy_rate <= 0.05 and held.summary()['data_copying_z'] > -2
    assert held.similarity.median() < held.threshold < copier.similarity.median()
    blank = memorisation_audit(_blank_images(), train, groups=groups)
    assert blank.copy_rate <= 0.05
    mean = memorisation_audit(_mean_images(train), train, groups=groups)
    assert mean.copy_rate <= 0.05
    assert mean.similarity.min() > held.similarity.median()  # an average slice is alike to the training slices, but no copy
    s = held.summary()
    assert json.loads(json.dumps(s)) == s and s['n_reference'] == len(train) and 'leave-one-group-out' in s['note']
    f1 = copier.show_pairs(fname=tmp_path/'pairs.png'); f2 = held.show_distances(tmp_path/'dist.png')
    for f in ('pairs.png', 'dist.png'): assert (tmp_path/f).read_bytes()[:4] == b'\x89PNG'
    with pytest.raises(FileExistsError): copier.show_pairs(fname=tmp_path/'pairs.png')
    assert len(f1.axes) == 16 and len(copier.show_pairs(3).axes) == 6 and len(blank.show_pairs(2).axes) == 4

def test_memorisation_mr_reference(mr_positions):
    "Train on two positions, calibrate on a third (HFDR): the fourth (HFP) is not flagged, copies are"
    train = torch.cat([mr_positions['HFS'], mr_positions['HFDL']])
    a = memorisation_audit(mr_positions['HFP'], train, reference=mr_positions['HFDR'])
    assert a.calibration == 'reference' and a.copy_rate <= 0.05 and a.summary()['n_reference'] == 35
    assert memorisation_audit(_near_copies(train, seed=1), train, reference=mr_positions['HFDR']).copy_rate >= 0.95
    assert memorisation_audit(_mean_images(train), train, reference=mr_positions['HFDR']).copy_rate <= 0.05

def test_memorisation_without_held_out_data_says_so(mr_positions):
    train = mr_positions['HFS']
    for groups in (None, ['HFS'] * 35):
        a = memorisation_audit(mr_positions['HFP'], train, groups=groups)
        assert a.calibration == 'leave-one-out' and 'lower bound' in a.note and 'lower bound' in a.summary()['note']
    # neighbouring slices of one volume are near-copies: this threshold is high, and that is why it is a lower bound
    assert a.threshold > memorisation_audit(mr_positions['HFP'], train, reference=mr_positions['HFDL']).threshold
    with pytest.raises(ValueError, match='one id per training slice'): memorisation_audit(train, train, groups=[0, 1])

def test_memorisation_ct_block_split(ct_volume):
    "The single CT volume: train on slices 0-20, hold out the contiguous block 21-27; groups are blocks of 4 training slices"
    # Slices of one series lie 1-7 mm apart and neighbours are near-duplicates (slices 13 and 14, 1.08 mm apart, have
    # NCC ~0.99), so holding out every 4th slice would test how alike neighbours are, not unseen anatomy. A contiguous
    # block held out, and contiguous blocks as the groups that calibrate the threshold, stand in for unseen patients:
    # only the slices at a block's edge have a trained neighbour, as in the held-out block.
    train, held = ct_volume[:21], ct_volume[21:]
    groups = [i // 4 for i in range(21)]
    copies = memorisation_audit(_near_copies(train), train, groups=groups)
    assert copies.copy_rate >= 0.95 and copies.summary()['data_copying_z'] < -3
    assert _old_rms_copy_rate(_near_copies(train), train) < 0.5
    assert memorisation_audit(held, train, groups=groups).copy_rate <= 0.05
    assert memorisation_audit(_blank_images(), train, groups=groups).copy_rate <= 0.05
    assert memorisation_audit(_mean_images(train), train, groups=groups).copy_rate <= 0.05

# --- FID / KID / IS plumbing
# The Inception weights cannot be downloaded here, so these tests pass a small stand-in feature extractor through the
# same API (`feature=`): they check our plumbing (uint8 RGB input, torchmetrics' FID/KID/IS), not Inception's numbers.

class StandInFeatures(nn.Module):
    "NOT Inception: 4x4 average-pooled intensities; records what it was given"
    def forward(self, x):
        self.seen = (x.dtype, x.shape[1])
        return F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)

def test_inception_metrics_with_stand_in(mr_split):
    train, held = mr_split
    net = StandInFeatures()
    same = inception_metrics(held, held, feature=net)
    assert net.seen == (torch.uint8, 3)  # grayscale repeated to 3 channels, 0..255
    assert set(same) == {'fid', 'kid', 'kid_std', 'is', 'is_std'}
    assert all(math.isfinite(v) for v in same.values())
    # KID's unbiased estimate is slightly negative for identical small sets; its subset size was adapted (68, not 1000)
    assert abs(same['fid']) < 1e-6 and abs(same['kid']) < 0.01 and same['kid_std'] < 1e-6
    ab, ba = inception_metrics(train, held, feature=net), inception_metrics(held, train, feature=net)
    assert ab['fid'] > 1e-4 and math.isclose(ab['fid'], ba['fid'], rel_tol=1e-6)
    assert math.isclose(ab['kid'], ba['kid'], rel_tol=0.2, abs_tol=1e-4)
    far = inception_metrics(held * 0.5, train, feature=net)  # a washed-out "model"
    assert far['fid'] > 10 * ab['fid'] and far['kid'] > ab['kid'] + 0.01
    assert ab['is'] >= 1

def test_offline_weights_error_fast_and_clear(tmp_path, monkeypatch):
    "No weights file, no cache, a network that never answers: a clear error after `timeout`, not a hang"
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    assert INCEPTION_URL == URL_INCEPTION_V3
    silent = socket.socket(); silent.bind(('127.0.0.1', 0)); silent.listen(8)  # accepts connections, never answers
    monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    monkeypatch.setattr(M, 'INCEPTION_URL', f'http://127.0.0.1:{silent.getsockname()[1]}/weights-inception.pth')
    x = torch.zeros(4, 1, 32, 32)
    try:
        t = time.time()
        with pytest.raises(InceptionWeightsError, match='inception_weights=FILE') as e:
            inception_metrics(x, x, timeout=2)
        assert time.time() - t < 15
        assert 'download failed' in str(e.value) and str(tmp_path/'torch') in str(e.value)
    finally: silent.close()
    assert not list((tmp_path/'torch').rglob('*.pth'))  # no partial file left in the cache

def test_weights_file_errors(tmp_path):
    with pytest.raises(InceptionWeightsError, match='missing.pth: file not found'): inception_weights_file(tmp_path/'missing.pth')
    bad = tmp_path/'bad.pth'; bad.write_bytes(b'not a checkpoint')
    x = torch.zeros(4, 1, 32, 32)
    with pytest.raises(InceptionWeightsError, match='not usable Inception weights'): evaluate(x, x, ['fid'], inception_weights=bad)

# --- evaluate

def test_evaluate_keys_json_and_pictures(mr_split, tmp_path):
    train, held = mr_split
    r = evaluate(held, train, metrics=('swd', 'msssim', 'pr', 'memo', 'fid', 'kid'), n_pairs=100,
                 inception_feature=StandInFeatures(), picture_dir=tmp_path)
    assert list(r) == metric_keys(('swd', 'msssim', 'pr', 'memo', 'fid', 'kid'), 64)
    assert json.loads(json.dumps(r)) == r
    assert {p.name for p in tmp_path.iterdir()} == {'memorisation_pairs.png', 'memorisation_distances.png'}
    with pytest.raises(ValueError, match='unknown metrics'): evaluate(held, train, ['swd', 'lpips'])

# --- training callback, with fastai's own GANLearner and DCGAN pieces (no mocks)

def _tiny_gan(cb, size=32, n=48, bs=16):
    from fastai.vision.gan import GANLearner, basic_generator, basic_critic
    from fastai.data.core import DataLoaders
    g = torch.Generator().manual_seed(0)
    real = torch.tanh(F.interpolate(torch.randn(n, 1, 8, 8, generator=g), size=size, mode='bicubic', align_corners=False))
    items = [(torch.randn(100, generator=g), real[i]) for i in range(n)]
    dls = DataLoaders.from_dsets(items, items[:bs], bs=bs, device='cpu')
    return GANLearner.wgan(dls, basic_generator(size, 1, n_features=8), basic_critic(size, 1, n_features=8), cbs=cb)

def test_metrics_callback_in_fastai_fit(tmp_path):
    cb = MetricsCallback(every=2, n=24, metrics=('swd', 'pr'), chart=tmp_path/'metrics.png')
    learn = _tiny_gan(cb)
    n_metrics = len(learn.metrics)
    learn.fit(4, 1e-4)
    keys = metric_keys(('swd', 'pr'), 32)
    names = list(learn.recorder.metric_names)
    assert names[-len(keys) - 1:-1] == keys  # columns of the epoch table
    assert [h['epoch'] for h in cb.history] == [1, 3]
    col = names.index('swd') - 1  # recorder.values lack the epoch column
    assert math.isnan(learn.recorder.values[0][col]) and learn.recorder.values[1][col] == cb.history[0]['swd']
    assert cb.real.shape == (24, 1, 32, 32)
    assert len(learn.metrics) == n_metrics  # our columns are removed after fit
    assert (tmp_path/'metrics.png').read_bytes()[:4] == b'\x89PNG'

def test_metrics_callback_sampling_fixed_mode_restored_ema():
    cb = MetricsCallback(n=10)
    learn = _tiny_gan(cb)
    learn.fit(1, 1e-4)
    g = learn.model.generator
    g.train()
    a, b = cb.sample(), cb.sample()
    assert g.training and torch.equal(a, b) and a.shape == (10, 1, 32, 32)
    learn.gan_state.ema = copy.deepcopy(g)
    with torch.no_grad():
        for p in learn.gan_state.ema.parameters(): p.mul_(0.5)
    assert cb.generator is learn.gan_state.ema and not torch.equal(cb.sample(), a)

def test_metrics_callback_history_survives_a_checkpoint(mr_dir, tmp_path):
    from medgan_fastai.data import gan_dls
    from medgan_fastai.learner import gan_learner
    from medgan_fastai.callbacks import save_checkpoint, load_checkpoint
    dls = gan_dls(mr_dir/'HFS', size=32, bs=16, cache_dir=tmp_path/'cache', progress=False, verbose=False)
    def make():
        cb = MetricsCallback(n=16, metrics=('swd',))
        return gan_learner(dls, arch='dcgan', seed=0, cbs=[cb]), cb
    learn, cb = make()
    learn.fit(2)
    # our learner has no validation set here: the scores still come, and show in the epoch table
    assert [h['epoch'] for h in cb.history] == [0, 1] and cb.history[1]['swd'] in learn.recorder.values[1]
    save_checkpoint(learn, tmp_path/'ck.pth', 2)
    learn2, cb2 = make()
    assert load_checkpoint(learn2, tmp_path/'ck.pth') == 2
    assert cb2.history == cb.history and len(cb2.history) == 2
    learn2.fit(3, start_epoch=2)  # the resumed run's chart keeps epochs 0 and 1
    assert [h['epoch'] for h in cb2.history] == [0, 1, 2]

def test_checkpoint_of_fastais_own_gan_learner(tmp_path):
    "GANCheckpoint's files load (weights_only) for fastai's stock GANLearner too, whose optimiser state holds fastcore `L`s"
    from medgan_fastai.callbacks import save_checkpoint, load_checkpoint
    learn = _tiny_gan([])
    learn.fit(1, 1e-4)
    save_checkpoint(learn, tmp_path/'ck.pth', 1)
    learn2 = _tiny_gan([])
    assert load_checkpoint(learn2, tmp_path/'ck.pth') == 1
    assert all(torch.equal(a, b) for a, b in zip(learn.model.parameters(), learn2.model.parameters()))
    s1, s2 = learn.opt.state_dict(), learn2.opt.state_dict()
    assert list(s1['hypers']) == list(s2['hypers']) and type(s2['hypers']) is type(s1['hypers'])
    learn2.fit(1, 1e-4)  # and training goes on from it

# --- the callback on our own learner: conditional data, and training left exactly as it would be without it

@pytest.fixture(scope='module')
def mr_by_position(mr_dir, tmp_path_factory):
    "Conditional data: the 140 MR slices at 32 px, labelled by head position (4 classes); batches are (noise, real, labels)"
    from medgan_fastai.data import gan_dls
    return gan_dls(mr_dir, size=32, bs=16, label='folder', cache_dir=tmp_path_factory.mktemp('cache'), progress=False, verbose=False)

def test_metrics_callback_reals_are_the_images_not_the_labels(mr_by_position):
    "Bug: on (noise, real, labels) batches the callback took the label tensor as its real slices"
    from medgan_fastai.learner import gan_learner
    cb = MetricsCallback(n=40, metrics=('swd',))
    learn = gan_learner(mr_by_position, arch='dcgan', seed=0, cbs=[cb])
    cb.before_fit()
    try:
        assert cb.real.shape == (40, 1, 32, 32) and cb.real.dtype == torch.float32
        assert cb.real.min() >= -1 and cb.real.max() <= 1 and cb.real.unique().numel() > 100  # slices, not class indices
        assert cb.real_labels.shape == (40,) and set(cb.real_labels.tolist()) <= set(range(4))
    finally: cb.after_fit()

def test_metrics_callback_generates_each_class_as_often_as_the_reals(mr_by_position):
    "Bug: the callback called a conditional generator without labels; each sample now takes the class of the real slice at its index"
    from medgan_fastai.learner import gan_learner
    from medgan_fastai.callbacks import sampling_generator
    cb = MetricsCallback(n=40, metrics=('swd',), batch_size=16)
    learn = gan_learner(mr_by_position, arch='dcgan', seed=0, cbs=[cb])
    learn.fit(1)
    assert [h['epoch'] for h in cb.history] == [0] and math.isfinite(cb.history[0]['swd'])
    seen = []
    hook = sampling_generator(learn).register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get('labels')), with_kwargs=True)
    try: s = cb.sample()
    finally: hook.remove()
    assert s.shape == (40, 1, 32, 32) and len(seen) == 3 and all(l is not None for l in seen)
    assert torch.equal(torch.cat(seen).cpu(), cb.real_labels) and len(set(cb.real_labels.tolist())) > 1

@pytest.mark.parametrize('arch', ['dcgan', 'style'])
def test_metrics_callback_leaves_training_bit_identical(mr_dir, tmp_path, arch):
    "Bug: collecting reals and sampling drew from the training's RNGs, so scoring changed the run it scored"
    from medgan_fastai.data import gan_dls
    from medgan_fastai.learner import gan_learner
    dls = gan_dls(mr_dir/'HFS', size=32, bs=16, cache_dir=tmp_path/'cache', progress=False, verbose=False)
    small = dict(channel_base=256, channel_max=64) if arch == 'style' else None
    def run(cbs):
        learn = gan_learner(dls, arch=arch, seed=0, g_kwargs=small, c_kwargs=small, cbs=cbs)
        learn.fit(2)
        return learn
    plain, scored = run([]), run([MetricsCallback(n=16, metrics=('swd', 'msssim'), n_pairs=20)])
    assert len(scored.metrics_callback.history) == 2
    def tensors(m): return dict(list(m.named_parameters()) + list(m.named_buffers()))
    for name, a, b in [('generator', plain.model.generator, scored.model.generator), ('critic', plain.model.critic, scored.model.critic),
                       ('ema', plain.gan_state.ema, scored.gan_state.ema)]:
        ta, tb = tensors(a), tensors(b)
        assert list(ta) == list(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), name

# --- intervals and the real-vs-real floor

def test_bootstrap_intervals_cover_the_value_and_floor_below_a_bad_model(mr_positions):
    "Real MR slices (groups: head positions) against a bad model (smooth blobs): every interval holds its value, the floor beats the model"
    real = torch.cat([mr_positions[p] for p in ('HFS', 'HFDL', 'HFDR', 'HFP')])
    groups = [p for p in ('HFS', 'HFDL', 'HFDR', 'HFP') for _ in range(35)]
    bad = blobs(140, 64, seed=3)
    r = evaluate(bad, real, ('swd', 'msssim', 'pr', 'memo'), n_pairs=200, n_boot=100, floor=True, memo_groups=groups)
    point = [k for k in r if not k.endswith(('_lo', '_hi', '_floor'))]
    assert point == metric_keys(('swd', 'msssim', 'pr', 'memo'), 64)
    for k in point:
        assert r[f'{k}_lo'] <= r[k] <= r[f'{k}_hi'], (k, r[f'{k}_lo'], r[k], r[f'{k}_hi'])
        assert f'{k}_floor' in r
    assert r['swd_hi'] > r['swd_lo'] and r['precision_hi'] >= r['precision_lo']
    assert r['swd_floor'] < r['swd_lo']  # two halves of real patients are closer than the model's whole interval
    assert r['precision_floor'] > r['precision_hi'] and r['recall_floor'] > r['recall_hi']
    assert json.loads(json.dumps(r)) == r

def test_real_halves_are_patient_disjoint():
    from medgan_fastai.scoring import real_halves, percentile_interval
    groups = [p for p in ('HFS', 'HFDL', 'HFDR', 'HFP') for _ in range(35)]
    a, b, note = real_halves(140, groups, seed=1)
    assert len(a) == len(b) == 70 and not {groups[i] for i in a} & {groups[i] for i in b} and 'disjoint' in note
    a, b, note = real_halves(10)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(10)) and 'random' in note
    lo, hi = percentile_interval(np.arange(1000.) + 10, estimate=0)  # re-centred on the estimate
    assert lo < 0 < hi and percentile_interval([np.nan]) != percentile_interval([1.])

def test_inception_metrics_intervals_and_floor_from_features_computed_once(mr_positions):
    "FID/KID are resampled from features computed once (a stand-in network here): intervals hold the values, floor below a bad model"
    real = torch.cat([mr_positions[p] for p in ('HFS', 'HFDL', 'HFDR', 'HFP')])
    groups = [p for p in ('HFS', 'HFDL', 'HFDR', 'HFP') for _ in range(35)]
    calls = []
    class Counting(StandInFeatures):
        def forward(self, x): calls.append(len(x)); return super().forward(x)
    r = evaluate(blobs(140, 64, seed=4), real, ('fid', 'kid'), inception_feature=Counting(), n_boot=200, floor=True, memo_groups=groups)
    assert sum(calls) == 280  # one pass over the generated and the real images: the bootstrap and the floor reuse the features
    for k in ('fid', 'kid'): assert r[f'{k}_lo'] <= r[k] <= r[f'{k}_hi'] and r[f'{k}_floor'] < r[f'{k}_lo'], k
