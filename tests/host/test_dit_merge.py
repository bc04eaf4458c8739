"""The merge node on every DiT family the host loads (synthetic Flux, Flux.2, SD3.5, Krea 2, Z-Image, Qwen-Image,
Wan 2.1 and 2.2, devkit/synthetic_dit.py): layers matched through ComfyUI's own key map in every form it reads,
fused projections merged as the one linear they are, direct, NP-LoRA and K-LoRA equal to their dense formulas,
the patched weights and the saved file through the stock loader, unmapped layers reported, LoRA.rar and B-LoRA
naming the family. The wide families (Z-Image, Qwen-Image) train a few linears of one block (WIDE_MODULES), and
their NP-LoRA is checked through the stock loader only: its dense golden needs an SVD of a 11520 x 3840 update
(a minute here); the per-layer rule is the same on every family and golden-tested on the narrow ones.

Hostile inputs on Flux and SD3.5 close the file: text-encoder layers without a CLIP are reported as such, a
hypernet's free-text metadata cannot blow up an error message, a model loaded with fp8 weights merges.
"""


import pytest
import torch
from safetensors.torch import save_file

from devkit import synthetic_dit
from devkit.dense_rule import dense_k_lora_choice, dense_k_lora_gamma, dense_k_lora_scores, dense_np_lora
from devkit.dit_loras import FORMATS_BY_HOST, FUSED_FORMATS, dense_updates, diffusers_pieces, native_linears, random_dit_lora, write_lora
from devkit.synthetic_dit import ALL_FAMILIES, FLUX
from tests.conftest import host_version
from tests.support.families import WIDE_MODULES, canonical, is_switched, lora_modules

# every family this host loads (0.3.75 has no Krea 2)
FAMILIES = {name: family for name, family in ALL_FAMILIES.items()
            if not synthetic_dit.host_lacks(family, host_version())}

pytestmark = pytest.mark.host
# the nodes raise the LoraRarError of the pack as ComfyUI imported it (another module): matched as its base, ValueError



def host_formats(family: str) -> tuple[str, ...]:
    """The LoRA key forms of the family that the host under test reads (devkit/dit_loras.py FORMATS_BY_HOST)."""
    return FORMATS_BY_HOST.get(host_version(), FORMATS_BY_HOST["0.33.0"])[family]


def trainer_pairs(family: str) -> list[tuple[str, str]]:
    """Every key form once as the subject and once as the style, each time against another trainer's form."""
    formats = host_formats(family)
    return [(formats[i], formats[(i + 1) % len(formats)]) for i in range(len(formats))]


def cases(family: str) -> list[tuple[str, tuple[str, str], str]]:
    """np-lora on every pair of trainers (its dense rule checks both sides' factors), direct on the first pair; on a
    wide family direct only (NP-LoRA's dense golden there is an SVD of a 11520 x 3840 update), on two pairs that
    cover a fused and a split form each side (every form of it is read through the same key map: test_synthetic_dit)."""
    pairs = trainer_pairs(family)
    if family in WIDE_MODULES:
        return [(family, pair, "direct") for pair in dict.fromkeys([pairs[0], pairs[len(pairs) // 2]])]
    return [(family, pair, method) for pair in pairs
            for method in (("direct", "np-lora") if pair == pairs[0] else ("np-lora",))]


CASES = [case for family in FAMILIES for case in cases(family)]
# K-LoRA-linear differs from K-LoRA in its time scale only, EST-LoRA in its score only: on the wide families (seconds
# a merge) K-LoRA alone
K_LORA_CASES = [(family, method) for family in FAMILIES
                for method in (("k-lora",) if family in WIDE_MODULES else ("k-lora", "k-lora-linear", "est-lora"))]


def trained(family: str) -> int:
    """How many native linears the random LoRAs of the family train (attention and MLP)."""
    return len(lora_modules(family) or native_linears(FAMILIES[family]))


@pytest.fixture(scope="module")
def dit(comfy_host, dit_float32):
    """(ComfyUI version, {family: ModelPatcher}) on the in-process host that has the pack registered; float32 whatever
    the file's type (the patched weights are compared with float64 goldens to 1e-5), shared with test_klora_dit."""
    import comfyui_version

    # the files first: lora_file reads a family's linears from its file before any test asks for its patcher
    synthetic_dit.ensure_dit(families=list(FAMILIES), in_process=True)
    return comfyui_version.__version__, dit_float32


def lora_file(comfy_host, name: str, family: str, fmt: str, seed: int, rank: int = 4, alpha=None) -> dict:
    """A random LoRA written into the host's loras folder; returns its tensors."""
    state = random_dit_lora(FAMILIES[family], fmt, rank=rank, seed=seed, alpha=alpha, modules=lora_modules(family))
    write_lora(comfy_host[2] / name, state)
    return state


def merge(comfy_host, model, subject: str, style: str, method: str, hypernet=None, **params):
    nodes = comfy_host[0]
    merge_node = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]()
    return merge_node.merge(model, hypernet, subject, style, 0.8, 1.3, 1.0, 1.0, method, "sum", **params)


def merged_pair(comfy_host, dit, family: str, pair: tuple[str, str], method: str, prefix: str, seeds: tuple[int, int]):
    """(merged LoRA, report, subject's and style's dense float64 updates by weight key) of a subject (rank 4,
    alpha 2 where its form stores one) and a style (rank 3, no alpha) in the pair's key forms, merged by the node."""
    names = [f"{prefix}-{family}-{fmt}-{side}.safetensors" for fmt, side in zip(pair, "st")]
    subject = lora_file(comfy_host, names[0], family, pair[0], seeds[0], alpha=2.0)
    style = lora_file(comfy_host, names[1], family, pair[1], seeds[1], rank=3)
    _, _, merged, report = merge(comfy_host, dit[1][family], *names, method)
    return (merged, report, dense_updates(FAMILIES[family], pair[0], subject, dtype=torch.float64),
            dense_updates(FAMILIES[family], pair[1], style, dtype=torch.float64))


def pieces(family: str, fmt: str, key: str) -> int:
    """How many factor pairs a file of this form holds for one native linear (a split q/k/v form: one per piece)."""
    native = key.removesuffix(".weight")
    return 1 if fmt in FUSED_FORMATS else len(diffusers_pieces(FAMILIES[family], native, native_linears(FAMILIES[family])[native][0]))


def dense(layer) -> torch.Tensor:
    return (layer.up.double() @ layer.down.double()) * layer.scale


def relative_error(actual, expected) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("family,pair,method", CASES, ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_direct_and_np_lora_equal_their_dense_formulas_on_every_fused_layer(comfy_host, dit, family, pair, method):
    subject_fmt, style_fmt = pair
    merged, report, dense_subject, dense_style = merged_pair(comfy_host, dit, family, pair, method, "dit", (1, 2))
    assert len(dense_subject) == len(dense_style) == trained(family)
    assert f"applied to the model: {trained(family)} layers" in report
    assert set(merged.layers) == {canonical(key) for key in dense_subject}
    for key in dense_subject:
        s, t = 0.8 * dense_subject[key], 1.3 * dense_style[key]
        expected = s + t if method == "direct" else dense_np_lora(s, t, 0.5)
        layer = merged.layers[canonical(key)]
        assert relative_error(dense(layer), expected) <= 1e-5, key
        assert layer.rank <= 4 * pieces(family, subject_fmt, key) + 3 * pieces(family, style_fmt, key)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_patched_weights_are_the_merged_update(comfy_host, dit, family):
    import comfy.model_management

    _, models = dit
    lora_file(comfy_host, f"dit-{family}-p1.safetensors", family, host_formats(family)[-1], 3)
    lora_file(comfy_host, f"dit-{family}-k1.safetensors", family, "kohya", 4)
    model, _, merged, _ = merge(comfy_host, models[family], f"dit-{family}-p1.safetensors",
                                f"dit-{family}-k1.safetensors", "np-lora")
    comfy.model_management.unload_all_models()
    before = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    try:
        after = model.model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert {canonical(k) for k in changed} == set(merged.layers)
        for key in changed:
            delta = (after[key] - before[key]).double()
            assert relative_error(delta, dense(merged.layers[canonical(key)])) <= 1e-5, key
    finally:
        comfy.model_management.unload_all_models()


def test_layers_the_key_map_does_not_know_are_reported_not_dropped(comfy_host, dit):
    _, models = dit
    state = random_dit_lora(FAMILIES["sd35"], "peft", seed=5)
    state["transformer.not_a_block.0.attn.to_q.lora_A.weight"] = torch.randn(4, 128)
    state["transformer.not_a_block.0.attn.to_q.lora_B.weight"] = torch.randn(128, 4)
    write_lora(comfy_host[2] / "dit-extra.safetensors", state)
    lora_file(comfy_host, "dit-sd35-k2.safetensors", "sd35", "kohya", 6)
    _, _, merged, report = merge(comfy_host, models["sd35"], "dit-extra.safetensors", "dit-sd35-k2.safetensors", "direct")
    assert ("not merged: 1 layers of the subject LoRA that ComfyUI's key map does not know for this model "
            "(ComfyUI would not apply them either), e.g. transformer.not_a_block.0.attn.to_q") in report
    assert merged.report.as_dict()["unmapped_layers"] == {"subject": 1}


def test_a_file_no_layer_of_which_maps_is_refused_naming_it(comfy_host, dit):
    version, models = dit
    junk = {"transformer.nowhere.0.lora_A.weight": torch.randn(4, 128), "transformer.nowhere.0.lora_B.weight": torch.randn(128, 4)}
    save_file(junk, str(comfy_host[2] / "dit-junk.safetensors"))
    lora_file(comfy_host, "dit-sd35-k3.safetensors", "sd35", "kohya", 7)
    with pytest.raises(ValueError, match=r"dit-junk\.safetensors: none of its 1 LoRA layers is a layer ComfyUI's key "
                                           r"map maps onto this model \(e\.g\. transformer\.nowhere\.0\)"):
        merge(comfy_host, models["sd35"], "dit-junk.safetensors", "dit-sd35-k3.safetensors", "direct")


def test_diffsynth_flux_loras_follow_what_the_host_reads(comfy_host, dit):
    """DiffSynth's unprefixed diffusers names: ComfyUI 0.33.0 maps them, 0.3.75 does not (and says nothing)."""
    version, models = dit
    lora_file(comfy_host, "dit-flux-diffsynth.safetensors", "flux", "diffsynth", 8)
    lora_file(comfy_host, "dit-flux-k4.safetensors", "flux", "kohya", 9)
    if "diffsynth" in FORMATS_BY_HOST.get(version, FORMATS_BY_HOST["0.33.0"])["flux"]:
        _, _, merged, report = merge(comfy_host, models["flux"], "dit-flux-diffsynth.safetensors",
                                     "dit-flux-k4.safetensors", "direct")
        assert f"applied to the model: {trained('flux')} layers" in report
    else:
        with pytest.raises(ValueError, match=r"dit-flux-diffsynth\.safetensors: none of its \d+ LoRA layers"):
            merge(comfy_host, models["flux"], "dit-flux-diffsynth.safetensors", "dit-flux-k4.safetensors", "direct")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lorarar_and_b_lora_say_the_family_has_no_hypernet_or_split(comfy_host, dit, family):
    _, models = dit
    nodes = comfy_host[0]
    lora_file(comfy_host, f"dit-{family}-k5.safetensors", family, "kohya", 10)
    lora_file(comfy_host, f"dit-{family}-k6.safetensors", family, "kohya", 11)
    model_class = FAMILIES[family].model_class
    (loaded,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load("auto", models[family])
    with pytest.raises(ValueError, match=rf"no published LoRA\.rar hypernet for {model_class} models .*trained for {model_class}"):
        merge(comfy_host, models[family], f"dit-{family}-k5.safetensors", f"dit-{family}-k6.safetensors", "lorarar", loaded)
    with pytest.raises(ValueError, match=rf"^b-lora: no published content/style block split for {model_class} models"):
        merge(comfy_host, models[family], f"dit-{family}-k5.safetensors", f"dit-{family}-k6.safetensors", "b-lora")


@pytest.fixture(scope="module")
def dit_hypernet(comfy_host, tmp_path_factory):
    """A random hypernet for the synthetic DiTs' widths whose metadata says it was trained for SD3."""
    from hypernet.model import LoraRarHypernet

    folder = tmp_path_factory.mktemp("dit_hypernets")
    comfy_host[1].add_model_folder_path("lorarar", str(folder))
    torch.manual_seed(0)
    net = LoraRarHypernet({"input_1": 2 * 128, "input_2": 2 * 256}, hidden=16)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "sd3-trained.safetensors"),
              metadata={"lorarar_model_classes": "SD3"})
    return "sd3-trained.safetensors"


def test_a_hypernet_whose_metadata_names_the_family_merges_it_and_only_it(comfy_host, dit, dit_hypernet):
    _, models = dit
    nodes = comfy_host[0]
    lora_file(comfy_host, "dit-sd35-k7.safetensors", "sd35", "kohya", 12)
    lora_file(comfy_host, "dit-sd35-p7.safetensors", "sd35", "peft", 13)
    (loaded,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load(dit_hypernet, models["sd35"])
    _, _, merged, _ = merge(comfy_host, models["sd35"], "dit-sd35-k7.safetensors", "dit-sd35-p7.safetensors",
                            "lorarar", loaded)
    actions = merged.report.actions
    projections = [name for name in actions if name.endswith("_proj")]
    fused = [name for name in actions if name.endswith("_qkv")]
    assert projections and all(actions[name] == "hypernet" for name in projections)
    assert fused and all(actions[name] == "summed" for name in fused)
    assert set(merged.coefficients) == set(projections)
    (for_flux,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load(dit_hypernet, models["flux"])
    lora_file(comfy_host, "dit-flux-k8.safetensors", "flux", "kohya", 14)
    with pytest.raises(ValueError, match=r"sd3-trained\.safetensors: this hypernet was trained for SD3 models; this model is Flux"):
        merge(comfy_host, models["flux"], "dit-flux-k8.safetensors", "dit-flux-k8.safetensors", "lorarar", for_flux)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_saved_dit_merge_loads_with_the_stock_loader_and_patches_what_the_node_patched(comfy_host, dit, family):
    """The save node writes the fused layers under kohya names; ComfyUI's own LoRA loading of that file changes
    the same weights by the same amounts as the merge node's MODEL output."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    nodes, folder_paths, loras = comfy_host
    _, models = dit
    lora_file(comfy_host, f"dit-{family}-save-s.safetensors", family, "kohya", 15)
    lora_file(comfy_host, f"dit-{family}-save-t.safetensors", family, host_formats(family)[-1], 16)
    model_out, _, merged, _ = merge(comfy_host, models[family], f"dit-{family}-save-s.safetensors",
                                    f"dit-{family}-save-t.safetensors", "np-lora")
    nodes.NODE_CLASS_MAPPINGS["LoraRarSaveMergedLora"]().save(merged, f"merged/dit-{family}", "fp32", "error")
    saved = comfy.utils.load_torch_file(str(loras / "merged" / f"dit-{family}.safetensors"), safe_load=True)
    stock, _ = comfy.sd.load_lora_for_models(models[family], None, saved, 1.0, 0.0)

    def patched(patcher) -> dict:
        comfy.model_management.unload_all_models()
        before = {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        try:
            return {k: v.detach() - before[k] for k, v in patcher.model.state_dict().items() if not torch.equal(v, before[k])}
        finally:
            comfy.model_management.unload_all_models()

    by_node, by_stock = patched(model_out), patched(stock)
    assert set(by_node) == set(by_stock) and len(by_node) == trained(family)
    for key, delta in by_node.items():
        assert relative_error(by_stock[key].double(), delta.double()) <= 1e-5, key


@pytest.mark.parametrize("family,method", K_LORA_CASES,
                         ids=lambda v: v)
def test_k_lora_switches_exactly_the_attention_linears_with_the_dense_rule(comfy_host, dit, family, method):
    """K-LoRA (and EST-LoRA, scored by energy) on each family: the switched layers are the architecture's attention projections (roles from the
    model, checked against tests/support/families.py), S_c, S_s and gamma equal the dense rule's, and so does the
    choice at every progress; the report counts the rule's layers. (The choice inside real sampling:
    tests/host/test_klora_dit.py.)"""
    pair = (host_formats(family)[0], host_formats(family)[-1])
    merged, report, dense_s, dense_t = merged_pair(comfy_host, dit, family, pair, method, "kr", (31, 32))
    switched = sorted(key for key in dense_s if is_switched(family, key))
    assert switched and {canonical(key) for key in switched} == set(merged.runtime.layers)
    assert f"{method}'s own rule: {len(switched)} of {len(dense_s)} layers" in report
    updates = {key: (0.8 * dense_s[key], 1.3 * dense_t[key]) for key in switched}
    gamma = dense_k_lora_gamma(list(updates.values()))
    assert abs(merged.runtime.gamma - gamma) <= 1e-6 * gamma
    params = {"k-lora": ("s*", 1.5, 1.275), "k-lora-linear": ("linear", 1.5, 0.5), "est-lora": ("s*", 1.5, 1.275)}[method]
    for key, (c, s) in updates.items():
        layer = merged.runtime.layers[canonical(key)]
        if method == "est-lora":  # EST-LoRA's score: the squared Frobenius norm of the dense update; the rule is K-LoRA's
            scores = float((c * c).sum()), float((s * s).sum())
        else:
            scores = dense_k_lora_scores(c, s, layer.subject.rank * layer.style.rank)
        assert relative_error(torch.tensor([layer.subject_score, layer.style_score], dtype=torch.float64),
                              torch.tensor(scores, dtype=torch.float64)) <= 1e-5, key
        for p in (0.0, 0.2, 0.5, 0.8, 1.0):
            assert merged.runtime.choose(p)[canonical(key)] == dense_k_lora_choice(*scores, gamma, p, *params), (key, p)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layers_one_side_lacks_follow_the_layer_policy(comfy_host, dit, family):
    """A subject trained on the attention linears only (another trainer's form, no alpha) and a style on every
    linear: shared layers get the method's rule, the style's own layers are kept at its strength."""
    _, models = dit
    formats = host_formats(family)
    subject_fmt, style_fmt = formats[-1], formats[0]
    attention = [native for native in lora_modules(family) or native_linears(FAMILIES[family])
                 if is_switched(family, native)]
    state = random_dit_lora(FAMILIES[family], subject_fmt, rank=2, seed=41, modules=attention)
    write_lora(comfy_host[2] / f"half-{family}-s.safetensors", state)
    style = lora_file(comfy_host, f"half-{family}-t.safetensors", family, style_fmt, 42, rank=5, alpha=10.0)
    method = "direct" if family in WIDE_MODULES else "np-lora"  # NP-LoRA's dense golden: narrow families
    _, _, merged, report = merge(comfy_host, models[family], f"half-{family}-s.safetensors",
                                 f"half-{family}-t.safetensors", method)
    dense_s = dense_updates(FAMILIES[family], subject_fmt, state, dtype=torch.float64)
    dense_t = dense_updates(FAMILIES[family], style_fmt, style, dtype=torch.float64)
    assert set(dense_s) == {f"{native}.weight" for native in attention} and len(dense_t) == trained(family)
    shared = {"np-lora": "projected", "direct": "summed"}[method]
    assert merged.report.actions == {canonical(key): shared if key in dense_s else "kept (style)" for key in dense_t}
    own = len(dense_s) if method == "np-lora" else len(dense_t)  # direct's rule is the sum: every layer
    assert f"{method}'s own rule: {own} of {len(dense_t)} layers" in report
    for key, update in dense_t.items():
        shared_update = 0.8 * dense_s.get(key, 0) + 1.3 * update if method == "direct" else (
            dense_np_lora(0.8 * dense_s[key], 1.3 * update, 0.5) if key in dense_s else None)
        expected = shared_update if key in dense_s or method == "direct" else 1.3 * update
        assert relative_error(dense(merged.layers[canonical(key)]), expected) <= 1e-5, key


# --- hostile inputs

TE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="module")
def flux(comfy_host):
    return synthetic_dit.load_patcher(FLUX, synthetic_dit.ensure_dit(in_process=True))[0]


def merge_unscaled(comfy_host, model, subject, style, method="direct", hypernet=None):
    """The merge node at strengths 1 (merge above uses 0.8 and 1.3)."""
    node = comfy_host[0].NODE_CLASS_MAPPINGS["LoraRarMerge"]()
    return node.merge(model, hypernet, subject, style, 1.0, 1.0, 1.0, 1.0, method, "sum")


def te_factors() -> dict:
    return {f"{TE}.lora_up.weight": torch.randn(768, 4) * 0.05, f"{TE}.lora_down.weight": torch.randn(4, 768) * 0.05}


def test_text_encoder_layers_without_a_clip_say_to_connect_one(comfy_host, flux):
    write_lora(comfy_host[2] / "hostile-flux-te.safetensors", {**random_dit_lora(FLUX, "kohya", seed=1), **te_factors()})
    write_lora(comfy_host[2] / "hostile-flux-te-only.safetensors", te_factors())
    write_lora(comfy_host[2] / "hostile-flux-p.safetensors", random_dit_lora(FLUX, "peft", seed=2))
    *_, report = merge_unscaled(comfy_host, flux, "hostile-flux-te.safetensors", "hostile-flux-p.safetensors")
    assert ("note: subject LoRA: 1 text-encoder layers not merged: no CLIP is connected (connect one to merge them)"
            in report)
    with pytest.raises(ValueError, match=r"hostile-flux-te-only\.safetensors: all its 1 LoRA layers are text-encoder "
                                         r"layers .* no CLIP is connected: connect the CLIP to the merge node"):
        merge_unscaled(comfy_host, flux, "hostile-flux-te-only.safetensors", "hostile-flux-p.safetensors")


@pytest.mark.parametrize("classes", ["X" * 1_000_000, ",".join(f"C{i}" for i in range(20000))], ids=["long", "many"])
def test_hypernet_metadata_naming_other_families_gives_a_short_error(comfy_host, flux, tmp_path_factory, classes):
    from hypernet.model import LoraRarHypernet

    folder = tmp_path_factory.mktemp("hostile_hypernets")
    comfy_host[1].add_model_folder_path("lorarar", str(folder))
    net = LoraRarHypernet({"input_1": 2 * 256}, hidden=8)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "lying.safetensors"),
              metadata={"lorarar_model_classes": classes})
    write_lora(comfy_host[2] / "hostile-flux-k.safetensors", random_dit_lora(FLUX, "kohya", seed=3))
    (loaded,) = comfy_host[0].NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load("lying.safetensors", flux)
    with pytest.raises(ValueError, match=r"^lying\.safetensors: this hypernet was trained for \S.{0,200} models; this "
                                         r"model is Flux") as error:
        merge_unscaled(comfy_host, flux, "hostile-flux-k.safetensors", "hostile-flux-k.safetensors", "lorarar", loaded)
    assert len(str(error.value)) < 400


def test_a_model_loaded_with_fp8_weights_merges(comfy_host):
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    from devkit.synthetic_dit import SD35

    state = comfy.utils.load_torch_file(str(SD35.path(synthetic_dit.ensure_dit(in_process=True))))
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float8_e4m3fn})
    write_lora(comfy_host[2] / "hostile-sd35-p.safetensors", random_dit_lora(SD35, "peft", seed=4))
    write_lora(comfy_host[2] / "hostile-sd35-k.safetensors", random_dit_lora(SD35, "kohya", seed=5))
    patched, _, merged, report = merge_unscaled(comfy_host, model, "hostile-sd35-p.safetensors", "hostile-sd35-k.safetensors")
    assert f"applied to the model: {len(merged.layers)} layers" in report
    try:
        with torch.inference_mode():  # as ComfyUI runs a prompt (0.3.75's fp8 rounding refuses tensors needing grad)
            comfy.model_management.load_models_gpu([patched], force_full_load=True)
            weights = patched.model.state_dict().values()
            assert all(torch.isfinite(w.float()).all() for w in weights if w.is_floating_point())
    finally:
        comfy.model_management.unload_all_models()
