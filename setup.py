"""ms_nlp_compress: MindSpore-first compression of pre-trained language models."""
from setuptools import find_packages, setup

setup(
    name="ms_nlp_compress",
    version="0.1.0",
    description="NEZHA/BERT backbones, TinyBERT, DynaBERT and TernaryBERT compression on MindSpore",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["ms_nlp_compress", "ms_nlp_compress.*"]),
    package_data={"ms_nlp_compress": ["data/assets/*"]},
    install_requires=[
        # Tested on 2.9.0 and 2.10.0 (CPU). 2.11 changes PyNative grad semantics: not admitted until tested.
        "mindspore>=2.9,<2.11",
        # MindSpore 2.9/2.10 PyNative ops fail under numpy 2.x ("Numpy init failed" in pyboost reshape).
        "numpy>=1.24,<2",
        "sentencepiece>=0.2",
        "pyyaml>=6.0",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tqdm>=4.60",
        # Reports and studies write PNG plots (Agg backend: no display needed).
        "matplotlib>=3.6",
        # AKG graph-kernel fusion on CPU imports `decorator`; without it fused compiles fail.
        "decorator>=5.0",
    ],
    extras_require={
        # pytest-xdist: the suite runs in 2 processes (each test process uses one MindSpore CPU thread).
        "test": ["pytest>=7", "pytest-xdist>=3.5"],
        "bench": ["torch"],
        "mindformers": ["mindformers"],
    },
    entry_points={"console_scripts": ["msnc=ms_nlp_compress.cli:main"]},
)
