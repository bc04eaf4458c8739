"""A plain dense implementation of the published LoRA.rar rule: the reference for golden tests and benchmarks.

It forms every dW = up @ down and feeds the concatenated columns through H, exactly as the rule reads.
"""

import torch


def dense_update(state_dict, stem, dtype=torch.float64):
    """dW = up @ down * alpha / rank, written the plain way."""
    up = state_dict[f"{stem}.lora_up.weight"].to(dtype).flatten(1)
    down = state_dict[f"{stem}.lora_down.weight"].to(dtype).flatten(1)
    alpha = state_dict.get(f"{stem}.alpha")
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    return up @ down * scale


def dense_rule(hypernet_state, dw_subject, dw_style, role, dtype=torch.float64):
    """Published rule on dense updates: H per column for to_q/to_out, plain sum for to_k/to_v."""
    if role in ("to_k", "to_v"):
        return dw_subject + dw_style
    width = dw_subject.shape[0]
    name = {640: "input_1", 1280: "input_2"}[width]
    columns = torch.cat([dw_subject, dw_style], dim=0).T  # (d_in, 2 * d_out): [subject column ; style column]
    hidden = torch.relu(columns @ hypernet_state[f"{name}.weight"].to(dtype).T + hypernet_state[f"{name}.bias"].to(dtype))
    coefficients = hidden @ hypernet_state["output.1.weight"].to(dtype).T + hypernet_state["output.1.bias"].to(dtype)
    return dw_subject * coefficients[:, 0] + dw_style * coefficients[:, 1]


