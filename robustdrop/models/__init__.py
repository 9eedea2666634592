"""Models. Import a model file here to register it."""

from robustdrop.models import cnn1, preactresnet, smallcnn, wideresnet  # noqa: F401  (registration)
from robustdrop.models.flops import forward_flops
from robustdrop.models.registry import available_models, check_model, create_model, register_model

__all__ = ["available_models", "check_model", "create_model", "forward_flops", "register_model"]
