"""Names from strangers' files are drawn as text: a ``$...$`` pair is no matplotlib formula (which would fail
the picture, after a comparison had sampled every column)."""

import numpy as np
import pytest
import torch
from PIL import Image

from hypernet.coefficients import coefficient_picture
from hypernet.comparison import Column, comparison_grid
from hypernet.errors import LoraRarError
from hypernet.evaluation.ranking import MAX_LABEL, parse_labels
from hypernet.loss_curve import loss_curve

HOSTILE = r"m$\undefinedcmd$ and $x^2$.safetensors"


def test_a_dollar_pair_in_a_name_is_drawn_as_text():
    layer = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    picture = coefficient_picture({layer: torch.rand(64, 2)}, title=HOSTILE)
    assert np.asarray(picture).std() > 0
    image = Image.new("RGB", (32, 32), (120, 30, 200))
    grid = comparison_grid([Column(HOSTILE, {}, [image]), Column("b-lora", {}, [], failure=HOSTILE)], title=HOSTILE)
    assert np.asarray(grid).std() > 0
    history = [{"total": 1.0 / step, "subject": 0.5 / step, "style": 0.4 / step, "similarity": 3.0 - step}
               for step in (1, 2, 3)]
    assert np.asarray(loss_curve(history, title=HOSTILE)).std() > 0


def test_a_label_longer_than_the_limit_is_one_line():
    with pytest.raises(LoraRarError, match=f"labels: line 2 has {MAX_LABEL + 1} characters; at most {MAX_LABEL}"):
        parse_labels("direct\n" + "x" * (MAX_LABEL + 1), 2)
