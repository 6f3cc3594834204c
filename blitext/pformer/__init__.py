"""Stage 0: language learnt from text alone, and the reference prompts it gives each caption.

    train.py     train-pformer: the P-Former trained through the frozen LLM on sentences alone
    prompts.py   build-prompts: every training caption's reference prompt, cached for the adaptor
    check.py     check-prompts: how far prompts sit from the LLM's token embeddings, decoded
    nearest.py   nearest-vocabulary search (FAISS, torch fallback) that check-prompts uses
"""
