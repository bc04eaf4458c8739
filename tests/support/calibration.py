"""A host's calibration reduced to what a data-driven method reads (hypernet/calibration.py): fixed tokens per layer
and side, fed to the method's own runtime branch as a model's forward would, without ComfyUI."""

import contextlib

import torch


class TokenRun:
    """A host's model reduced to what SSR-Merge reads: each layer's calibration tokens per side."""

    def __init__(self, tokens: dict, branch):
        self.tokens, self.branch = tokens, branch

    def draw(self, side, generator, pixels=None):
        return side

    def predict(self, side):
        for name in self.branch.layer_names():
            if name in self.tokens[side]:
                self.branch.extra(name, self.tokens[side][name])


class TokenCalibration:
    references, seed, describe = False, 42, "fixed tokens"

    def __init__(self, tokens: dict):
        self.tokens, self.runs = tokens, 0

    @contextlib.contextmanager
    def running(self, branch):
        self.runs += 1
        yield TokenRun(self.tokens, branch)

    def reuse(self, what, make):
        return make()


def dense_router(tokens: dict[str, torch.Tensor], downs: dict[str, torch.Tensor], ridge: float) -> torch.Tensor:
    """SSR-Merge's published router written out, float64: z = A x over every token (tokens: side -> (N, d_in)),
    G = sum z z^T / N + ridge I, Q's rows of LoRA k from LoRA k's own tokens, R = Q G^-1 by an explicit inverse (the
    pack solves). downs: side -> A_k (r_k, d_in)."""
    down = torch.cat([downs[side].double() for side in ("subject", "style")])
    ranks = [downs[side].shape[0] for side in ("subject", "style")]
    gram = torch.zeros(sum(ranks), sum(ranks), dtype=torch.float64)
    cross = torch.zeros_like(gram)
    count, row = 0, 0
    for side, rank in zip(("subject", "style"), ranks):
        z = tokens[side].double() @ down.T
        gram += z.T @ z
        cross[row:row + rank] += z[:, row:row + rank].T @ z
        count, row = count + z.shape[0], row + rank
    gram = gram / count + ridge * torch.eye(sum(ranks), dtype=torch.float64)
    return (cross / count) @ torch.linalg.inv(gram)
