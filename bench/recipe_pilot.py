"""The exploration that found the demo's recipe: a hand-written stage-2 loop over the demo's caches.

    blitext demo                                   # once: its data, features and reference prompts
    python bench/recipe_pilot.py --name NAME [--layers 4 --xattn 1 --dropout 0 --align-steps 400
                                 --align-proj-scale 10 --lm-steps 200 --w2 100 ...]

Not the trainer: a plain loop (AdamW, warm-up + cosine, clipping at 1.0, batches drawn with
replacement) on the library's Q-Former, losses, caches and LLM, written to try recipes fast
(2026-12-01, at commits b019f76..3d8c052). Optional phase 1: L_align alone; phase 2: the frozen
LLM's loss (+ w2 L_align). After each phase: greedy exact match on 100 easy-VQA test images, and
on 32 training pairs the LLM's loss with the Q-Former in eval mode and in train mode (dropout on).
Appends one JSON line per evaluation to bench/results/recipe_pilot.jsonl. bench/demo_recipe.py
then measures the chosen recipe with the real trainer over seeds.
"""
import argparse, json, time, copy, math
from pathlib import Path
import torch
from blitext.cache import FeatureCache
from blitext.data.pairs import read_pairs
from blitext.pformer.prompts import PromptCache
from blitext.models.loading import load_llm, load_text_encoder
from blitext.models.qformer import QFormer, qformer_tokenizer
from blitext.losses import alignment_loss
from blitext.pformer.train import generate_from_prompts
from blitext.data.readers import read_image_set

ap = argparse.ArgumentParser()
ap.add_argument("--name", required=True)
ap.add_argument("--layers", type=int, default=6)
ap.add_argument("--xattn", type=int, default=2)
ap.add_argument("--dropout", type=float, default=None)
ap.add_argument("--fresh", action="store_true")
ap.add_argument("--align-steps", type=int, default=0)
ap.add_argument("--align-lr", type=float, default=1e-3)
ap.add_argument("--align-proj-scale", type=float, default=1.0)
ap.add_argument("--lm-steps", type=int, default=200)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--proj-scale", type=float, default=1.0)
ap.add_argument("--clip", type=float, default=1.0)
ap.add_argument("--w2", type=float, default=0.0)
ap.add_argument("--bs", type=int, default=16)
ap.add_argument("--nq", type=int, default=8)
ap.add_argument("--seed", type=int, default=42)
ap.add_argument("--ntest", type=int, default=100)
a = ap.parse_args()
from blitext.config import default_cache_root
root = default_cache_root()
torch.manual_seed(a.seed)
feats = FeatureCache(root / "features/easy-vqa-500__efficientnet-lite0")
data = root / "data/easy-vqa-500/easy-vqa"
pairs = read_pairs([str(data / "captions_train.json")], None, lambda i: i in feats)
prompts = PromptCache(root / "prompts" / "easy-vqa-500__demo-easy-vqa-500-8x200")
llm = load_llm("smollm2-135m")
te = load_text_encoder("all-minilm-l6-v2")
cfg = copy.deepcopy(te.model.config)
te_model = te.model
if a.layers != cfg.num_hidden_layers:
    te_model.encoder.layer = te_model.encoder.layer[:a.layers]; te_model.config.num_hidden_layers = a.layers
if a.dropout is not None:
    te_model.config.hidden_dropout_prob = a.dropout; te_model.config.attention_probs_dropout_prob = a.dropout
tokenizer = qformer_tokenizer(te.tokenizer)
torch.manual_seed(a.seed)
model = QFormer.from_text_encoder(te_model, tokenizer, feats.row_shape[-1], a.nq, 576, a.xattn)
if a.fresh:
    fresh = QFormer(model.config, a.nq, 576)
    model = fresh
model.train_only(2, True)
params = [p for p in model.parameters() if p.requires_grad]
emb = llm.embedding_table
print(f"{a.name}: trainable {sum(p.numel() for p in params)/1e6:.1f}M", flush=True)

def batch(step, n=a.bs):
    g = torch.Generator().manual_seed(a.seed * 1000 + step)
    idx = torch.randint(len(pairs), (n,), generator=g).tolist()
    f, m = feats.get_batch([pairs.image_ids[i] for i in idx])
    return idx, f.float(), prompts.get_batch([pairs.keys[i] for i in idx]).float()

def lm_loss(pr, idx):
    return llm.lm_loss(pr, llm.lm_batch([pairs.texts[i] for i in idx], "\n", 10**6))

def opt_for(lr, scale):
    proj = {id(p) for p in model.llm_proj.parameters()}
    return torch.optim.AdamW([{"params": [p for p in params if id(p) not in proj], "s": 1.0},
                              {"params": list(model.llm_proj.parameters()), "s": scale}], lr=lr, weight_decay=0.05)

def sched(o, step, total, lr):
    w = max(1, total // 10)
    cur = lr * step / w if step < w else 1e-5 + (lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))
    for g in o.param_groups: g["lr"] = cur * g["s"]

test = read_image_set(str(data / "captions_test.json"))
test_ids = [r.id for r in test.records][:a.ntest]
test_caps = {r.id: r.captions[0] for r in test.records}

@torch.no_grad()
def evaluate(tag):
    model.eval()
    out = []
    for s in range(0, len(test_ids), 25):
        ids = test_ids[s:s+25]
        f, _ = feats.get_batch(ids)
        pr = model.prompts(f.float())
        out += generate_from_prompts(llm, pr, "\n", 8)
    exact = sum(o.strip().lower() == test_caps[i].lower() for o, i in zip(out, test_ids)) / len(test_ids)
    # train/eval loss on 32 train pairs
    idx, f, ref = batch(10**6, 32)
    ev = lm_loss(model.prompts(f), idx).item()
    pe = model.prompts(f); rms = pe.pow(2).mean().sqrt().item()
    spread = (pe - pe.mean(0, keepdim=True)).pow(2).mean().sqrt().item() / rms
    al = alignment_loss(pe, ref).item()
    model.train(); torch.manual_seed(0)
    tr = lm_loss(model.prompts(f), idx).item()
    res = dict(name=a.name, at=tag, exact=exact, eval_loss=ev, train_loss=tr, prompt_rms=rms, spread=spread, align_mse=al,
               examples=list(zip(out[:6], [test_caps[i] for i in test_ids[:6]])))
    print(json.dumps(res), flush=True)
    with open(Path(__file__).parent / "results" / "recipe_pilot.jsonl", "a") as fh: fh.write(json.dumps({**vars(a), **res}) + "\n")

t0 = time.time()
model.train()
if a.align_steps:
    o = opt_for(a.align_lr, a.align_proj_scale)
    for step in range(a.align_steps):
        sched(o, step, a.align_steps, a.align_lr)
        idx, f, ref = batch(step)
        loss = alignment_loss(model.prompts(f), ref)
        o.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, a.clip); o.step()
        if step % 100 == 0 or step == a.align_steps - 1: print(f"align {step} {loss.item():.6f} {time.time()-t0:.0f}s", flush=True)
    evaluate("after-align")
if a.lm_steps:
    o = opt_for(a.lr, a.proj_scale)
    for step in range(a.lm_steps):
        sched(o, step, a.lm_steps, a.lr)
        idx, f, ref = batch(10**5 + step)
        pr = model.prompts(f)
        lm = lm_loss(pr, idx)
        al = alignment_loss(pr, ref)
        loss = lm + a.w2 * al if a.w2 else lm
        o.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, a.clip); o.step()
        if step % 25 == 0 or step == a.lm_steps - 1: print(f"lm {step} {lm.item():.3f} align {al.item():.6f} {time.time()-t0:.0f}s", flush=True)
    evaluate("after-lm")
print("time", time.time() - t0)
