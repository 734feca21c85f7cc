"""Diagnostic (issue 12, round 3): image tokens placed AFTER the question, at the LM input, frozen LM.

    PYTHONPATH=src python benchmarks/ablate_after_question.py --steps 300 --lr 2e-3 --neval 600 [--qaware 1 | --oracle 1]

Not a recipe: a standalone experiment with the Hugging Face model and no epalm hooks. The question
prefix ``[BOS] question`` is run once per distinct question (107 of them) and its KV cache reused;
each step runs only ``[image tokens | </a> | answer | EOS]`` through all 30 layers, so the image
tokens see the question (they come after it) and every layer can compare them with it.

* default: the 6 cached [CLS] (DINOv2-S 56 px, last 6 layers), one shared Linear + a learned
  position per level;
* ``--qaware 1``: one more token from an MLP over [last CLS, mean input embedding of the question]
  (a connector that sees the question);
* ``--oracle 1``: no image at all: the word embeddings of the true colour and shape (" red circle")
  + 2 trainable tokens, i.e. the best case of a connector that names the image in words.

Reads the research feature caches ``$EPALM_CACHE/features/easy-vqa-dinov2-small-imgfocus-56px-k6``
(``benchmarks/ablate_quickstart.py`` builds them). Accuracy: first answer token, greedy, on a seeded
test sample. Writes ``benchmarks/out/after_*.json``.
"""
import argparse, json, os, random, time, collections, math
import numpy as np, torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from epalm.data.easy_vqa import read_easy_vqa

from _common import easy_vqa_attributes
ap = argparse.ArgumentParser()
ap.add_argument("--feat", default="k6"); ap.add_argument("--tokens", default="all")
ap.add_argument("--steps", type=int, default=400); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--bs", type=int, default=16); ap.add_argument("--neval", type=int, default=1000)
ap.add_argument("--eval_every", type=int, default=100); ap.add_argument("--bf16", type=int, default=1)
ap.add_argument("--qaware", type=int, default=0); ap.add_argument("--oracle", type=int, default=0); ap.add_argument("--tag", default="")
a = ap.parse_args()
torch.manual_seed(0); torch.set_num_threads(2)
CACHE = os.environ.get("EPALM_CACHE", os.path.expanduser("~/.cache/epalm"))
P = f"{CACHE}/smollm2-135m-instruct"
tok = AutoTokenizer.from_pretrained(P); lm = AutoModelForCausalLM.from_pretrained(P).eval()
for p in lm.parameters(): p.requires_grad_(False)
D = lm.config.hidden_size; emb = lm.get_input_embeddings()
fdir = {"k6": "easy-vqa-dinov2-small-imgfocus-56px-k6", "all": "easy-vqa-dinov2-small-imgfocus-56px-alltokens"}[a.feat]
F = torch.from_numpy(np.load(f"{CACHE}/features/{fdir}/features.npy").astype(np.float32))
index = json.load(open(f"{CACHE}/features/{fdir}/index.json"))
if a.tokens == "last": F = F[:, -1:]
K = 6 if a.oracle else F.shape[1] + (1 if a.qaware else 0)
train = read_easy_vqa("train"); test = read_easy_vqa("test")
attr = collections.defaultdict(dict, easy_vqa_attributes(train + test))
if a.oracle:
    train = [s_ for s_ in train if len(attr[s_.media_id]) == 2]; test = [s_ for s_ in test if len(attr[s_.media_id]) == 2]
random.Random(0).shuffle(test); test = test[:a.neval]
sep = tok("</a>", add_special_tokens=False).input_ids
bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
eos = tok.eos_token_id
questions = sorted({s.question for s in train + test})
qid = {q: i for i, q in enumerate(questions)}
# prefix KV per distinct question, left-padded to Lmax
ids = [bos + tok(q, add_special_tokens=False).input_ids for q in questions]
L = max(map(len, ids)); NL = lm.config.num_hidden_layers
kv = None; plen = torch.tensor([len(x) for x in ids])
with torch.no_grad():
    for i, x in enumerate(ids):
        out = lm(input_ids=torch.tensor([x]), use_cache=True)
        c = out.past_key_values
        layers = [(c.layers[l].keys, c.layers[l].values) for l in range(NL)]
        if kv is None:
            kh, hd = layers[0][0].shape[1], layers[0][0].shape[3]
            kv = torch.zeros(NL, 2, len(ids), kh, L, hd)
        for l, (k_, v_) in enumerate(layers):
            kv[l, 0, i, :, L - len(x):] = k_[0]; kv[l, 1, i, :, L - len(x):] = v_[0]
qtok = {q: torch.tensor(tok(q, add_special_tokens=False).input_ids) for q in questions}
pmask = (torch.arange(L)[None] >= (L - plen)[:, None]).long()
ans_ids = {}
def ans(t):
    if t not in ans_ids: ans_ids[t] = tok(t, add_special_tokens=False).input_ids
    return ans_ids[t]
class Conn(nn.Module):
    def __init__(s):
        super().__init__(); s.lin = nn.Linear(384, D); s.pos = nn.Parameter(torch.zeros(F.shape[1], D))
        s.scale = emb.weight.norm(dim=-1).mean().item()
        if a.qaware:
            s.mlp = nn.Sequential(nn.Linear(384 + D, 1024), nn.GELU(), nn.Linear(1024, D))
    def forward(s, f, qe=None):  # (B,K,384) -> (B,K,D)
        f = f / f.norm(dim=-1, keepdim=True)
        out = s.lin(f) + s.pos
        if a.qaware:
            g = torch.cat([f[:, -1], qe / qe.norm(dim=-1, keepdim=True)], -1)
            out = torch.cat([out, s.mlp(g)[:, None]], 1)
        return out
conn = Conn()
def batch(samples, with_answer=True):
    B = len(samples); q = torch.tensor([qid[s.question] for s in samples])
    feats = F[[index[s.media_id] for s in samples]]
    tails = [sep + (ans(s.answers[0]) + [eos] if with_answer else []) for s in samples]
    T = max(map(len, tails)); S = K + T
    tail_ids = torch.full((B, T), eos); tmask = torch.zeros(B, T, dtype=torch.long); labels = torch.full((B, S), -100)
    for b, t in enumerate(tails):
        tail_ids[b, :len(t)] = torch.tensor(t); tmask[b, :len(t)] = 1
        if with_answer:
            labels[b, K + len(sep) - 1: K + len(t) - 1] = torch.tensor(t[len(sep):])
    cache = DynamicCache(ddp_cache_data=[(kv[l, 0, q], kv[l, 1, q]) for l in range(NL)])
    mask = torch.cat([pmask[q], torch.ones(B, K, dtype=torch.long), tmask], 1)
    pos = plen[q][:, None] + torch.arange(S)[None]
    return cache, mask, pos, feats, tail_ids, labels
def run(samples, with_answer=True):
    cache, mask, pos, feats, tail_ids, labels = batch(samples, with_answer)
    if a.oracle:
        words = [tok(" " + attr[s.media_id]["color"] + " " + attr[s.media_id]["shape"], add_special_tokens=False).input_ids[:4] for s in samples]
        words = [w + [w[-1]] * (4 - len(w)) for w in words]
        x = torch.cat([emb(torch.tensor(words)), conn.pos[None, :2].expand(len(samples), 2, D), emb(tail_ids)], 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
            out = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=False)
        return out.logits.float(), labels
    qe = torch.stack([emb.weight[qtok[s.question]].mean(0) for s in samples]) if a.qaware else None
    x = torch.cat([conn(feats, qe), emb(tail_ids)], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
        out = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=False)
    return out.logits.float(), labels
def evaluate():
    conn.eval(); hits = collections.Counter(); tot = collections.Counter()
    with torch.no_grad():
        for i in range(0, len(test), 100):
            ch = test[i:i + 100]
            lg, _ = run(ch, with_answer=False)
            pred = lg[:, K + len(sep) - 1].argmax(-1)
            for s, p in zip(ch, pred.tolist()):
                ok = p == ans(s.answers[0])[0]
                hits[s.answer_type] += ok; tot[s.answer_type] += 1
                if s.template != s.answer_type: hits[s.template] += ok; tot[s.template] += 1
    conn.train()
    r = {k: round(100 * hits[k] / tot[k], 1) for k in sorted(tot)}
    r["overall"] = round(100 * sum(hits[k] for k in ("color", "shape", "yes/no")) / len(test), 1)
    return r
opt = torch.optim.AdamW(conn.parameters(), lr=a.lr, weight_decay=0.0)
warm = max(1, a.steps // 20)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, s / a.steps))))
rng = random.Random(0); order = []
t0 = time.time(); log = []
for step in range(1, a.steps + 1):
    if len(order) < a.bs: order += rng.sample(range(len(train)), len(train))
    sm = [train[order.pop()] for _ in range(a.bs)]
    lg, labels = run(sm)
    loss = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=-100)
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    if step % 20 == 0: print(f"step {step} loss {loss.item():.3f} {(time.time()-t0)/step:.2f}s/step", flush=True)
    if step % a.eval_every == 0 or step == a.steps:
        r = evaluate(); r.update(step=step, train_s=round(time.time() - t0)); print(json.dumps(r), flush=True); log.append(r)
os.makedirs("benchmarks/out", exist_ok=True)
json.dump({"args": vars(a), "log": log}, open(f"benchmarks/out/after_{a.feat}_{a.tokens}_{a.lr}_{a.steps}{a.tag}.json", "w"))
