"""MIMDet: a MAE-pretrained plain ViT that sees 25-50% of its tokens, as a detectron2 backbone.

Importing this package first makes detectron2 0.6 work on today's stack (see d2_compat).
"""
from . import d2_compat as _d2_compat

_d2_compat.apply()
