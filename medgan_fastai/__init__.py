"""Train GANs that synthesise realistic medical images from DICOM data, the fastai way."""
__version__ = "0.0.1"

import warnings as _warnings
# fastai's layers module triggers torch's own deprecation notice for `torch.jit.script` on every import: noise for our users
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)

# The library's modules in import order (each imports only modules before it). `from medgan_fastai import *` and
# `medgan_fastai.NAME` import them on first use, so that `import medgan_fastai.persist` (loading a generator, the app,
# `medgan generate`) does not pay for, or depend on, the training stack. The Gradio app is left out: it imports slowly.
_MODULES = ('dicom', 'series', 'volumes', 'models', 'style', 'persist', 'convert', 'card', 'slices', 'data', 'augment', 'callbacks', 'diversity', 'learner',
            'distributed', 'run', 'metrics', 'scoring', 'latent', 'utility', 'deploy', 'privacy')

def _load_all()->list:
    import importlib
    names = []
    for m in _MODULES:
        mod = importlib.import_module(f'{__name__}.{m}')
        for n in mod.__all__: globals()[n] = getattr(mod, n)
        names += mod.__all__
    globals()['__all__'] = names
    return names

def __getattr__(name:str):
    if name.startswith('__') and name != '__all__': raise AttributeError(name)
    if name in _MODULES or name in ('app', 'cli'):  # `from medgan_fastai import latent`: that module only
        import importlib
        return importlib.import_module(f'{__name__}.{name}')
    names = _load_all()
    if name == '__all__': return names
    if name in globals(): return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
