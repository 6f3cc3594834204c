"""blitext: P-Former backward decoupling (Bootstrapping Vision-Language Learning with
Decoupled Language Pre-training) as a precomputed-feature, two-phase toolkit.

Phase tools cache everything frozen once (image features, reference prompts) in sharded
HDF5; lightweight trainers read only the caches. The library imports without the CLI.
"""

__version__ = "0.1.0"
