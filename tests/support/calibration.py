"""A host's calibration reduced to what a data-driven method reads (hypernet/calibration.py): fixed tokens per layer
and side, fed to the method's own runtime branch as a model's forward would, without ComfyUI."""

import contextlib


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
