"""A model family's loader node, declared once: its diffusers folder, its file widgets and its options.

Every EditKit family is loaded the same way: an optional ``models/diffusers`` folder, one file widget per
component that replaces the folder's (listing a ComfyUI models folder), a precision widget and a few family
options. Before this module each loader node wrote that shape out again (``INPUT_TYPES`` lists and tooltips,
``IS_CHANGED`` over the chosen files, ``VALIDATE_INPUTS`` naming every file widget). A family now states
a :class:`LoaderDeclaration` and its node class derives from :func:`declared_loader`, writing only its
``load`` (what to build from the chosen paths and dtype) and its descriptions.

Input names and their order are part of a saved workflow (UI workflows store widget values by position), so
a declaration lists them in the order the node has always had; ``tests/test_workflow_formats.py`` and the
real-executor workflow runs check that every bundled workflow still loads unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..pipelines.core.family import Family
from ..pipelines.core.loading import LazyModel
from . import comfy_bridge as bridge
from .common import (
    FROM_FOLDER,
    NONE,
    LoaderFiles,
    ModelFile,
    chosen_file,
    chosen_folder,
    loader_signature,
    model_precision,
    pipeline_folders,
    with_compile,
)

WEIGHT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The precision widget's choices (a family may offer fewer, e.g. Qwen-Image has no fp16)."""

@dataclass(frozen=True)
class FileInput:
    """One file widget: the ComfyUI models folder it lists and what belongs there.

    ``what`` is the missing-file message's description (with where to get it); ``component`` the
    diffusers sub-folder the file replaces; ``extensions`` names the bridge's list of offered file
    extensions (``TRANSFORMER_EXTENSIONS`` adds ``.gguf``); ``empty`` is the first choice, meaning
    "take it from the folder" (``None`` for a loader without a folder).
    """

    folder: str
    tooltip: str
    what: str
    component: str | None = None
    extensions: str = "WEIGHT_EXTENSIONS"
    empty: str | None = FROM_FOLDER

    def choices(self) -> list[str]:
        files = bridge.list_models(self.folder, getattr(bridge, self.extensions))
        return files if self.empty is None else [self.empty, *files]


@dataclass(frozen=True)
class FolderInput:
    """The ``diffusers_folder`` widget. Its default is the first folder whose ``model_index.json`` names one of
    ``pipelines`` (else one whose name contains ``name_hint``), so a new loader never starts on another model's
    folder."""

    tooltip: str
    what: str
    pipelines: tuple[str, ...] = ()
    name_hint: str | None = None

    def default(self, folders: list[str]) -> str:
        matching = pipeline_folders(*self.pipelines) if self.pipelines else []
        if not matching and self.name_hint:
            matching = [f for f in folders if self.name_hint in f.lower()]
        return matching[0] if matching else NONE


@dataclass(frozen=True)
class LoaderDeclaration:
    """What a family's loader node offers: folder, file widgets (in widget order) and other options.

    ``options`` are further widgets after the files, as ``name -> (choices or type, spec)`` or a callable
    returning that (for choices read at run time); the precision widget is usually one of them
    (:func:`dtype_input`). ``optional`` widgets come last and may be missing from a prompt: inputs added
    after workflows were saved (``compile``) go there, so API prompts written before them still validate.
    ``family`` is the model family the node loads (its ``load`` then calls ``self.parts`` and
    ``self.text_encoder``: :func:`load_parts`, :func:`load_text_encoder`); ``comfy_compute`` see :func:`load_parts`.
    """

    files: dict[str, FileInput]
    folder: FolderInput | None = None
    options: dict[str, tuple | Callable[[], tuple]] = field(default_factory=dict)
    optional: dict[str, tuple | Callable[[], tuple]] = field(default_factory=dict)
    family: Family | None = None
    comfy_compute: bool = False

    @property
    def checks(self) -> LoaderFiles:
        """The ``VALIDATE_INPUTS`` checks of these widgets (missing and damaged files named on the loader)."""
        return LoaderFiles(
            files={name: ModelFile(spec.folder, spec.what, spec.component) for name, spec in self.files.items()},
            folder_what=self.folder.what if self.folder else None,
        )

    @property
    def file_widgets(self) -> list[str]:
        return (["diffusers_folder"] if self.folder else []) + list(self.files)

    def input_types(self) -> dict:
        required: dict[str, tuple] = {}
        if self.folder is not None:
            folders = bridge.list_diffusers_folders()
            required["diffusers_folder"] = ([NONE, *folders], {
                "default": self.folder.default(folders), "tooltip": self.folder.tooltip,
            })
        for name, spec in self.files.items():
            required[name] = (spec.choices(), {"tooltip": spec.tooltip})
        for name, option in self.options.items():
            required[name] = option() if callable(option) else option
        types = {"required": required}
        if self.optional:
            types["optional"] = {name: option() if callable(option) else option
                                 for name, option in self.optional.items()}
        return types

    def signature(self, values: dict) -> str:
        """``IS_CHANGED``: size and mtime of the chosen folder and files, so a replaced file reloads."""
        return loader_signature(
            values.get("diffusers_folder") if self.folder else None,
            *((values.get(name), spec.folder) for name, spec in self.files.items()),
        )


def dtype_input(tooltip: str, choices: dict | None = None) -> tuple:
    """The precision widget (``weight_dtype``), ``auto`` by default."""
    return (list(choices or WEIGHT_DTYPES), {"default": "auto", "tooltip": tooltip})


def _with_signature(function, names: list[str], **keyword_only):
    """``function(cls, **values)`` as a classmethod whose signature names ``names``.

    ComfyUI reads ``VALIDATE_INPUTS``' argument names (``inspect.getfullargspec``) to decide which inputs it
    hands over and skips its own "value not in list" check for exactly those, so the generated method must
    name the file widgets (and only them: the precision and option widgets keep ComfyUI's list check).
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("cls", kind), *(inspect.Parameter(n, kind) for n in names)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=v) for n, v in keyword_only.items()]
    function.__signature__ = inspect.Signature(params)
    return classmethod(function)


def declared_loader(declaration: LoaderDeclaration) -> type:
    """A base class giving a loader node ``INPUT_TYPES``, ``IS_CHANGED`` and ``VALIDATE_INPUTS`` from its
    declaration; the node adds its display name, outputs and ``load``."""
    checks = declaration.checks
    names = declaration.file_widgets

    def validate(cls, *args, **values):
        values.update(zip(names, args))
        return checks.check(**values)

    def is_changed(cls, *args, **values):
        values.update(zip(names, args))
        return declaration.signature(values)

    class DeclaredLoader:
        DECLARATION = declaration
        FILES = checks
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return declaration.input_types()

        VALIDATE_INPUTS = _with_signature(validate, names)
        IS_CHANGED = classmethod(is_changed)

        def parts(self, diffusers_folder, transformer_file, vae_file, weight_dtype, compile="auto", **options):
            """The family's transformer, VAE and scheduler from these widget values (:func:`load_parts`)."""
            return load_parts(declaration.family, diffusers_folder, transformer_file, vae_file, weight_dtype, compile,
                              comfy_compute=declaration.comfy_compute, **options)

        def text_encoder(self, parts, text_encoder_file, tokenizer="qwen25"):
            """The family's one-file text encoder (:func:`load_text_encoder`)."""
            return load_text_encoder(declaration.family, parts, text_encoder_file, tokenizer)

    return DeclaredLoader


# --------------------------------------------------------------------------------------
# What every family's ``load`` does, from its Family declaration


def family_dtype(family: Family, kind: str, requested: torch.dtype | None) -> torch.dtype:
    """One dtype for a model of ``kind``: the widget's choice, else ComfyUI's; for a family that overflows in fp16
    (``Family.fp16`` False: Qwen-Image, whose ComfyUI support lists only bf16 and fp32), fp16 becomes bf16 where
    the GPU has it, else fp32."""
    dtype = requested or bridge.default_dtype(kind)
    if dtype == torch.float16 and not family.fp16:
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return dtype


@dataclass(frozen=True)
class LoadedParts:
    """What a family's loader builds the same way for every family: the chosen folder and transformer file, the
    widget's dtype, the (lazily loaded, maybe compiled) transformer and VAE, and the scheduler config."""

    folder: Path | None
    file: Path | None
    requested: torch.dtype | None
    transformer: LazyModel
    vae: LazyModel
    scheduler_config: dict


def load_parts(family: Family, diffusers_folder: str, transformer_file: str, vae_file: str, weight_dtype: str,
               compile: str = "auto", *, comfy_compute: bool = False,
               **options) -> LoadedParts:
    """The transformer, VAE and scheduler of a loader node's widget values, from ``family``.

    Precision: with ``auto`` a half-precision file stays in its own dtype where the device computes in fp32
    (``common.model_precision``); an explicit choice is the compute dtype (:func:`family_dtype`), except with
    ``comfy_compute`` (the FLUX.1 loader, whose explicit choice sets the storage and leaves the compute dtype to
    ComfyUI's rule). The VAE is never fp16 (it turns FLUX.1 pictures black) unless fp32 is asked for.
    ``options`` go to the family's transformer (Qwen-Image's ``variant``).
    """
    folder = chosen_folder(diffusers_folder)
    requested = WEIGHT_DTYPES[weight_dtype]
    file = chosen_file(transformer_file, "diffusion_models")
    compute = None if comfy_compute else family_dtype(family, "diffusion", requested)
    main = model_precision("diffusion", requested, file, folder, compute=compute)
    transformer = with_compile(family.transformer_from(folder, file, main.compute, main.storage, **options),
                               compile, file)
    vae_dtype = torch.float32 if requested == torch.float32 else bridge.default_dtype("vae")
    vae = family.vae.source(folder, chosen_file(vae_file, "vae"), vae_dtype)
    return LoadedParts(folder, file, requested, transformer, vae, family.scheduler_config(folder))


def load_text_encoder(family: Family, parts: LoadedParts, text_encoder_file: str, tokenizer: str = "qwen25"):
    """The family's one-file text encoder (Qwen2.5-VL, Qwen3): the widget's file, else the folder's, in the family's
    dtype (:func:`family_dtype`), with ComfyUI's bundled ``tokenizer`` files where the folder has none."""
    return family.text_encoder(parts.folder, chosen_file(text_encoder_file, "text_encoders"),
                               family_dtype(family, "text_encoder", parts.requested),
                               bridge.comfy_tokenizer_dir(tokenizer))
