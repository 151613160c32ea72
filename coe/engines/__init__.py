"""Engines: one protocol, two implementations (``hf`` on CPU/GPU, ``vllm`` on GPU)."""
