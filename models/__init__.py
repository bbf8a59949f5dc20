"""Model registry and families. Importing this package registers every family, so `build_model` finds them all."""

from models import cifar_resnet, resnet, simple, vgg, vit, wide_resnet  # noqa: F401 - imported to register
from models import spiking  # noqa: F401 - spiking nets (spikingjelly is imported when one is built)
from models.common import get_role, set_role
from models.registry import build_model, check_model_options, list_models, model_options, register_model

__all__ = [
    "build_model",
    "check_model_options",
    "get_role",
    "list_models",
    "model_options",
    "register_model",
    "set_role",
]
