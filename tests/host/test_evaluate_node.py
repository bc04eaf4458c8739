"""LoraRarEvaluate called as ComfyUI calls it, in a real in-process ComfyUI, against a real HTTP judge."""

import base64
import io
import json

import pytest
import torch
from PIL import Image

from tests.support.fake_judge import FakeJudge

pytestmark = pytest.mark.host

KEY = "sk-node-secret-1234567890"
TINY_CLIP_VISION = {  # ComfyUI's own CLIP vision class with a tiny config: real encode_image, random weights
    "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 224, "intermediate_size": 64,
    "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
    "num_hidden_layers": 2, "patch_size": 32, "projection_dim": 16,
}


def _batch(*colours, size=(96, 128)):
    """IMAGE (B, H, W, 3) of flat colours given as 0-255 RGB."""
    return torch.stack([torch.tensor(c, dtype=torch.float32).div(255).expand(*size, 3) for c in colours])


def _colour(data_url):
    """The top-left RGB pixel of a PNG data URL, as the judge sees it."""
    picture = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    return picture.getpixel((0, 0)), picture.size


RED, BLUE, GREEN = (250, 0, 0), (0, 0, 250), (0, 250, 0)
STYLE_REFS = [(10, 10, 10), (20, 20, 20), (30, 30, 30)]


def _answer(request):
    """Subject: yes for red and blue, no for green. Style: red yes, blue no, green yes on the first two references."""
    (test, _), (reference, _) = (_colour(url) for url in request.image_urls)
    if "same subject" in request.question:
        return "No" if test == GREEN else "Yes"
    if test == GREEN:
        return "yes" if reference in STYLE_REFS[:2] else "no"
    return "yes" if test == RED else "no"


@pytest.fixture
def node(comfy_host, monkeypatch):
    monkeypatch.delenv("LORARAR_JUDGE_URL", raising=False)
    nodes, _, _ = comfy_host
    return nodes.NODE_CLASS_MAPPINGS["LoraRarEvaluate"]()


def _run(node, server, images, subjects, styles, **kwargs):
    args = dict(style_name="oil painting", judge_url=server.base_url, judge_model="llava-critic-7b",
                api_key_env="LORARAR_TEST_JUDGE_KEY", timeout_s=5.0, retries=0)
    args.update(kwargs)
    return node.evaluate(images, subjects, styles, **args)


def test_registered_with_tooltips(comfy_host):
    nodes, _, _ = comfy_host
    cls = nodes.NODE_CLASS_MAPPINGS["LoraRarEvaluate"]
    assert cls.CATEGORY == "LoRA.rar" and cls.DESCRIPTION and nodes.NODE_DISPLAY_NAME_MAPPINGS["LoraRarEvaluate"]
    spec = cls.INPUT_TYPES()
    inputs = {**spec["required"], **spec["optional"]}
    assert list(spec["required"]) == ["images", "subject_references", "style_references", "style_name",
                                      "judge_url", "judge_model", "api_key_env"]
    assert spec["optional"]["clip_vision"][0] == "CLIP_VISION"
    assert all(options.get("tooltip") for _, options in inputs.values())
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)


def throttle_off(monkeypatch, utils) -> None:
    """ComfyUI 0.33 sends progress at most every 0.1 s and 0.5 %; switched off, every update reaches the hook
    on both hosts, so the test still sees one step per question."""
    monkeypatch.setattr(utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0, raising=False)
    monkeypatch.setattr(utils, "PROGRESS_THROTTLE_MIN_PERCENT", 0.0, raising=False)


def test_scores_table_grid_and_progress(node, monkeypatch):
    import comfy.utils

    monkeypatch.setenv("LORARAR_TEST_JUDGE_KEY", KEY)
    progress = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: progress.append((value, total)))
    throttle_off(monkeypatch, comfy.utils)
    with FakeJudge(responder=_answer) as server:
        out = _run(node, server, _batch(RED, BLUE, GREEN, size=(1024, 640)), _batch((100, 100, 100), (90, 90, 90)),
                   _batch(*STYLE_REFS))
    subject, style, overall, table_text, picture, ranking = out["result"]
    assert len(server.requests) == 3 * (2 + 3)
    assert progress == [(i, 15) for i in range(1, 16)]
    assert {_colour(url)[1] for r in server.requests for url in r.image_urls[:1]} == {(320, 512)}  # long side 512
    assert (subject, style, overall) == pytest.approx((2 / 3, 2 / 3, 1 / 3))
    table = json.loads(table_text)
    assert [(i["subject"]["pass"], i["style"]["pass"], i["both"]) for i in table["images"]] == [
        (True, True, True), (True, False, False), (False, True, False)]
    assert table["images"][2]["style"]["verdicts"] == ["yes", "yes", "no"]
    assert table["judge"] == {"endpoint": server.base_url + "/chat/completions", "model": "llava-critic-7b"}
    assert picture.shape == (1, 2 * 512 + 4, 2 * 320 + 4, 3) and picture.dtype == torch.float32
    assert "both 33%" in out["ui"]["text"][0]
    assert {r.headers.get("Authorization") for r in server.requests} == {f"Bearer {KEY}"}
    assert KEY not in table_text and KEY not in json.dumps(out["ui"])
    assert "ranking" not in table  # no labels: the table is as before; the ranking output ranks the images
    assert [line.split()[:2] for line in ranking.splitlines()[1:]] == [["1", "#0"], ["2", "#1"], ["3", "#2"]]


def test_labels_rank_the_images_and_a_wrong_count_asks_nothing(node):
    with FakeJudge(responder=_answer) as server:
        out = _run(node, server, _batch(RED, BLUE, GREEN), _batch((100, 100, 100)), _batch(*STYLE_REFS),
                   labels="direct\nlorarar\ndirect\n")
        with pytest.raises(ValueError, match="labels: 2 lines for 3 images"):
            _run(node, server, _batch(RED, BLUE, GREEN), _batch(RED), _batch(RED), labels="direct\nlorarar")
        asked = len(server.requests)
    assert asked == 3 * (1 + 3)  # the refused call asked nothing
    table = json.loads(out["result"][3])
    assert [image["label"] for image in table["images"]] == ["direct", "lorarar", "direct"]
    by_label = {row["label"]: row for row in table["ranking"]}
    images = table["images"]
    assert by_label["direct"]["images"] == 2 and by_label["lorarar"]["images"] == 1
    assert by_label["direct"]["both_pct"] == 50 * (images[0]["both"] + images[2]["both"])
    assert by_label["lorarar"]["both_pct"] == 100 * images[1]["both"]
    assert [line.split()[1] for line in out["result"][5].splitlines()[1:]] == [r["label"] for r in table["ranking"]]


def test_unparsed_answers_are_reported(node):
    with FakeJudge(default="malformed") as server:
        out = _run(node, server, _batch(RED), _batch(RED), _batch(RED))
    table = json.loads(out["result"][3])
    assert table["unparsed"] == 2 and out["result"][:3] == (0.0, 0.0, 0.0) and "2 unparsed" in out["ui"]["text"][0]


def test_clip_i_uses_comfy_clip_vision(node, tmp_path):
    import comfy.clip_vision

    config = tmp_path / "tiny_clip_vision.json"
    config.write_text(json.dumps(TINY_CLIP_VISION))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
    generator = torch.Generator().manual_seed(0)  # ComfyUI's ops leave weights uninitialised: give it some
    clip_vision.load_sd({name: (torch.ones_like(t) if "norm" in name and name.endswith("weight") else
                                torch.randn(t.shape, generator=generator) * 0.05)
                         for name, t in clip_vision.get_sd().items()})
    generated = _batch(RED, BLUE)
    with FakeJudge() as server:
        out = _run(node, server, generated, generated[:1], generated[1:], clip_vision=clip_vision)
    images = json.loads(out["result"][3])["images"]
    assert images[0]["clip_i_subject"] == pytest.approx(1.0, abs=1e-4)  # image 0 is the subject reference
    assert images[1]["clip_i_style"] == pytest.approx(1.0, abs=1e-4)
    embeds = clip_vision.encode_image(generated)["image_embeds"]
    expected = torch.nn.functional.cosine_similarity(embeds[1], embeds[0], dim=0).item()
    assert images[1]["clip_i_subject"] == pytest.approx(expected, abs=1e-4) and expected < 0.9999


def test_api_key_env_must_be_a_name_and_is_never_echoed(node):
    with FakeJudge() as server:
        with pytest.raises(ValueError) as error:  # the pack's LoraRarError, as ComfyUI imported it
            _run(node, server, _batch(RED), _batch(RED), _batch(RED), api_key_env=KEY)
    assert KEY not in str(error.value) and "NAME of an environment variable" in str(error.value)
    assert server.requests == []


def test_a_workflow_cannot_send_other_server_secrets(node, monkeypatch):
    """A shared workflow naming AWS_SECRET_ACCESS_KEY, or pointing a LORARAR_ key at a remote http URL or away
    from the operator's $LORARAR_JUDGE_URL, is refused before anything is sent."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEY)
    monkeypatch.setenv("LORARAR_TEST_JUDGE_KEY", KEY)
    with FakeJudge() as server, FakeJudge() as pinned:
        with pytest.raises(ValueError, match="starting with LORARAR_") as error:
            _run(node, server, _batch(RED), _batch(RED), _batch(RED), api_key_env="AWS_SECRET_ACCESS_KEY")
        assert KEY not in str(error.value)
        with pytest.raises(ValueError, match="refusing to send the API key over plain http"):
            _run(node, server, _batch(RED), _batch(RED), _batch(RED), judge_url="http://192.0.2.1:9/v1")
        monkeypatch.setenv("LORARAR_JUDGE_URL", pinned.base_url)
        with pytest.raises(ValueError, match="LORARAR_JUDGE_URL"):
            _run(node, server, _batch(RED), _batch(RED), _batch(RED))
        assert server.raw_bytes == []  # nothing sent, so no Authorization header either
        _run(node, pinned, _batch(RED), _batch(RED), _batch(RED))
    assert {r.headers.get("Authorization") for r in pinned.requests} == {f"Bearer {KEY}"}


def test_unreachable_judge_fails_with_one_line(node):
    from devkit.comfy_server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ValueError, match=f"judge {url}/chat/completions unreachable after 1 attempt: cannot connect"):
        node.evaluate(_batch(RED), _batch(RED), _batch(RED), "oil painting", url, "m", "LORARAR_JUDGE_API_KEY", retries=0)


@pytest.mark.parametrize("kwargs, expected", [
    ({"timeout_s": 1e300}, "timeout must be a positive number of seconds, at most 3600"),  # ComfyUI's max check
    ({"timeout_s": float("nan")}, "timeout must be a positive number of seconds"),  # passes ComfyUI's min/max
    ({"retries": 10**6}, "retries must be a whole number from 0 to 10"),
    ({"judge_url": "http://[::1%25lo]/v1"}, "IPv6 zone IDs (%25...) are not supported"),
    ({"judge_url": "http://[::ffff:127.0.0.1]:9/v1"}, "judge http://[::ffff:127.0.0.1]:9/v1/chat/completions"),
])
def test_out_of_range_options_and_odd_urls_are_one_line(node, kwargs, expected):
    with FakeJudge() as server:
        with pytest.raises(ValueError) as error:  # LoraRarError, as loaded by ComfyUI under its own module name
            _run(node, server, _batch(RED), _batch(RED), _batch(RED), **kwargs)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert server.raw_bytes == []


def test_cancel_stops_between_questions(node):
    import comfy.model_management

    def cancel_on_third(request):
        if len(server.requests) == 3:
            comfy.model_management.interrupt_current_processing(True)

    with FakeJudge(on_request=cancel_on_third) as server:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(node, server, _batch((1, 2, 3), (4, 5, 6)), _batch((7, 8, 9)), _batch((9, 9, 9), (8, 8, 8)))
    assert len(server.requests) == 3  # of 2 x (1 + 2) = 6
    comfy.model_management.interrupt_current_processing(False)


def test_cancel_stops_a_request_in_flight(node):
    """Cancel while the judge holds the request open: the node ends within a second or two, not at the timeout."""
    import threading
    import time

    import comfy.model_management

    def cancel_soon(request):
        threading.Timer(0.3, comfy.model_management.interrupt_current_processing, args=(True,)).start()

    with FakeJudge(default="hang", on_request=cancel_soon) as server:
        started = time.monotonic()
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(node, server, _batch(RED), _batch(RED), _batch(RED), timeout_s=600.0, retries=3)
        elapsed = time.monotonic() - started
    assert elapsed < 3 and len(server.requests) == 1
    assert not comfy.model_management.processing_interrupted()  # the flag is consumed: the next prompt runs
