"""Training-side model code (torch): architectures behind one registry, dataset readers, training.

``create_model(name, num_classes=14, in_chans=1)`` builds any registered network; every one exposes
``features(x)`` (pre-pool activations), ``head(features)`` (GAP -> dropout -> ``classifier``) and
``forward = head(features(x))`` so class activation maps are exact. The runtime never imports this.
The registry is imported lazily so torch-free parts (``models.datasets``) load without torch.
"""
from __future__ import annotations

_REGISTRY_NAMES = ("ModelConfig", "UnknownModelError", "count_macs", "count_params", "create_model", "list_models",
                   "load_state_dict_file", "model_config", "register_model")


def __getattr__(name: str):
    if name in _REGISTRY_NAMES:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


__all__ = list(_REGISTRY_NAMES)
