"""Making detectron2 0.6's Python sources work on today's stack (see ``detectron2_06.py``)."""
from .detectron2_06 import CompiledOpUnavailable, apply, has_compiled_ops

__all__ = ["apply", "has_compiled_ops", "CompiledOpUnavailable"]
