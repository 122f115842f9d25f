"""MIMDet: Masked Image Modeling for Detection, on detectron2 LazyConfig.

detectron2 is not on PyPI and so is not listed here: `make setup` (or
`python tools/install_detectron2.py`) installs it, or uses the one you already have.
"""
from setuptools import setup

setup(
    name="mimdet",
    version="0.1.0",
    description="Unleashing Vanilla Vision Transformer with Masked Image Modeling for Object Detection",
    license="MIT",
    python_requires=">=3.9",
    packages=["models"],
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=0.9",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",
        "numpy",
        "einops>=0.6",
        # detectron2 needs these at run time: fvcore's CropTransform crops polygons with
        # shapely (every COCO config crops); cv2 draws (Visualizer), rotates and reads EXIF.
        "shapely>=2.0,<3",
        "opencv-python-headless>=4.5,<5",
        "omegaconf>=2.1",
        "hydra-core>=1.1",
        "matplotlib",
        "tensorboard",
        "tqdm",
    ],
    extras_require={"dev": ["pytest>=7", "ruff>=0.6,<1"]},
)
