"""UNet layouts of the base models the published hypernets serve: the one place they are written down.

A layout is what ComfyUI's model detection reports as ``unet_config`` (num_res_blocks per level,
transformer depth per input / output block, middle depth) plus the channel width per level. It tells
where the attention layers are (for golden tests, benchmarks and synthetic LoRAs) and how diffusers
block names map to the SGM names that kohya files and ComfyUI use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class UNetLayout:
    name: str
    channels: tuple[int, ...]  # width per level
    num_res_blocks: tuple[int, ...]  # resnets per down level
    transformer_depth: tuple[int, ...]  # per input block (level-major)
    transformer_depth_output: tuple[int, ...]  # per output block
    transformer_depth_middle: int  # 0: no middle block transformer
    context_dim: int = 2048

    @classmethod
    def from_unet_config(cls, name: str, config: dict) -> "UNetLayout":
        """Layout from a ComfyUI-detected ``unet_config`` dict (ComfyUI lists output depths last block first)."""
        channels = tuple(config["model_channels"] * m for m in config["channel_mult"])
        nrb = config["num_res_blocks"]
        nrb = tuple(nrb) if isinstance(nrb, (list, tuple)) else (nrb,) * len(channels)
        return cls(
            name=name,
            channels=channels,
            num_res_blocks=nrb,
            transformer_depth=tuple(config["transformer_depth"]),
            transformer_depth_output=tuple(reversed(config["transformer_depth_output"])),
            transformer_depth_middle=max(config.get("transformer_depth_middle") or 0, 0),
            context_dim=config.get("context_dim") or 0,
        )

    def as_dict(self) -> dict:
        """The layout as plain JSON values (what a trained hypernet's metadata records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetLayout":
        """A layout from :meth:`as_dict`'s values, checked (they come from a file): ValueError when they do not
        describe a UNet (wrong types, counts that do not add up, more blocks than any real UNet)."""
        fields = ("name", "channels", "num_res_blocks", "transformer_depth", "transformer_depth_output",
                  "transformer_depth_middle", "context_dim")
        if not isinstance(data, dict) or set(data) != set(fields) or not isinstance(data["name"], str):
            raise ValueError(f"expected the keys {', '.join(fields)}")

        def counts(key: str, limit: int) -> tuple[int, ...]:
            value = data[key]
            if not isinstance(value, list) or len(value) > 64 or not all(
                    isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= limit for n in value):
                raise ValueError(f"{key}: expected a short list of whole numbers from 0 to {limit}")
            return tuple(value)

        channels, resnets = counts("channels", 1 << 16), counts("num_res_blocks", 16)
        depth, depth_output = counts("transformer_depth", 64), counts("transformer_depth_output", 64)
        middle, context = data["transformer_depth_middle"], data["context_dim"]
        if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= (1 << 16) for n in (middle, context)):
            raise ValueError("transformer_depth_middle and context_dim: expected whole numbers")
        if not channels or len(resnets) != len(channels) or len(depth) != sum(resnets) \
                or len(depth_output) != sum(n + 1 for n in resnets) or not 0 < len(data["name"]) <= 100 \
                or not data["name"].isprintable():
            raise ValueError("the block counts do not add up to a UNet")
        return cls(data["name"], channels, resnets, depth, depth_output, middle, context)

    def attention_blocks(self) -> list[tuple[str, int, int]]:
        """(SGM prefix of each transformer block, width, context width) in model order."""
        blocks = []
        depths = list(self.transformer_depth)
        n = 1
        for level, resnets in enumerate(self.num_res_blocks):
            for _ in range(resnets):
                for t in range(depths.pop(0)):
                    blocks.append((f"input_blocks.{n}.1.transformer_blocks.{t}", self.channels[level]))
                n += 1
            n += 1  # downsampler
        for t in range(self.transformer_depth_middle):
            blocks.append((f"middle_block.1.transformer_blocks.{t}", self.channels[-1]))
        out_depths = list(self.transformer_depth_output)
        n = 0
        for level in reversed(range(len(self.channels))):
            for _ in range(self.num_res_blocks[level] + 1):
                for t in range(out_depths.pop(0)):
                    blocks.append((f"output_blocks.{n}.1.transformer_blocks.{t}", self.channels[level]))
                n += 1
        return [(prefix, width, self.context_dim) for prefix, width in blocks]

    def attention_linears(self) -> list[tuple[str, int, int]]:
        """(SGM module name, d_out, d_in) of every attention projection, e.g. ``...attn2.to_k``, 1280, 2048."""
        linears = []
        for prefix, width, context in self.attention_blocks():
            for attn in ("attn1", "attn2"):
                kv_in = width if attn == "attn1" else context
                for proj, d_in in (("to_q", width), ("to_k", kv_in), ("to_v", kv_in), ("to_out.0", width)):
                    linears.append((f"{prefix}.{attn}.{proj}", width, d_in))
        return linears


SDXL = UNetLayout(
    name="sdxl",
    channels=(320, 640, 1280),
    num_res_blocks=(2, 2, 2),
    transformer_depth=(0, 0, 2, 2, 10, 10),
    transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0),
    transformer_depth_middle=10,
)

KOALA_700M = UNetLayout(
    name="koala-700m",
    channels=(320, 640, 1280),
    num_res_blocks=(1, 1, 1),
    transformer_depth=(0, 2, 5),
    transformer_depth_output=(5, 5, 2, 2, 0, 0),
    transformer_depth_middle=0,
)

LAYOUTS = {layout.name: layout for layout in (SDXL, KOALA_700M)}
