"""A plain dense implementation of the published LoRA.rar rule: the reference for golden tests and benchmarks.

It forms every dW = up @ down and feeds the concatenated columns through H, exactly as the rule reads.
"""

import math

import torch
import torch.nn.functional as F


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




def dense_k_lora_scores(dw_subject, dw_style, k):
    """K-LoRA's S_c, S_s: the sum of the k largest |entries| of each dense update (torch.topk on all entries)."""
    return (float(torch.topk(dw_subject.abs().flatten(), k).values.sum()),
            float(torch.topk(dw_style.abs().flatten(), k).values.sum()))


def dense_k_lora_gamma(pairs):
    """gamma: the mean of L1(dW_c) / L1(dW_s) over the layers' (dW_c, dW_s), ratios >= 3x the mean dropped."""
    ratios = torch.tensor([float(c.abs().sum() / s.abs().sum()) for c, s in pairs], dtype=torch.float64)
    return float(ratios[ratios < 3 * ratios.mean()].mean())


def dense_k_lora_choice(score_subject, score_style, gamma, p, pattern, alpha, beta):
    """"subject" when (S_c / gamma) / (S_s * S(p)) > 1, S(p) = alpha p + beta ("linear") or that mod alpha ("s*")."""
    scale = alpha * p + beta
    if pattern == "s*":
        scale = math.fmod(scale, alpha)
    ratio = (score_subject / gamma) / (score_style * scale) if score_style * scale else math.inf
    return "subject" if ratio > 1 else "style"


def dense_np_lora(dw_subject, dw_style, mu, a=1.0, b=1.0):
    """NP-LoRA as published: dW = dW_style + dW_subject (I - mu/(1+mu) V_k V_k^T), V_k: the style update's top-k
    right singular vectors, k = its rank; strengths a, b scale each side."""
    _, singular, vh = torch.linalg.svd(dw_style, full_matrices=False)
    k = int((singular > singular[0] * 1e-10).sum())  # the style update's rank
    v = vh[:k].T
    projector = torch.eye(dw_style.shape[1], dtype=torch.float64) - mu / (1 + mu) * (v @ v.T)
    return b * dw_style + a * dw_subject @ projector


def dense_ziplora_update(dw_subject, dw_style, m_subject, m_style, branch, a=1.0, b=1.0):
    """ZipLoRA's update of one layer, dense: merged = a dW_s diag(m_s) + b dW_t diag(m_t); subject / style: that
    LoRA alone at its strength. dW (d_out, d_in), m (d_in,) scale columns."""
    if branch == "subject":
        return a * dw_subject
    if branch == "style":
        return b * dw_style
    return a * dw_subject * m_subject[None, :] + b * dw_style * m_style[None, :]


def dense_ziplora_linear(x, weight, bias, update):
    """The patched layer the plain way: x @ (W + dW)^T + bias."""
    return F.linear(x, weight + update.to(weight.dtype), bias)


def dense_ziplora_objective(predict, pairs, lam=0.01):
    """ZipLoRA's objective, written out: predict(branch, batch) -> model output; pairs: [(m_s, m_t)] per layer.

    MSE(merged(subject batch), subject(subject batch)) + MSE(merged(style batch), style(style batch))
    + lam * sum |m_s . m_t| / (|m_s| |m_t|); targets without gradient.
    """
    with torch.no_grad():
        subject_target, style_target = predict("subject", "subject"), predict("style", "style")
    subject_term = ((predict("merged", "subject") - subject_target) ** 2).mean()
    style_term = ((predict("merged", "style") - style_target) ** 2).mean()
    cosine = sum(abs(torch.dot(m_s, m_t) / (m_s.norm() * m_t.norm())) for m_s, m_t in pairs)
    return subject_term + style_term + lam * cosine
