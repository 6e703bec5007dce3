"""GGUF weights against dense ones: one transformer call (= one Fill step) per configuration.

Dense fp32 weights are the reference; each GGUF type (Q8_0, Q5_1, Q4_0 written by gguf-py, and the
K-quant Q4_K, whose blocks are written directly because gguf-py cannot quantize to it: random packed
bytes with valid scales, which cost the same to decode) runs with the dequantized-layer cache

* ``full``  as large as the model needs (what a machine with enough free memory gets),
* ``10%``   limited to 10 % of the model's dequantized size (a 12B model's situation: its fp32 copy
            does not fit), ``EDITKIT_GGUF_CACHE`` set to that many MiB,
* ``off``   every layer dequantized at every call.

Configurations alternate round by round in one process; the first call of each (it fills the cache)
is the "first call" column. Also loading peak memory, through ``scripts.bench.fill``'s ``load`` part.

``layers``: the linear layers of one FLUX.1 double block and one single block at real size, each fed the
rows it sees in a 512² Fill step with 512 text tokens (image stream 1024, text stream 512, single blocks
1536, modulation 1), dense ``F.linear`` against EditKit's GGUF layer with no cache (every weight decoded
at every call: the worst case, what a layer outside a 10 % cache pays). Seconds are the process's CPU
time (so the other jobs of a shared machine do not enter them; run it with ``--threads 1``), per block
pair, alternating rounds.

``decode``: nanoseconds per weight to decode one 3072 x 3072 weight of each type into the compute dtype
(CPU time, a reused output, alternating rounds; ``--threads 1`` for the per-core figure).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import models
from .harness import Settings, alternate, pack_module, print_table, timing_table

PARTS = ("calls", "layers", "decode")
DECODE_TYPES = ("Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# (out, in, rows) of the linear layers of one FLUX.1 double block and one single block, 512² Fill, 512 text tokens
FLUX_BLOCK_LAYERS = ([(18432, 3072, 1)] * 2 + [(3072, 3072, 1024)] * 4 + [(3072, 3072, 512)] * 4
                     + [(12288, 3072, 1024), (3072, 12288, 1024), (12288, 3072, 512), (3072, 12288, 512)]
                     + [(9216, 3072, 1)] + [(3072, 3072, 1536)] * 3 + [(12288, 3072, 1536), (3072, 15360, 1536)])
QUANTS = ("Q8_0", "Q5_1", "Q4_0", "Q4_K")
CACHES = ("full", "10%", "off")


def write_kquant(state_dict: dict, path: Path, quant: str = "Q4_K") -> None:
    """GGUF file whose 2-D weights (rows of 256-blocks) are ``quant`` blocks of random bytes with valid fp16
    super-block scales (gguf-py only decodes K-quants), every other tensor F32: the tests' GGUF writer, given
    :func:`_random_packed` blocks instead of gguf-py's quantization."""
    from tiny.core import write_gguf

    rng = np.random.default_rng(0)
    write_gguf(state_dict, path, quant, pack=lambda array: _random_packed(quant, *array.shape, rng).numpy())


def _inputs(config, settings: Settings):
    flow = pack_module("pipelines.flux.flow")
    g = torch.Generator().manual_seed(0)
    side, device, dtype = settings.size // 8, settings.device, settings.dtype
    return dict(
        hidden_states=torch.randn(1, (side // 2) ** 2, config.in_channels, generator=g).to(device, dtype),
        timestep=torch.tensor([0.6], device=device, dtype=dtype), guidance=torch.tensor([30.0], device=device),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, settings.text_tokens, config.joint_attention_dim,
                                          generator=g).to(device, dtype),
        txt_ids=flow.text_ids(settings.text_tokens, device), img_ids=flow.token_ids(side, side, 0, device),
        return_dict=False,
    )


def calls_part(settings: Settings) -> None:
    from tiny.core import write_gguf

    layout = pack_module("pipelines.flux.layout")
    loading = pack_module("pipelines.flux.loading")
    runtime_mod = pack_module("pipelines.core.runtime")
    quants = settings.extra.get("quants", QUANTS)
    caches = settings.extra.get("caches", CACHES)
    runtime = runtime_mod.TorchRuntime(settings.device)
    saved = os.environ.get("EDITKIT_GGUF_CACHE")
    with tempfile.TemporaryDirectory() as scratch:
        dense = models.flux_transformer("fill", settings.flux_depth, settings.dtype, settings.device)
        dense_bytes = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
        bfl = layout.diffusers_transformer_to_bfl(dense.state_dict())
        variants = {"dense (reference)": models.component(dense, "dense", settings.dtype)}
        sizes = {}
        for quant in quants:
            path = Path(scratch) / f"fill-{quant}.gguf"
            (write_kquant if quant.endswith("_K") else write_gguf)(bfl, path, quant)
            for cache in caches:
                component = loading.transformer_source(None, path, settings.dtype).derived(
                    f"{quant}-{cache}", lambda c: c, "GGUF").get()
                os.environ["EDITKIT_GGUF_CACHE"] = {"full": str(dense_bytes // 2**20 + 1),
                                                    "10%": str(dense_bytes / 10 / 2**20), "off": "off"}[cache]
                runtime.acquire(component)
                variants[f"{quant}, cache {cache}"] = component
            sizes[quant] = path.stat().st_size
        del bfl
    if saved is None:
        os.environ.pop("EDITKIT_GGUF_CACHE", None)
    else:
        os.environ["EDITKIT_GGUF_CACHE"] = saved
    inputs = _inputs(dense.config, settings)
    outputs = {}

    core_gguf = pack_module("pipelines.core.gguf")

    def call(label, component, decode_threads=None):
        def run():
            saved = core_gguf.DECODE_THREADS
            core_gguf.DECODE_THREADS = saved if decode_threads is None else decode_threads
            try:
                with torch.inference_mode():
                    out = component.module(**inputs)[0]
            finally:
                core_gguf.DECODE_THREADS = saved
            outputs.setdefault(label, out.float())

        return run

    cases = {label: call(label, c) for label, c in variants.items()}
    if settings.extra.get("decode_ab"):  # the same files decoded on every thread (before DECODE_THREADS = 1)
        for label, component in list(variants.items())[1:]:
            cases[f"{label}, decode on all threads"] = call(f"{label}, decode on all threads", component, 0)
            variants[f"{label}, decode on all threads"] = component
    timings = alternate(cases, settings.rounds, device=settings.device)
    reference = outputs["dense (reference)"]
    extra = {}
    for label, component in variants.items():
        cache = component.extras.get("dequant_cache")
        error = ((outputs[label] - reference).abs().max() / reference.abs().max()).item()
        extra[label] = {"cache MiB": None if cache is None else cache.used / 2**20,
                        "cache layers": None if cache is None else cache.layers, "max rel. err": f"{error:.1e}"}
    d, s = settings.flux_depth
    timing_table(f"One FLUX.1-Fill transformer call, {d}+{s} blocks (dense {dense_bytes / 2**20:.0f} MiB), "
                 f"{settings.size}², {settings.text_tokens} text tokens, {settings.describe()}",
                 timings, unit="s/call", extra=extra)
    print_table("GGUF files", ["type", "MiB"], [[q, b / 2**20] for q, b in sizes.items()])


def _random_packed(quant: str, rows: int, cols: int, rng) -> torch.Tensor:
    """Random blocks of ``quant`` with small finite fp16 scale fields (decoding costs the same for any bytes)."""
    import gguf

    kind = getattr(gguf.GGMLQuantizationType, quant)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    packed = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    halves = {"Q8_0": (0,), "Q4_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (size - 2,),
              "Q2_K": (size - 4, size - 2), "Q3_K": (size - 2,)}
    for offset in halves[quant]:
        packed[..., offset:offset + 2] = np.frombuffer(np.float16(0.0005).tobytes(), dtype=np.uint8)
    return torch.from_numpy(packed.reshape(rows, -1))


def layers_part(settings: Settings) -> None:
    import time

    from diffusers.quantizers.gguf.utils import GGUFParameter

    core_gguf = pack_module("pipelines.core.gguf")
    linear = pack_module("pipelines.core.matmul").linear  # the products the GGUF layers use too
    quants = settings.extra.get("quants", QUANTS)
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    dtype = settings.dtype
    shapes = FLUX_BLOCK_LAYERS if not settings.quick else [(o, i, min(r, 64)) for o, i, r in FLUX_BLOCK_LAYERS[1:4]]
    dense = [(torch.randn(o, i, generator=g) * 0.02).to(dtype) for o, i, _ in shapes]
    inputs = [torch.randn(r, i, generator=g).to(dtype) for _, i, r in shapes]
    layers = {}
    for quant in quants:
        import gguf

        kind = getattr(gguf.GGMLQuantizationType, quant)
        built = []
        for out_features, in_features, _ in shapes:
            layer = core_gguf.GGUFLinear(in_features, out_features, bias=False, compute_dtype=dtype)
            layer.weight = GGUFParameter(_random_packed(quant, out_features, in_features, rng), quant_type=kind)
            built.append(layer)
        layers[quant] = built

    def case(run):
        def timed():
            started = time.process_time()
            with torch.inference_mode():
                run()
            return time.process_time() - started

        return timed

    cases = {"dense linear (reference)": case(lambda: [linear(x, w) for x, w in zip(inputs, dense)])}
    for quant, built in layers.items():
        cases[f"{quant}, every weight decoded"] = case(
            lambda built=built: [layer(x) for layer, x in zip(built, inputs)])
    timings = alternate(cases, settings.rounds)
    params = sum(o * i for o, i, _ in shapes)
    few = sum(o * i for o, i, r in shapes if r == 1)
    timing_table(f"Linear layers of one FLUX.1 double + one single block ({params / 1e6:.0f} M weights, "
                 f"{few / params:.0%} in 1-row modulation layers), rows of a 512² Fill step with 512 text tokens, "
                 f"no dequantized-layer cache, CPU seconds, {settings.describe()}", timings, unit="CPU s/block pair")


def decode_part(settings: Settings) -> None:
    import time

    import gguf

    core_gguf = pack_module("pipelines.core.gguf")
    rows = cols = 3072
    rng = np.random.default_rng(0)
    out = torch.empty(rows, cols, dtype=settings.dtype)

    def case(quant):
        kind, packed = getattr(gguf.GGMLQuantizationType, quant), _random_packed(quant, rows, cols, rng)

        def timed():
            started = time.process_time()
            core_gguf.dequantize(packed, kind, (rows, cols), settings.dtype, out=out)
            return (time.process_time() - started) / (rows * cols) * 1e9

        return timed

    timings = alternate({quant: case(quant) for quant in DECODE_TYPES}, settings.rounds)
    timing_table(f"Decoding a {rows}x{cols} GGUF weight into {str(settings.dtype).removeprefix('torch.')}, CPU time, "
                 f"{settings.describe()}", timings, unit="ns per weight")


def run(settings: Settings, parts=PARTS) -> None:
    for part in parts:
        {"calls": calls_part, "layers": layers_part, "decode": decode_part}[part](settings)
