"""A model family's components, declared once: how each loads from a diffusers folder or a single file.

Every family loads its transformer and VAE the same way: from a ComfyUI single file (the family's own
:class:`~.single_file.SingleFile` declarations read by the shared reader: key layout, config inferred from
shapes, GGUF/fp8 handling), or from the ``transformer`` / ``vae``
sub-folder of a diffusers folder with the diffusers class's ``from_pretrained``; either way lazily, behind a
:class:`~.loading.LazyModel` whose cache key is the identity of the bytes it reads, with the family's
precision rule applied. A :class:`ComponentSpec` states what differs (the diffusers class, the single-file
declaration, checks that refuse another model's folder, the messages); the shared code here and in
:mod:`.single_file` does the rest, so a new family writes declarations, not another copy of a loader.

Identity covers every file of a folder component (config and weight shards, size and modification time),
so replacing a folder's weights loads them instead of reusing the model already in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelFileError
from .latent_format import LatentFormat
from .loading import LazyModel, file_key, folder_key, read_json, scheduler_config, unavailable
from .lora import LoraFamily
from .precision import Precision, apply_precision
from .runtime import Component
from .single_file import SingleFile

FileReader = Callable[[Path, torch.dtype, "torch.dtype | None"], Component]


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


@dataclass(frozen=True)
class ComponentSpec:
    """One component of a family (a transformer or a VAE) and how it loads.

    ``tag`` keys the shared cache; ``what`` names it in messages ("FLUX.1 transformer"); ``subfolder`` and
    ``model_class`` say where and what it is in a diffusers folder; ``single_file`` declares how one file
    loads (:class:`~.single_file.SingleFile`: the shared reader, for transformers and VAEs), or ``from_file``
    reads it as ``(path, compute dtype, storage dtype or None)`` where a component must decide more before
    the shared reader runs (Qwen-Image's transformer reads its variant first); ``missing`` is the message when
    neither a folder nor a file is chosen. ``check_config(config, sub)`` may refuse a folder's config (another model of the same
    class), ``check_module(module, sub)`` the loaded model. ``casts``: dense weights are stored in the
    storage dtype and cast per layer to the compute dtype (:mod:`.precision`); otherwise the component is
    stored and run in one dtype (VAEs). ``config_overrides`` (pairs) replace values of the folder's config when
    it loads, for switches that add no weights (Qwen-Image-Edit-2511's ``zero_cond_t`` chosen in a loader); give
    such a spec its own ``tag`` so the two versions are cached apart.
    """

    tag: str
    what: str
    subfolder: str
    model_class: str
    kind: str
    missing: str
    from_file: FileReader | None = None
    single_file: SingleFile | None = None
    check_config: Callable[[dict, Path], None] | None = None
    check_module: Callable[[torch.nn.Module, Path], None] | None = None
    casts: bool = False
    config_overrides: tuple[tuple[str, object], ...] = ()

    def read_file(self, path: Path, dtype: torch.dtype, storage: torch.dtype | None = None) -> Component:
        if self.from_file is not None:
            return self.from_file(path, dtype, storage)
        return self.single_file.load(path, dtype, storage)

    def from_folder(self, folder: Path, dtype: torch.dtype, storage: torch.dtype | None = None) -> Component:
        sub = folder / self.subfolder
        short = self.what.split()[-1]
        if not (sub / "config.json").is_file():
            raise ModelFileError(sub, f"No {short} in this diffusers folder",
                                 f"a '{self.subfolder}' sub-folder with config.json")
        config = read_json(sub / "config.json")
        found = config.get("_class_name")
        if found not in (None, self.model_class):
            raise ModelFileError(sub, f"This folder holds a {found}, not a {self.what}", f"a {self.model_class}")
        if self.check_config is not None:
            self.check_config(config, sub)
        precision = Precision(storage or dtype, dtype)
        try:
            model = _diffusers_class(self.model_class).from_pretrained(
                str(sub), torch_dtype=precision.storage if self.casts else dtype, local_files_only=True,
                **dict(self.config_overrides))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelFileError(sub, f"Cannot load the {short} ({exc})", f"a diffusers {self.model_class}") from exc
        if self.check_module is not None:
            self.check_module(model, sub)
        model.eval().requires_grad_(False)
        if self.casts:
            apply_precision(model, precision, self.single_file.widen if self.single_file else ())
        return Component(model, self.kind, f"{folder.name}/{self.subfolder}", dtype)

    def source(self, folder: Path | None, file: Path | None, dtype: torch.dtype,
               storage: torch.dtype | None = None) -> LazyModel:
        """A lazily loaded component: ``file`` if given, else the folder's sub-folder.

        ``dtype`` is the compute dtype; with ``casts``, dense weights are stored in ``storage`` (default:
        ``dtype``) and cast layer by layer.
        """
        storage = None if storage == dtype or not self.casts else storage
        if file is None and folder is None:
            return unavailable(self.what, self.missing)
        if file is not None:
            return LazyModel((self.tag, file_key(file), dtype, storage),
                             lambda: self.read_file(file, dtype, storage), f"{self.what} {file.name}")
        return LazyModel((self.tag, folder_key(folder, self.subfolder), dtype, storage),
                         lambda: self.from_folder(folder, dtype, storage), f"{self.what} of {folder.name}")


@dataclass(frozen=True)
class Family:
    """A model family, declared once: its components, latent format, scheduler and LoRA rules.

    What a family *is* lives here, so shared code does the rest from it: the loader node builds its loading from
    ``transformer`` / ``vae`` (``nodes/family_loader.py`` ``load_parts``: folder or file, precision, identity and
    caching, compile); the scheduler config is the folder's own or the shipped ``scheduler`` file; samplers convert
    LATENTs at the boundary with ``latent_format(vae)`` (raw VAE space ↔ model space, ``core.latent_format``);
    LoRA nodes read ``lora`` (key converter, architecture check, ``core.lora``); the text encoder loads through
    ``text_encoder`` (each family's prompt format differs, so its source function is declared, not derived).

    ``pipelines`` are the ``model_index.json`` classes of the family's diffusers folders (a loader's default
    folder); ``transformer_source`` replaces ``transformer.source`` where a family picks between variants of one
    file (Qwen-Image-Edit 2509 / 2511) and takes extra keyword options; ``fp16``: False where the model overflows in
    fp16 (Qwen-Image), so an fp16 choice computes in bf16 (or fp32 without bf16). ``pipelines/families.py`` lists
    every family; ``tests/test_family_declarations.py`` checks each declaration against the models it names.
    """

    name: str
    transformer: ComponentSpec
    vae: ComponentSpec
    text_encoder: Callable[..., LazyModel]
    scheduler: Path
    latent_format: Callable[[Component], LatentFormat]
    lora: LoraFamily | None = None
    pipelines: tuple[str, ...] = ()
    fp16: bool = True
    transformer_source: Callable[..., LazyModel] | None = None

    def scheduler_config(self, folder: Path | None) -> dict:
        """The folder's scheduler config, or the family's shipped one when loading from single files."""
        return scheduler_config(folder, self.scheduler)

    def transformer_from(self, folder: Path | None, file: Path | None, dtype: torch.dtype,
                         storage: torch.dtype | None = None, **options) -> LazyModel:
        """The lazily loaded transformer (``options``: the family's own, e.g. Qwen-Image's ``variant``)."""
        if self.transformer_source is not None:
            return self.transformer_source(folder, file, dtype, storage, **options)
        if options:
            raise TypeError(f"The {self.name} transformer takes no options ({', '.join(options)})")
        return self.transformer.source(folder, file, dtype, storage)
