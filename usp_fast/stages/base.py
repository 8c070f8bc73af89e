"""The contract between the shared training loop (`usp_fast/engine.py`) and a stage (pretrain, generate, ...).

A stage names its config schema (`usp_fast.config`) and says what the model is, how a micro-batch turns into a
loss, and what to do after a step and at the end. `run(cfg, resume)` drives it: by default the shared Trainer
(DeepSpeed set-up, the deterministic data stream, lr schedule, precision, logging, checkpoints, exact resume,
the progress bar); stages that do not train per step (cache, probe) override `run`.
"""


def check_batches(train, world=None):
    """train.global_batch must be a whole number of micro-batches on every rank: a multiple of train.micro_batch x
    the world size (from the environment unless given). Raises ConfigError listing the valid global batches."""
    from ..dist import env_world_size
    from ..errors import ConfigError

    world, source = env_world_size() if world is None else (world, None)
    step = train.micro_batch * world
    if world > 0 and train.global_batch % step:
        where = f" ({source}={world})" if source else ""
        fits = [d for d in range(1, train.global_batch // world + 1) if train.global_batch % (d * world) == 0]
        other = f", or keep it with a train.micro_batch of {', '.join(map(str, fits[-6:]))}" if fits else ""
        raise ConfigError(f"train.global_batch {train.global_batch} is not a multiple of train.micro_batch "
                          f"{train.micro_batch} x {world} ranks{where} = {step}: valid global batches are the "
                          f"multiples of {step} ({', '.join(str(step * k) for k in range(1, 5))}, ...){other}")


class Stage:
    #: stage name as given to --stage
    name = ""
    #: the stage's config schema (a usp_fast.config.Config subclass)
    config = None
    #: does the stage need class labels from the cache
    needs_labels = False
    #: does train.global_batch split over the ranks (the shared loop; not probe, which trains in one process)
    splits_batch = True

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- the driver ----
    def check_inputs(self):
        """Cheap checks of the user's inputs (data roots, export folders) before any process group, VAE, model or
        data is touched. Raise a usp_fast.errors.UserError naming the key and what was expected."""
        from ..data.prepare import check_data_source

        d = self.cfg.data
        if self.splits_batch:
            check_batches(self.cfg.train)
        check_data_source(d, need_images=d.source == "online" or d.auto_cache, vae_name=self.cfg.vae.name,
                          need_labels=self.labels_required(), labels_hint=self.labels_hint)

    def labels_required(self):
        """Does this run train (or evaluate) on class labels? Then a flat image folder, whose labels would all be 0,
        is refused. Default: `needs_labels`."""
        return self.needs_labels

    #: ends the message refusing unlabelled data (e.g. the stage's label-free option)
    labels_hint = ""

    def run(self, resume=None, overwrite=False, allow_config_change=False):
        """Prepare the data (latent cache or online source), then train with the shared loop (`resume`,
        `overwrite`, `allow_config_change`: see usp_fast.run_folder). -> result dict."""
        from ..engine import Trainer
        from ..data.prepare import prepare_data

        prepare_data(self.cfg, build_missing=self.cfg.data.auto_cache and self.cfg.data.source == "cache",
                     reuse_complete=True)
        return Trainer(self.cfg, self, resume, overwrite, allow_config_change).train()

    # ---- what the Trainer calls ----
    def data_source(self, device):
        """-> None (the default: data.source's latent cache or online images) or (source, manifest): a source of
        the stage's own with the LatentCache interface (len, read) or an online one (len, stream), yielding
        {'mean', 'std', 'labels', 'indices'} micro-batches; 'labels' may be any per-sample tensor (segment: masks)."""
        return None

    def build_model(self, manifest, latent_norm):
        """-> nn.Module. `manifest` describes the data (latent_channels, latent_size, num_classes, vae, ...: the
        cache's manifest or the online source's); `latent_norm` is the run's usp_fast.vae.LatentNorm."""
        raise NotImplementedError

    def latent_norm(self, manifest):
        """-> the LatentNorm this run trains in (vae.normalize with the cache manifest's statistics)."""
        from ..vae import LatentNorm

        return LatentNorm.from_manifest(self.cfg.vae.normalize, manifest, self.cfg.data.sample_posterior)

    def param_groups(self, model):
        """-> optimizer param groups (dicts with 'params' and 'weight_decay', optionally 'lr_scale');
        the engine sets each group's lr."""
        raise NotImplementedError

    def build_optimizer(self, param_groups, base_lr):
        """-> a torch optimizer over `param_groups` (default: AdamW with optim.betas, fused on CUDA). Each step the
        engine sets every group's lr to the scheduled lr times the group's optional `lr_scale` (default 1)."""
        import torch

        params = [p for g in param_groups for p in g["params"]]
        on_cuda = bool(params) and params[0].device.type == "cuda"
        betas = tuple(self.cfg.optim.betas)
        if self.cfg.optim.impl == "apex":
            return apex_adamw(param_groups, base_lr, betas, on_cuda)
        return torch.optim.AdamW(param_groups, lr=base_lr, betas=betas, fused=on_cuda)

    def loss(self, model, batch, generator):
        """One micro-batch -> (scalar loss tensor, {name: scalar tensor} extra metrics; no host syncs).
        batch: {'latents': [B, C, H, W] on the device in the compute dtype, 'labels': [B] int64 (if needed)}.
        generator: a torch.Generator on the device, seeded per (seed, step, micro-step, rank), for all randomness."""
        raise NotImplementedError

    def attach(self, engine):
        """Called once on every rank after DeepSpeed has wrapped the model (before a checkpoint is loaded)."""

    def after_step(self, model, step):
        """Called after each optimizer step (e.g. EMA update)."""

    def collect(self):
        """Called on every rank before `finish` (rank 0): gather what the ranks hold in parts (collectives)."""

    def state_dict(self):
        """Extra state saved in checkpoints (e.g. EMA weights); called on every rank at each checkpoint."""
        return {}

    def load_state_dict(self, state):
        pass

    def finish(self, model, run_dir, manifest, latent_norm, step, epoch):
        """Called once on rank 0 at the end (e.g. export the encoder, recording `latent_norm`). Returns a dict of
        paths to report."""
        return {}


def apex_adamw(param_groups, lr, betas, on_cuda):
    """optim.impl=apex: NVIDIA apex's FusedAdam in AdamW mode (decoupled weight decay, per group)."""
    from ..errors import ConfigError

    try:
        from apex.optimizers import FusedAdam
    except ImportError as e:
        raise ConfigError("optim.impl=apex: NVIDIA apex is not installed (it is not on PyPI, whose 'apex' is an "
                          "unrelated package: build it from github.com/NVIDIA/apex), or use optim.impl=auto") from e
    if not on_cuda:
        raise ConfigError("optim.impl=apex: apex's FusedAdam runs on CUDA only; use optim.impl=auto on CPU")
    return FusedAdam(param_groups, lr=lr, betas=betas, adam_w_mode=True)
