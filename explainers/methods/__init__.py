"""The built-in explanation methods; importing this package registers them."""

from . import captum, cam, gradients, integrated_gradients, lrp  # noqa: F401  (registration)
