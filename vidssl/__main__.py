"""``python -m vidssl``: the CLI, for launchers that start modules (torchrun -m, deepspeed --module)."""

from vidssl.cli import console

if __name__ == "__main__":
    console()
