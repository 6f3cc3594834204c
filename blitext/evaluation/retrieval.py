"""Image-text retrieval scores of a stage-1 adaptor: BLIP-2's ITC similarities re-ranked by ITM
(LAVIS compute_sim_matrix), over the features of an evaluation's feature cache (eval_retrieval)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from blitext.console import progress_bar
from blitext.metrics import rerank_top_k

if TYPE_CHECKING:
    from blitext.evaluation.evaluate import Evaluation

ITM_PAIRS_PER_CALL = 256  # (image, text) pairs per ITM forward in retrieval's re-ranking


class RetrievalScorer:
    """BLIP-2's retrieval scores (LAVIS compute_sim_matrix) with the adaptor's Q-Former."""

    def __init__(self, ev: Evaluation, image_ids: list[str], texts: list[str]):
        self.ev, self.model, self.image_ids = ev, ev.adapter.model, image_ids
        max_len = ev.adapter.state["config"].get("max_text_len", 32)
        tok = ev.adapter.tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        self.ids, self.att = tok.input_ids.to(ev.device), tok.attention_mask.to(ev.device)  # (n_texts, L)

    @torch.inference_mode()
    def itc(self) -> torch.Tensor:
        """(n_images, n_texts): max over the query outputs of cosine(vision_proj(q), text_proj([CLS]))."""
        bs, model = self.ev.config.batch_size, self.model
        cls = [model.text_output(self.ids[s:s + bs], self.att[s:s + bs])[:, 0] for s in range(0, len(self.ids), bs)]
        text_feat = F.normalize(model.text_proj(torch.cat(cls)), dim=-1)  # (n_texts, E)
        rows = []
        for features, mask in self._features_batches(self.image_ids, bs):
            image_feat = F.normalize(model.vision_proj(model.query_output(features, mask)), dim=-1)  # (B, Q, E)
            rows.append((image_feat @ text_feat.T).max(dim=1).values.cpu())  # (B, n_texts)
        return torch.cat(rows)

    def rerank(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both directions re-ranked: ITM logit + ITC on each query's top k by ITC."""
        sim = self.itc()  # (n_images, n_texts)
        per_call = max(1, ITM_PAIRS_PER_CALL // min(k, max(sim.shape)))
        with progress_bar(sum(sim.shape), "eval retrieval: ITM re-ranking", "query") as advance:
            def i2t(rows, cands):  # query = image, candidates = texts
                advance(len(rows))
                return self.itm(rows[:, None].expand_as(cands), cands) + sim[rows[:, None], cands]

            def t2i(rows, cands):  # query = text, candidates = images
                advance(len(rows))
                return self.itm(cands, rows[:, None].expand_as(cands)) + sim.T[rows[:, None], cands]

            return rerank_top_k(sim, i2t, k, per_call), rerank_top_k(sim.T, t2i, k, per_call)

    @torch.inference_mode()
    def itm(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """ITM scores of (image index, text index) pairs of the same shape: mean over the Q query
        outputs of itm_head's positive logit, as BLIP-2's compute_itm."""
        q, flat_i, flat_t, out = self.model.n_prompt, images.flatten(), texts.flatten(), []
        for s in range(0, len(flat_i), ITM_PAIRS_PER_CALL):
            i, t = flat_i[s:s + ITM_PAIRS_PER_CALL], flat_t[s:s + ITM_PAIRS_PER_CALL]
            features, mask = self._features([self.image_ids[n] for n in i.tolist()])  # (P, T, D)
            ids, att = self.ids[t.to(self.ids.device)], self.att[t.to(self.ids.device)]  # (P, L)
            joint = self.model.joint_output(ids, features, torch.cat([att.new_ones(len(ids), q), att], 1), mask)
            out.append(self.model.itm_head(joint[:, :q])[..., 1].mean(1).float().cpu())  # (P,)
        return torch.cat(out).view(images.shape)

    def _features(self, image_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        features, mask = self.ev.cache.get_batch(image_ids)
        return features.to(self.ev.device).float(), None if mask is None else mask.to(self.ev.device)

    def _features_batches(self, image_ids: list[str], bs: int):
        for s in range(0, len(image_ids), bs):
            yield self._features(image_ids[s:s + bs])
