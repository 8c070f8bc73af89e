"""`deepspeed usp_fast/train.py --stage STAGE --config FILE [--resume auto] [key=value ...]` (or plain `python`):
the project's documented launcher entry point, the same as `usp-fast train ...`. Needs the package installed
(`pip install -e .`, which the Quickstart does)."""
from usp_fast.cli import train_main

if __name__ == "__main__":
    train_main()
