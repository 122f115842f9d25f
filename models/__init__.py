"""MIMDet: a MAE-pretrained plain ViT that sees 25-50% of its tokens, as a detectron2 backbone.

Importing this package first makes detectron2 0.6 work on today's stack (see models/compat).
"""
from . import compat as _compat

_compat.apply()
