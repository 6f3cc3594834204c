"""Every adaptor names its soft-prompt count n_prompt (a Q-Former's queries, a video adaptor's slots), in
its state.json too; runs saved under the old names (num_query, num_slots) still load."""
from __future__ import annotations

from transformers import BertConfig, Blip2QFormerConfig

from blitext.models.qformer import QFormer
from blitext.models.video_adapter import VideoAdapter

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99,
            initializer_range=0.02)


def test_qformer_saves_n_prompt_and_loads_the_old_key():
    model = QFormer(Blip2QFormerConfig(**TINY, encoder_hidden_size=16, use_qformer_text_input=True), 4, d_llm=8)
    description = model.describe()
    assert description["n_prompt"] == model.n_prompt == 4 and "num_query" not in description
    old = {("num_query" if k == "n_prompt" else k): v for k, v in description.items()}
    assert QFormer.from_description(old).n_prompt == 4


def test_video_adapter_saves_n_prompt_and_loads_the_old_key():
    model = VideoAdapter(BertConfig(**TINY), d_in=16, n_prompt=3, d_llm=8)
    description = model.describe()
    assert description["video_adapter"]["n_prompt"] == model.n_prompt == 3
    old = {"video_adapter": {("num_slots" if k == "n_prompt" else k): v
                             for k, v in description["video_adapter"].items()}}
    assert VideoAdapter.from_description(old).n_prompt == 3
