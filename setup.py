"""Installable package for the LightningDOT re-implementation.

A CUDA build of torch is never required: on a GPU machine install your CUDA torch
into the environment first, and the pinned range below accepts it.
"""
from setuptools import setup

setup(
    name="lightningdot",
    version="0.1.0",
    description="Pre-training visual-semantic embeddings for real-time image-text retrieval",
    python_requires=">=3.10",
    packages=["data", "model", "optim", "utils", "scripts"],
    py_modules=["pretrain", "train_itm", "inference", "rerank"],
    install_requires=[
        "torch>=2.1,<3",
        "transformers>=4.40,<6",
        "lmdb>=1.4,<4",
        "msgpack>=1.0,<2",
        "msgpack-numpy>=0.4.8,<0.5",
        "lz4>=4.0,<5",
        "numpy>=1.24,<3",
        "faiss-cpu>=1.7.4,<2",
        "tqdm>=4.60,<5",
        "pyyaml>=6.0,<7",
        "tensorboard>=2.12,<3",
        # inference.py serve (web app + server), its tests' client and the load benchmark
        "fastapi>=0.110,<1",
        "uvicorn>=0.29,<1",
        "httpx>=0.27,<1",
        # scene pictures (data/scene_render.py) and plots (scripts/plots.py)
        "pillow>=10.1,<14",
        "matplotlib>=3.7,<4",
    ],
    extras_require={
        "dev": ["pytest>=7,<10", "ruff>=0.4"],
        # faiss GPU builds are CUDA-version specific; install the one matching your CUDA.
        "gpu": ["faiss-gpu-cu12>=1.8"],
        # Horovod needs a source build against torch: use `make horovod`.
        "horovod": ["horovod>=0.28"],
    },
)
