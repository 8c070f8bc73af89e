"""`python -m usp_fast COMMAND ...` == `usp-fast COMMAND ...` (e.g. `torchrun --nproc_per_node 8 -m usp_fast sample`)."""
from usp_fast.cli import main

if __name__ == "__main__":
    main()
