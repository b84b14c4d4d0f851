"""The built-in explanation methods; importing this package registers them."""

from . import (captum, cam, cam_family, gradients, integrated_gradients, lrp, normgrad,  # noqa: F401  (registration)
               perturbation_cams)
