"""rr_tf: self-supervised pre-training of 3D CT encoders in TensorFlow/Keras.

TensorFlow flavour: the CPU build (``tensorflow-cpu``) by default, so CI and
laptops install ~250 MB instead of the CUDA stack. On a GPU host install
with ``RR_TF_GPU=1 pip install -e .`` (base requirement becomes
``tensorflow[and-cuda]``); the two TensorFlow distributions must never be
installed side by side, which is why there is no ``gpu`` extra (an extra can
add a requirement but cannot remove ``tensorflow-cpu``).
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "rr_tf", "__init__.py")) as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

TF_VERSION = "2.21.*"
TENSORFLOW = (f"tensorflow[and-cuda]=={TF_VERSION}" if os.environ.get("RR_TF_GPU") == "1"
              else f"tensorflow-cpu=={TF_VERSION}")

setup(
    name="rr_tf",
    version=VERSION,
    description="Self-supervised pre-training (RepRec and baselines) of 3D CT encoders "
                "in TensorFlow/Keras, and few-label organ segmentation",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rr_tf", "rr_tf.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=[
        TENSORFLOW,
        "keras==3.15.*",
        "tensorboard==2.21.*",   # TF 2.21 no longer pulls it in
        "nibabel==5.4.*",
        "numpy>=1.26,<2.5",
        "scipy==1.17.*",
        "absl-py==2.5.*",
    ],
    extras_require={
        # DICOM input: pydicom plus decoders for compressed transfer syntaxes
        # (JPEG 2000 and JPEG baseline/lossless via pylibjpeg, JPEG-LS via pyjpegls).
        "dicom": [
            "pydicom==3.0.*",
            "pylibjpeg==2.1.*",
            "pylibjpeg-openjpeg==2.6.*",
            "pylibjpeg-libjpeg==2.5.*",
            "pyjpegls==1.5.*",
        ],
        # launch/experiment.py's plot (without it the experiment writes its tables only)
        "plots": ["matplotlib==3.11.*"],
        "test": ["pytest==9.2.*", "matplotlib==3.11.*"],
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
