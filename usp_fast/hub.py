"""from_pretrained / save_pretrained / push_to_hub for the project's models through huggingface_hub's
PyTorchModelHubMixin, over the folder layouts the stages write (so every existing folder loads as before):

    USPViT      encoder export     encoder.safetensors + encoder.json                   (--stage pretrain)
    DiT / SiT   generator folder   model.safetensors, ema.safetensors, generator.json   (--stage generate; a
                                   checkpoint folder of a generate run loads too)
    Classifier  classifier folder  model.safetensors + meta.json                        (--stage finetune;
                                   usp_fast.models.classifier)

The mixin supplies the hub plumbing: `from_pretrained("org/name")` fetches the mixin's config.json and then the
folder's own files (snapshot_download into the HF cache), and `push_to_hub` uploads what `save_pretrained` writes.
`save_pretrained` writes the project's files (atomically, through usp_fast.artifacts) and the mixin adds config.json
(the constructor's config) and a model card README.md. What is read back is always the project's json: config.json
is for the hub, and older folders have none.
A path that exists locally never goes to the hub (works offline, and a broken folder is named in the project's
terms); a string that is not a local path but is a valid hub id is looked up on the hub, and when the hub cannot
be reached (HF_HUB_OFFLINE=1, no network) that is one line (HubError; the CLI prints it and exits 2).
`from_pretrained` returns (model, meta) as the project's loaders always have; `model.export_meta` is that meta.
"""
import os
from pathlib import Path

from huggingface_hub import ModelHubMixin, PyTorchModelHubMixin

from .errors import UserError

HUB_ARGS = ("revision", "cache_dir", "force_download", "local_files_only", "token")


class HubError(UserError, OSError):
    pass


def is_hub_id(name):
    """A string the hub would accept as a model id ('org/name' or 'name'); local-looking paths are not."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
        return True
    except HFValidationError:
        return False


def load(cls, path, **kwargs):
    """The body of every `from_pretrained`: a local path straight to the mixin's loading hook `_from_pretrained`
    (skipping the mixin's config.json lookup, which older folders would warn about), a hub id through the mixin's
    `from_pretrained` -> model (with `export_meta`)."""
    src = str(path)
    if os.path.exists(src) or not is_hub_id(src):
        kwargs = {k: v for k, v in kwargs.items() if k not in HUB_ARGS}
        return cls._from_pretrained(model_id=src, revision=None, cache_dir=None, force_download=False,
                                    local_files_only=True, token=None, **kwargs)
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:  # the mixin's own from_pretrained (the classes override it to keep returning (model, meta))
        return ModelHubMixin.from_pretrained.__func__(cls, src, **kwargs)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError):
        why = "offline: HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "no connection"
        raise HubError(f"{src} is not a local folder and the hub could not be reached ({why}): download it first "
                       f"(hf download {src} --local-dir DIR) or pass a local path") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise HubError(f"{src} is not a local folder, and the hub has no {cls.__name__} repository you can read by "
                       f"that name ({type(e).__name__}): pass a local path or another hub id") from None


class ExportHubMixin(PyTorchModelHubMixin, library_name="usp-fast", tags=["usp-fast"]):
    """The mixin's hooks over a project folder. A model class provides `_load_folder(folder, **kw)` -> model and
    `_save_folder(folder, *args, **kw)` -> the meta written, and names its files in HUB_FILES (what a hub download
    fetches)."""

    HUB_FILES = ()
    export_meta = None  # the description of the folder the model was last loaded from or saved to

    @classmethod
    def hub_files(cls, **kwargs):
        return list(cls.HUB_FILES)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token, cfg=None,
                         **kwargs):
        # cfg: the mixin's decoded config.json; the folder's own json is the description that is read
        folder = model_id
        if not os.path.exists(model_id) and is_hub_id(model_id):  # else the folder loader names what is missing
            from huggingface_hub import snapshot_download

            folder = snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                       force_download=force_download, local_files_only=local_files_only, token=token,
                                       allow_patterns=cls.hub_files(**kwargs))
        return cls._load_folder(Path(folder), **kwargs)

    def save_pretrained(self, save_directory, *args, config=None, push_to_hub=False, repo_id=None,
                        model_card_kwargs=None, **kwargs):
        """Write the project folder (`args`/`kwargs` go to the class's `_save_folder`) plus the mixin's config.json
        and README.md; push_to_hub=True then uploads it as `repo_id` (default: the folder's name; the token from
        `hf auth login` or HF_TOKEN). -> the folder."""
        self._save_args = (args, kwargs)  # the mixin's _save_pretrained hook takes only the folder
        try:
            super().save_pretrained(save_directory, config=config, model_card_kwargs=model_card_kwargs)
        finally:
            del self._save_args
        if push_to_hub:  # the mixin saves again into a temporary folder, from export_meta, and uploads that
            self.push_to_hub(repo_id or Path(save_directory).name, config=config, model_card_kwargs=model_card_kwargs)
        return Path(save_directory)

    def _save_pretrained(self, save_directory):
        args, kwargs = getattr(self, "_save_args", ((), {}))
        self.export_meta = self._save_folder(Path(save_directory), *args, **kwargs)


def registry_name(models, fields):
    """The registry entry (name -> dict of config fields) whose every field matches `fields`, or None."""
    for name, spec in models.items():
        if all(fields.get(k) == v for k, v in spec.items()):
            return name
    return None
