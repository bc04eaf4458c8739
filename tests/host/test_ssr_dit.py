"""SSR-Merge through the merge node on every synthetic DiT family the host loads (Flux, SD3.5, Flux.2, Krea 2,
Z-Image, Qwen-Image, Wan 2.1 and 2.2, devkit/synthetic_dit.py), each in a trainer's fused key form against a split
one (diffusers' q / k / v pieces that ComfyUI maps onto rows of one fused linear) where the family has one: the
calibration's statistics are those of the layer inputs of the stock KSampler's first step (each LoRA alone loaded by
the stock LoraLoaderModelOnly at strength 1, seed 42, 1 euler step, CFG 1, on the empty latent of the family's own
stock node: Flux.2's 128 channels at 16 px a latent pixel, Wan's one-frame video latents, Wan 2.2 5B's 48 channels at
16 px), and each merged layer is the published rule B Q G^-1 A written here.

A fused linear trained by split pieces is one layer: its A stacks the pieces' downs, its B places each piece's up
(alpha / rank folded in) on the piece's rows; the statistics are of that linear's input.
"""

import pytest
import torch

from devkit import synthetic_dit
from devkit.dit_loras import FORMATS_BY_HOST, KEY_FORMS, diffusers_pieces, native_linears, random_dit_lora, write_lora
from devkit.loaded_pack import pack_module
from tests.support.calibration import dense_router
from devkit.synthetic_dit import ALL_FAMILIES

from tests.conftest import host_version
from tests.support.families import WIDE_MODULES, canonical, lora_modules

pytestmark = pytest.mark.host

FAMILIES = {name: family for name, family in ALL_FAMILIES.items()
            if not synthetic_dit.host_lacks(family, host_version())}
PIXELS = 64  # the merge node's smallest calibration size; every family's latent takes it whole (Wan 2.2: 4 x 4)
RIDGE = 1e-4
SUBJECT_RANK, STYLE_RANK = 4, 3
# the stock node a workflow of the family makes its empty latent with (ComfyUI's templates), and its arguments besides
# width and height: written from the families' workflows, not from the pack's latent_shape
EMPTY_LATENT = {**dict.fromkeys(("flux", "sd35", "krea2", "zimage", "qwen_image"), ("EmptySD3LatentImage", {})),
                "flux2": ("EmptyFlux2LatentImage", {}),
                "wan21": ("EmptyHunyuanLatentVideo", {"length": 1}),  # one frame: (length - 1) // 4 + 1
                "wan22": ("Wan22ImageToVideoLatent", {"vae": None, "length": 1, "batch_size": 1})}  # no start image


def _forms(family: str) -> list[tuple[str, str]]:
    """(subject form, style form): the trainer's fused form (kohya) against a split one where the host reads one,
    and the other way round (a split subject against ComfyUI's generic fused form); Wan's LoRAs come fused only. The
    wide families (Z-Image, Qwen-Image: seconds a step) the first pair only, which has a fused and a split form."""
    formats = FORMATS_BY_HOST.get(host_version(), FORMATS_BY_HOST["0.33.0"])[family]
    split = [fmt for fmt in formats if KEY_FORMS[fmt].split]
    if not split:
        return [("kohya", "comfy")]
    return [("kohya", split[0])] + ([] if family in WIDE_MODULES else [(split[-1], "comfy")])


CASES = [(family, *forms) for family in FAMILIES for forms in _forms(family)]


@pytest.fixture(scope="module")
def models(dit_float32):
    synthetic_dit.ensure_dit(families=list(FAMILIES), in_process=True)  # the files first: the LoRAs read their shapes
    return dit_float32


def _factors(family, fmt: str, state: dict, native: str, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) float64 of one native linear, alpha / rank folded into B; split pieces stacked in
    A, each one's up placed on its band of B's rows (written from devkit's piece table, not the pack's key map)."""
    form = KEY_FORMS[fmt]
    pieces = diffusers_pieces(family, native, d_out) if form.split else None
    downs, ups = [], []
    for module, start, rows in ([(p.diffusers, p.row_start, p.rows) for p in pieces] if pieces else [(native, 0, d_out)]):
        stem = form.prefix + (module.replace(".", "_") if form.underscores else module)
        up, down = state[f"{stem}.{form.up}.weight"].double(), state[f"{stem}.{form.down}.weight"].double()
        alpha = state.get(f"{stem}.alpha") if form.alpha else None
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        placed = torch.zeros(d_out, down.shape[0], dtype=torch.float64)
        placed[start:start + rows] = up * scale
        downs.append(down)
        ups.append(placed)
    return torch.cat(downs), torch.cat(ups, dim=1)


def _empty_latent(nodes, family: str) -> dict:
    """The LATENT of PIXELS a side that the family's stock empty-latent node makes."""
    node, args = EMPTY_LATENT[family]
    return nodes.NODE_CLASS_MAPPINGS[node].execute(width=PIXELS, height=PIXELS, **args)[0]


def _first_step_inputs(comfy_host, family: str, model, lora: str, conditioning, modules) -> dict[str, torch.Tensor]:
    """Every module's inputs (tokens, d_in), float64, during the stock KSampler's one step on the family's stock empty
    latent of PIXELS, ``lora`` alone at strength 1."""
    import comfy.model_management

    nodes, _, _ = comfy_host
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora, 1.0)
    recorded: dict[str, list[torch.Tensor]] = {}
    diffusion = patched.model.diffusion_model
    hooks = []
    for name in modules:
        def record(module, args, name=name):
            x = args[0]
            recorded.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).detach().double().cpu())
        hooks.append(diffusion.get_submodule(name).register_forward_pre_hook(record))
    try:
        latent = _empty_latent(nodes, family)
        nodes.common_ksampler(patched, 42, 1, 1.0, "euler", "normal", conditioning, conditioning, latent, denoise=1.0)
    finally:
        for hook in hooks:
            hook.remove()
        comfy.model_management.unload_all_models()  # the patched weights back before the next run
    return {name: torch.cat(chunks) for name, chunks in recorded.items()}


def _stacking(merged_down: torch.Tensor, down: torch.Tensor, subject_rank: int) -> torch.Tensor:
    """The order in which the pack stacked the rows of A (a split file's pieces come in the key map's order, not the
    rows'): for each row of the merged A' (= A at strength 1) the row of ``down`` it is, each exactly once, the
    subject's rows before the style's."""
    distance = torch.cdist(merged_down, down)
    order = distance.argmin(dim=1)
    assert float(distance.min(dim=1).values.max()) <= 1e-6 * float(down.norm(dim=1).max())
    assert sorted(order.tolist()) == list(range(down.shape[0])) and bool((order[:subject_rank] < subject_rank).all())
    return order


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name,subject_fmt,style_fmt", CASES, ids=["-".join(case) for case in CASES])
def test_ssr_merge_is_the_ksamplers_first_step_and_the_published_rule(comfy_host, models, name, subject_fmt, style_fmt):
    import comfy.model_management

    nodes, _, loras = comfy_host
    family, model = FAMILIES[name], models[name]
    modules = lora_modules(name)
    linears = {native: shape for native, shape in native_linears(family).items() if modules is None or native in modules}
    states = {"subject": random_dit_lora(family, subject_fmt, rank=SUBJECT_RANK, seed=31, alpha=2.0, std=0.1,
                                         modules=modules),
              "style": random_dit_lora(family, style_fmt, rank=STYLE_RANK, seed=32, std=0.08, modules=modules)}
    files = {side: f"ssr-{name}-{fmt}-{side}.safetensors" for side, fmt in (("subject", subject_fmt), ("style", style_fmt))}
    for side in states:
        write_lora(loras / files[side], states[side])
    prompts = {"subject": synthetic_dit.conditioning(family, seed=1), "style": synthetic_dit.conditioning(family, seed=2)}

    pack_module(nodes, "nodes.adapter").forget_results()
    comfy.model_management.unload_all_models()
    _, _, merged, report = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(
        model, None, files["subject"], files["style"], 1.0, 1.0, 1.0, 1.0, "ssr-merge", "sum",
        subject_conditioning=prompts["subject"], style_conditioning=prompts["style"],
        ssr_merge_calibration_px=float(PIXELS), ssr_merge_ridge=RIDGE)
    assert "calibration: one sampling step per LoRA on its conditioning, seed 42" in report, report
    statistics = pack_module(nodes, "nodes.adapter.calibration").CALIBRATIONS.find(lambda key, objects: True)
    assert sorted(statistics) == sorted(map(canonical, linears)), report

    tokens = {side: _first_step_inputs(comfy_host, name, model, files[side], prompts[side], list(linears)) for side in files}
    for native, (d_out, _) in linears.items():
        factors = {side: _factors(family, fmt, states[side], native, d_out)
                   for side, fmt in (("subject", subject_fmt), ("style", style_fmt))}
        down = torch.cat([factors[side][0] for side in ("subject", "style")])
        up = torch.cat([factors[side][1] for side in ("subject", "style")], dim=1)
        z = {side: tokens[side][native] @ down.T for side in tokens}
        ours, layer = statistics[canonical(native)], merged.layers[canonical(native)]
        assert ours.tokens == sum(v.shape[0] for v in z.values()), native
        order = _stacking(layer.down.double().flatten(1), down, factors["subject"][0].shape[0])
        gram = sum(v.T @ v for v in z.values())[order][:, order]
        assert _relative(ours.gram, gram) < 1e-4, f"{native}: G {_relative(ours.gram, gram):.2e}"

        router = dense_router({side: tokens[side][native] for side in tokens}, {s: factors[s][0] for s in factors}, RIDGE)
        mine = layer.up.double().flatten(1) @ layer.down.double().flatten(1) * layer.scale
        expected = up @ router @ down
        assert _relative(mine, expected) < 1e-4, f"{native}: merged {_relative(mine, expected):.2e}"
