"""The deterministic training stream over a latent cache.

Epoch e is a permutation of all N samples drawn from (seed, e). With drop_last (train.drop_last, the official
recipe's DataLoader(drop_last=True)) an epoch is floor(N / G) optimizer steps (G = global batch): step s is step
s mod floor(N/G) of epoch s // floor(N/G) and takes that epoch's positions [k*G, (k+1)*G); the last N mod G samples
of each permutation are not seen that epoch. Without it, epochs are laid end to end as one stream of positions:
step s consumes [s*G, (s+1)*G), every sample is seen exactly once per epoch and a step may straddle two epochs.
Within a step, micro-step m of rank r takes the b positions starting at m*W*b + r*b. Batch sizes never change on
any number of ranks, and resuming at step s needs nothing but s. The flip (plain or mirrored) of each sample, and which of a cache's V stored crop
views it uses, are also drawn from (seed, e). The online path draws its crop window from (seed, e, index).
"""
import numpy as np
import torch

from ..seeding import epoch_rng


class StreamPlan:
    def __init__(self, num_samples, seed, global_batch, micro_batch, world_size, rank, flip=True, views=1,
                 drop_last=False):
        from ..errors import ConfigError

        if global_batch % (micro_batch * world_size):  # (Stage.check_inputs checks it first, from the environment)
            raise ConfigError(f"train.global_batch {global_batch} must be a multiple of train.micro_batch "
                              f"{micro_batch} x {world_size} ranks")
        if drop_last and num_samples < global_batch:
            raise ConfigError(f"train.drop_last: the data has {num_samples} samples, fewer than one global batch "
                              f"({global_batch}), so an epoch has no step; lower train.global_batch or set "
                              "train.drop_last=false")
        self.n, self.seed, self.flip, self.views, self.drop_last = num_samples, seed, flip, views, drop_last
        self.G, self.b, self.W, self.rank = global_batch, micro_batch, world_size, rank
        self.accum = global_batch // (micro_batch * world_size)
        # optimizer steps per epoch: an integer with drop_last (as len(DataLoader)), else fractional
        self.steps_per_epoch = num_samples // global_batch if drop_last else num_samples / global_batch
        self._epoch, self._tables = None, None

    def _epoch_tables(self, epoch):
        if epoch != self._epoch:
            rng = epoch_rng(self.seed, epoch)
            perm = rng.permutation(self.n)
            flips = rng.integers(0, 2, self.n) if self.flip else np.zeros(self.n, dtype=np.int64)
            # drawn after the flips, so a single-view plan keeps the order and flips it always had
            views = rng.integers(0, self.views, self.n) if self.views > 1 else np.zeros(self.n, dtype=np.int64)
            self._epoch, self._tables = epoch, (perm, flips, views)
        return self._tables

    def micro_batch(self, step, micro):
        """-> (sample indices, flip bits, view ids, epochs) for this rank's micro-step `micro` of step `step`."""
        offset = micro * self.W * self.b + self.rank * self.b
        if self.drop_last:  # within epoch step // spe: positions [k*G, (k+1)*G) of its permutation
            epoch, k = divmod(step, self.steps_per_epoch)
            pos = epoch * self.n + k * self.G + offset + np.arange(self.b)
        else:
            pos = step * self.G + offset + np.arange(self.b)
        epochs = pos // self.n
        idx, flips, views = (np.empty(self.b, dtype=np.int64) for _ in range(3))
        for e in np.unique(epochs):
            sel = epochs == e
            perm, fl, vw = self._epoch_tables(int(e))
            idx[sel] = perm[pos[sel] % self.n]
            flips[sel], views[sel] = fl[idx[sel]], vw[idx[sel]]
        return idx, flips, views, epochs


class CacheStream(torch.utils.data.IterableDataset):
    """Yields this rank's micro-batches {'mean', 'std', 'labels', 'indices'} in order from `start_step`.
    With several loader workers, worker w produces every w-th micro-batch; the loader's round-robin keeps order."""

    def __init__(self, cache, plan, start_step, total_steps):
        self.cache, self.plan, self.start, self.total = cache, plan, start_step, total_steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        k = 0
        for step in range(self.start, self.total):
            for m in range(self.plan.accum):
                if k % nw == wid:
                    idx, flips, views, _ = self.plan.micro_batch(step, m)
                    mean, std, labels = self.cache.read(idx, flips, views)
                    yield {"mean": torch.from_numpy(mean), "std": torch.from_numpy(std),
                           "labels": torch.from_numpy(labels), "indices": torch.from_numpy(idx)}
                k += 1
