"""Every seed derivation in usp-fast, in one place: each random draw is a pure function of `run.seed` (or
`sample.seed`) and the position it is drawn for, so resumed runs and any number of ranks see the same numbers.
Changing any function or salt here changes every produced number (the resume/bitwise tests pin them)."""
import contextlib
import random
import threading

import numpy as np

# Salts: a fourth SeedSequence word that keeps streams drawn from the same (seed, epoch, index) independent.
VIEW_SALT = 0x5EED  # crop window + flip of an image view (data/images.py draw_view: cache build and online path)
SEG_VIEW_SALT = 0x5E6  # scale, crop and flip of a segmentation image + mask view (data/segmentation.py)
RANDAUG_SALT = 0xA06  # RandAugment's global-RNG seed of an online view (data/online.py SeededRandAugment)
PROBE_NOISE_MULTIPLIER = 1_000_003  # a prime: per-batch noise seeds of different run seeds do not collide


def step_seed(seed, step, micro, rank):
    """The engine's per-(step, micro-step, rank) generator seed; 63 bits, so torch's manual_seed takes it."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint64)[0] >> 1)


def sample_batch_seed(seed, k):
    """Global sampling batch k's generator seed: the step seed of step k (micro 0, rank 0), so any rank count agrees."""
    return step_seed(seed, k, 0, 0)


def epoch_rng(seed, epoch):
    """The stream's per-epoch generator: the sample permutation, then flips, then view ids (data/stream.py)."""
    return np.random.default_rng([seed, epoch])


def view_rng(seed, epoch, index):
    """The generator of image `index`'s view in `epoch` (a cache's view number plays the epoch), PIL and DALI alike."""
    return np.random.default_rng([seed, epoch, index, VIEW_SALT])


def randaug_seed(seed, epoch, index):
    """The global-RNG seed of RandAugment for image `index` in `epoch` (32 bits, as NumPy's global seed takes)."""
    return int(np.random.SeedSequence([seed, epoch, index, RANDAUG_SALT]).generate_state(1)[0])


def probe_noise_seed(seed, key):
    """The generator seed of the probe's noise for feature batch `key` (2 x first index + flip)."""
    return seed * PROBE_NOISE_MULTIPLIER + key


_GLOBAL_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded_global_rngs(seed):
    """Python's and NumPy's global RNGs seeded with `seed` for the block (held by one thread at a time), then
    restored: for library code (timm's RandAugment, Mixup) that draws from them, made a pure function of a seed."""
    with _GLOBAL_RNG_LOCK:
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
