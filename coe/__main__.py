"""``python -m coe``: the ``coe`` CLI (for environments without the console script on PATH)."""

from coe.cli import app

if __name__ == "__main__":
    app()
