"""`python -m blitext ...` runs the command-line app (also the torchrun entry point)."""
from blitext.cli.main import app

if __name__ == "__main__":
    app()
