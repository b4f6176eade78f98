"""diffdistill: distilling diffusion models in JAX."""

from setuptools import find_packages, setup

setup(
    name="diffdistill",
    version="0.1.0",
    description="Distilling diffusion models and training-free accelerated sampling in JAX.",
    python_requires=">=3.10",
    packages=find_packages(include=["diffdistill", "diffdistill.*", "experiments", "experiments.*"]),
    install_requires=[
        "jax>=0.4.35",
        "jaxlib>=0.4.35",
        "numpy>=1.26",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "chex>=0.1.87",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "etils[epath,epy]",
        "ml_collections>=0.1.1",
        "absl-py>=2.0",
        "diffrax>=0.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "scikit-learn>=1.3",
        # TFDS uses importlib_resources for package-defined builders but declares it only for
        # Python < 3.9; Pillow decodes real-dataset images.
        "importlib_resources",
        "pillow",
        # TensorBoard event files without TensorFlow (imported lazily by train/writers.py).
        "tensorboardX>=2.6",
        # diffusers checkpoint folders (interop) load without torch (imported lazily).
        "safetensors>=0.4",
        # the grain input pipeline (data.get_dataset(pipeline="grain")), imported lazily
        "grain>=0.2.12",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "scipy>=1.11"],
        # Install torch first (pip install torch==2.13.0 takes the CPU wheel), then this extra,
        # then `pip install --no-deps k-diffusion==0.1.1.post1`: its own dependency list drags in
        # torchvision, wandb and clean-fid, which the benchmark does not use (bench/README.md).
        # Equivalence tests against the reference implementations (`pytest -m torch`): pytorch-fid's
        # Inception, diffusers' DiT / UNet2DModel / AutoencoderKL. Install torch first
        # (`pip install torch==2.13.0`, the CPU wheel), then `pip install --no-deps
        # torchvision==0.28.0` (pytorch-fid needs it; with its dependencies it pulls torch's CUDA
        # stack, several GB), then this extra.
        "torch": ["torch>=2.4", "diffusers>=0.30", "safetensors>=0.4", "pytorch-fid>=0.3",
                  "scipy>=1.11"],
        "bench": ["torch>=2.4", "diffusers>=0.42", "torchsde>=0.2.6", "torchdiffeq>=0.2.5", "scipy>=1.11"],
    },
)
