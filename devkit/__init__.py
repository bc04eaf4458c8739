"""What the tests, scripts and benchmarks share, outside the shipped nodes and math: the ComfyUI hosts
(hosts.json), a real ComfyUI server harness, synthetic models ComfyUI detects, random LoRAs in the formats
met in practice, UI/API workflow conversion and the dense reference rule. Never imported by nodes/ or hypernet/."""
