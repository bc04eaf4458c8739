"""What the tests, scripts and benchmarks share, outside the shipped nodes and math: the ComfyUI hosts
(hosts.json), a real ComfyUI server harness, synthetic models ComfyUI detects, random LoRAs in the formats
met in practice, UI/API workflow conversion, the dense reference rule, and the merge-quality lab's
shapes-in-styles world with its shape and style judges (quality_world.py, plain numpy/PIL/torch).
Never imported by nodes/ or hypernet/."""
