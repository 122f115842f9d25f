#!/usr/bin/env python
"""Install detectron2 v0.6 as a pure-Python package, unless one is already importable.

detectron2 is not on PyPI. Its v0.6 Python sources are, inside the sdist
``pb1-detectron2==0.6`` (every .py file identical to detectron2 v0.6), but the sdist lacks
the C++ sources, so ``pip install`` of it fails. This script fetches that sdist, checks its
sha256, packs its ``detectron2`` package (model-zoo configs and the three bundled projects
included) into a wheel registered as distribution ``detectron2`` 0.6, and pip-installs it.
MIMDet needs none of detectron2's compiled ops; ``models.compat.detectron2_06`` supplies a placeholder
``detectron2._C`` that explains how to build them when one is called.

A detectron2 that is already importable (for example one built from source with its
compiled ops) is used as is: nothing is installed.

Usage: python tools/install_detectron2.py [--sdist FILE] [--cache-dir DIR] [--force]
"""
import argparse
import base64
import hashlib
import html.parser
import importlib.util
import os
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
WHEEL_NAME = "detectron2-0.6-py3-none-any.whl"
# detectron2 0.6's install_requires, less what only its C++ build, caffe2 export or code
# formatting used (future, pydot, black: LazyConfig.save works without black).
REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]
# setup.py's PROJECTS: installed as detectron2.projects.<name>
PROJECTS = {
    "point_rend": "projects/PointRend/point_rend",
    "deeplab": "projects/DeepLab/deeplab",
    "panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def index_url() -> str:
    """The package index pip would use: $PIP_INDEX_URL, pip's config, or PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()
        if out:
            return out
    except OSError:
        pass
    return "https://pypi.org/simple"


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs.extend(v for k, v in attrs if k == "href" and v)


def download_sdist(dest: str) -> None:
    page_url = index_url().rstrip("/") + "/pb1-detectron2/"
    log(f"looking up {SDIST_NAME} at {page_url}")
    with urllib.request.urlopen(page_url, timeout=120) as r:
        parser = _Links()
        parser.feed(r.read().decode("utf-8", "replace"))
    candidates = [h for h in parser.hrefs if urllib.parse.urlparse(h).path.endswith(SDIST_NAME)]
    if not candidates:
        raise SystemExit(f"error: {SDIST_NAME} is not listed at {page_url}")
    url = urllib.parse.urljoin(page_url, candidates[0])
    log(f"downloading {url.split('#')[0]}")
    with urllib.request.urlopen(url, timeout=300) as r, open(dest + ".part", "wb") as f:
        f.write(r.read())
    os.replace(dest + ".part", dest)


def check_sha256(path: str) -> None:
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(
            f"error: {path} has sha256 {digest}, expected {SDIST_SHA256}; refusing to install it"
        )
    log(f"sha256 ok ({digest[:16]}...)")


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def build_wheel(sdist: str, out_dir: str) -> str:
    """Pack the sdist's detectron2 package into a pure-Python wheel; returns its path."""
    files = {}  # arcname -> bytes
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            rel = member.name.split("/", 1)[1]  # strip "pb1-detectron2-0.6/"
            arcname = None
            if rel.startswith("detectron2/"):
                arcname = rel
            for name, src in PROJECTS.items():
                if rel.startswith(src + "/"):
                    arcname = f"detectron2/projects/{name}/" + rel[len(src) + 1:]
            if arcname is None or "__pycache__" in arcname:
                continue
            files[arcname] = tar.extractfile(member).read()
    if "detectron2/__init__.py" not in files:
        raise SystemExit(f"error: {sdist} holds no detectron2/__init__.py")

    dist_info = "detectron2-0.6.dist-info"
    metadata = "\n".join(
        ["Metadata-Version: 2.1", "Name: detectron2", "Version: 0.6",
         "Summary: detectron2 v0.6 Python sources (pure-Python build, no compiled ops)",
         "Home-page: https://github.com/facebookresearch/detectron2",
         "License: Apache-2.0", "Requires-Python: >=3.6"]
        + [f"Requires-Dist: {r}" for r in REQUIRES]
    ) + "\n"
    files[f"{dist_info}/METADATA"] = metadata.encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: mimdet-install-detectron2\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/top_level.txt"] = b"detectron2\n"
    record = [_record_line(name, data) for name, data in sorted(files.items())]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()

    path = os.path.join(out_dir, WHEEL_NAME)
    with zipfile.ZipFile(path + ".part", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    os.replace(path + ".part", path)
    log(f"built {path} ({len(files)} files)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdist", help=f"a local copy of {SDIST_NAME} (skips the download)")
    parser.add_argument("--cache-dir", default=os.path.join(".cache", "detectron2"),
                        help="where the sdist and the wheel are kept (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="install even if a detectron2 is already importable")
    args = parser.parse_args()

    spec = importlib.util.find_spec("detectron2")
    if spec is not None and not args.force:
        log(f"detectron2 is already importable from {os.path.dirname(spec.origin)}; using it as is")
        return

    os.makedirs(args.cache_dir, exist_ok=True)
    sdist = args.sdist or os.path.join(args.cache_dir, SDIST_NAME)
    if not os.path.isfile(sdist):
        if args.sdist:
            raise SystemExit(f"error: --sdist {args.sdist} does not exist")
        download_sdist(sdist)
    check_sha256(sdist)
    wheel = build_wheel(sdist, args.cache_dir)
    subprocess.run([sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", wheel],
                   check=True)
    # dependencies separately, so --force-reinstall never touches them
    subprocess.run([sys.executable, "-m", "pip", "install", *REQUIRES], check=True)
    log("installed detectron2 0.6 (pure Python)")


if __name__ == "__main__":
    main()
