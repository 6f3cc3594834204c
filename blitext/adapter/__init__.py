"""Stages 1 and 2: the adaptor that turns cached visual features into soft prompts for the frozen LLM.

    image.py     train-adapter: BLIP-2's Q-Former, stage 1 (ITC/ITM/ITG + alignment) and stage 2
                 (LM + alignment to the P-Former's reference prompts)
    video.py     train-video-adapter: a plain Transformer over I3D features, the same losses
    common.py    what both trainers share: the prompt cache, resuming, the DDP step module
"""
