"""Reading PyTorch weight files without unrestricted unpickling: one loader for every converter."""
from __future__ import annotations

import os

import numpy as np


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """safetensors, a torch file (torch.load weights_only=True) or a TorchScript archive (OpenAI's CLIP
    .pt files; read with torch.jit.load, which rebuilds only TorchScript code, never arbitrary pickles)
    -> {name: numpy}. A training checkpoint's "state_dict"/"model" entry and DDP's "module." are unwrapped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        sd = dict(load_file(path))
    else:
        import torch
        import zipfile
        is_script = zipfile.is_zipfile(path) and any(
            n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())
        if is_script:
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - re-raised with the path and the reason
                raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
        sd = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().numpy()
              for k, v in obj.items() if hasattr(v, "detach")}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
