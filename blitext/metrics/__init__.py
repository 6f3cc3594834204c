"""Metrics: one place for every number blitext reports about model quality.

caption.py: COCO caption metrics (pycocoevalcap's BLEU, METEOR, ROUGE-L, CIDEr, SPICE).
vqa.py: VQAv2 / OK-VQA accuracy with the official normalisation, GQA exact match.
retrieval.py: image-text recall R@k, BLIP-2's top-k re-ranking.
llm.py: teacher-forced token accuracy of the frozen LLM.
stats.py: the exact sign test of two systems' paired wins and losses.
"""
from blitext.metrics.llm import teacher_forced_accuracy
from blitext.metrics.retrieval import rerank_top_k, retrieval_recall
from blitext.metrics.stats import paired_counts, sign_test
from blitext.metrics.vqa import exact_match, normalize_answer, vqa_accuracy, vqa_summary


def __getattr__(name: str):
    """The caption metrics load pycocoevalcap (and find Java) only when asked for: training code
    that needs just teacher_forced_accuracy does not depend on them."""
    if name in ("CaptionScores", "caption_exact_hits", "caption_exact_match", "caption_scores", "coco_tokenize"):
        from blitext.metrics import caption

        return getattr(caption, name)
    raise AttributeError(f"module 'blitext.metrics' has no attribute {name!r}")


__all__ = ["CaptionScores", "caption_exact_hits", "caption_exact_match", "caption_scores", "coco_tokenize", "exact_match", "normalize_answer", "paired_counts", "rerank_top_k",
           "retrieval_recall", "sign_test", "teacher_forced_accuracy", "vqa_accuracy", "vqa_summary"]
