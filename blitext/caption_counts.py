"""What a training run did to its captions that its losses do not show: captions cut to
max_text_len tokens, and caption-file rows that had no caption at all (so gave no pair).

Both used to go unseen: a 20,000-character caption trained as its first 32 tokens, a row
without a "caption" key added nothing, and neither was said anywhere. Every trainer counts
into one `CaptionCounts`; its checkpoint state carries the counts (a resumed run counts on
from them, as an uninterrupted run would) and `summary_line` prints them when the run ends.
"""
from __future__ import annotations

from collections import Counter


class CaptionCounts:
    """Cuts per tokenizer ("encoder", "qformer", "target"), counted each time a batch reads a caption
    that does not fit: counting distinct captions would mean tokenising all of them up front, or
    keeping every cut caption's index in the checkpoint. Rows without a caption come from the reader."""

    def __init__(self, max_len: int, rows_without_caption: int = 0, resumed: dict | None = None):
        self.max_len = max_len
        self.cut = Counter((resumed or {}).get("truncated", {}))
        self.rows_without_caption = rows_without_caption  # read again on resume: not added to the checkpoint's

    def count_cut(self, name: str, n: int) -> None:
        self.cut[name] += n

    def count_tokens(self, name: str, tokenizer, texts: list[str]) -> None:
        """Count the texts that `tokenizer(texts, truncation=True, max_length=max_len)` cuts: longer than
        max_len with the special tokens it adds (one of exactly max_len tokens fits: not counted). Not
        verbose: the untruncated ids are only measured, so "longer than the model's maximum" is no warning."""
        lengths = [len(ids) for ids in tokenizer(texts, verbose=False).input_ids]
        self.count_cut(name, sum(n > self.max_len for n in lengths))

    def state(self) -> dict:
        """What the checkpoint's state.json holds ("truncated" is the key P-Former runs always had)."""
        return {"truncated": dict(self.cut), "rows_without_caption": self.rows_without_caption}


def summary_line(state: dict) -> str | None:
    """The end-of-run line of a run's caption counts; None for a state without them."""
    if "truncated" not in state:
        return None
    max_len = state.get("config", {}).get("max_text_len", "max_text_len")
    cut = ", ".join(f"{name} {n:,}" for name, n in sorted(state["truncated"].items())) or "none"
    return (f"captions cut to {max_len} tokens: {cut} (counted per batch that read one); "
            f"rows without a caption: {state.get('rows_without_caption', 0):,}")
