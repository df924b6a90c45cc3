"""Training-side model code (torch): architectures behind one registry.

``create_model(name, num_classes=14, in_chans=1)`` builds any registered network; every one exposes
``features(x)`` (pre-pool activations), ``head(features)`` (GAP -> dropout -> ``classifier``) and
``forward = head(features(x))`` so class activation maps are exact. The runtime never imports this.
"""
from .registry import (ModelConfig, UnknownModelError, count_macs, count_params, create_model,
                       list_models, load_state_dict_file, model_config, register_model)

__all__ = ["ModelConfig", "UnknownModelError", "count_macs", "count_params", "create_model", "list_models",
           "load_state_dict_file", "model_config", "register_model"]
