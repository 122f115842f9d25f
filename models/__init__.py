"""MIMDet: a MAE-pretrained plain ViT that sees 25-50% of its tokens, as a detectron2 backbone.

Importing this package first makes detectron2 0.6 work on today's stack (see models/compat).
"""
import os
import warnings

from . import compat as _compat

# fvcore scripts its focal losses with torch.jit.script when imported (fvcore.nn.focal_loss), and
# today's PyTorch answers with a deprecation warning, twice, on every start of every tool.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
# detectron2's anchor generator calls torch.meshgrid without `indexing`, meaning the "ij" it wants;
# PyTorch warns that the argument will be required, once in every training or inference log.
warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release", category=UserWarning)
# detectron2's all_gather (the evaluator's and the loss check's, with several processes) serializes
# through torch.ByteStorage, which PyTorch warns is deprecated, in every process.
warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)

# PyTorch's CPU convolutions (oneDNN) compile one primitive per layer, pass and input shape and
# keep 1,024 of them. Detection inputs vary in shape (image sizes, RoI counts), which overflows
# that cache, and every miss compiles again: on the demo's training step 147 ms against 113 ms
# with room for 16,384, for ~50 MB more memory. Read by oneDNN at its first convolution.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

_compat.apply()
