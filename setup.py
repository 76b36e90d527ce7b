from setuptools import find_packages, setup

setup(
    name="upstream_compressed",
    version="0.1.0",
    description="Compressed Transformer speech upstreams (HuBERT, DistilHuBERT) for S3PRL/SUPERB",
    packages=find_packages(include=["upstream_compressed", "upstream_compressed.*"]),
    package_data={
        "upstream_compressed": [
            "corpus/*.txt",
            "embedded/checkpoints/*.pt",
            "embedded/checkpoints/*.json",
            "recipes/*/*.yaml",
            "model/spmm.c",
            "downstream_configs/*.yaml",
        ]
    },
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchaudio==2.11.0",
        "s3prl==0.4.18",
        "pyyaml",
        "soundfile",
        "editdistance",
        "safetensors",
        "tqdm",
        "matplotlib",  # the report's and the head analysis's plots (Agg backend)
        # imported by S3PRL's PR/SID paths but not declared by s3prl itself
        "tensorboardX",
        "librosa",
        "joblib",
        "huggingface_hub<1.0",
        "transformers<5",
        "espeakng-loader",  # espeak-ng library + data for make-corpus
        "submitit",  # experiment --launcher slurm
    ],
    extras_require={"dev": ["pytest", "hypothesis"]},
    entry_points={
        "console_scripts": [
            "upstream-compressed=upstream_compressed.cli:main",
            "run_downstream.py=upstream_compressed.run_downstream:main",
        ]
    },
)
