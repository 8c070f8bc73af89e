"""`--stage cache`: decode, crop and VAE-encode every image (and its flip, and `cache.views` extra crops) into the
sharded latent cache. Training stages read it; `data.auto_cache` lets them build it themselves."""
from ..config import CacheStageConfig
from ..data.prepare import check_data_source, prepare_data
from .base import Stage


class CacheStage(Stage):
    name = "cache"
    config = CacheStageConfig

    def check_inputs(self):
        check_data_source(self.cfg.data, need_images=True, vae_name=self.cfg.vae.name)

    def run(self, resume=None, overwrite=False, allow_config_change=False):
        cache_dir = prepare_data(self.cfg, build_missing=True)
        return {"cache": str(cache_dir)}
