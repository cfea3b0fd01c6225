"""The bundled demo model: a small Mixtral-family MoE trained on the Python standard library's sources.

`MODEL_DIR` is a Hugging Face-format folder (config.json, model.safetensors, tokenizer) that
`transformers` and the jaxmoe converter both read. `python -m jaxmoe.demo.train` rebuilds it;
ROUTING.md beside this file records its routing statistics and sample output.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"

__all__ = ["DEMO_DIR", "MODEL_DIR"]
