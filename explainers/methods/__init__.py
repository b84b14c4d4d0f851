"""The built-in explanation methods; importing this package registers them."""

from . import captum, cam, cam_family, gradients, integrated_gradients, normgrad, perturbation_cams  # noqa: F401  (registration)
