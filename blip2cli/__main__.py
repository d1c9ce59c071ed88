"""`python -m blip2cli`: what `accelerate launch -m blip2cli` and `torchrun -m blip2cli` run."""

from blip2cli.cli import main

if __name__ == "__main__":
    main()
