"""blitext: P-Former backward decoupling (Bootstrapping Vision-Language Learning with
Decoupled Language Pre-training) as a precomputed-feature, two-phase toolkit.

Phase tools cache everything frozen once (image features, reference prompts) in sharded
HDF5; lightweight trainers read only the caches. The library imports without the CLI.
"""

__version__ = "0.1.0"


def load(run, device: str = "auto", llm: str | None = None, settings: str = "run", batch_size: int = 8):
    """A trained run as a model with .caption(images) and .answer(images, questions)
    (blitext.evaluation.model; imported here on first use, so `import blitext` stays light)."""
    from blitext.evaluation.model import load as load_run

    return load_run(run, device=device, llm=llm, settings=settings, batch_size=batch_size)
